"""The Gaussian-mixture image head and its density.

Dimension legend: B batch, N image tokens, K mixture components, d the
dimension of a modelled image token.

The head outputs `K * (1 + 2 * d)` values per token: `K` mixture logits,
then for each component `d` means followed by `d` raw scales. A raw scale
`r` becomes the standard deviation `max(squareplus(r), scale_tol)`, with
`squareplus(r) = (r + sqrt(r**2 + 4)) / 2`, a smooth positive map that is
one at zero.
"""

import math

import keras
from keras import ops


def squareplus(x):
    """Smooth, positive `(x + sqrt(x**2 + 4)) / 2`.

    For negative `x` the equal form `2 / (sqrt(x**2 + 4) - x)` avoids the
    cancellation of two nearly equal numbers, which in float32 would turn
    e.g. `squareplus(-1e4)` (1e-4) into 0.
    """
    x = ops.convert_to_tensor(x)
    root = ops.sqrt(ops.square(x) + 4.0)
    # The negative form gets only non-positive inputs: at large positive `x`
    # it would divide by zero, and the gradient of the branch that `where`
    # drops would still be NaN.
    negative = ops.minimum(x, 0.0)
    negative_root = ops.sqrt(ops.square(negative) + 4.0)
    return ops.where(
        x >= 0, (x + root) / 2.0, 2.0 / (negative_root - negative)
    )


def mixture_parameters(logits, num_mixtures, token_dim, scale_tol=1e-6):
    """Split head outputs `[..., K * (1 + 2d)]` into mixture parameters.

    Returns `(mixture_logits [..., K], means [..., K, d],
    scales [..., K, d])`, all float32.
    """
    logits = ops.cast(logits, "float32")
    expected = num_mixtures * (1 + 2 * token_dim)
    if logits.shape[-1] != expected:
        raise ValueError(
            f"Expected {expected} head outputs for {num_mixtures} mixtures of "
            f"dimension {token_dim}. Received: shape={logits.shape}"
        )
    mixture_logits = logits[..., :num_mixtures]
    leading_shape = ops.shape(logits)[:-1]
    components = ops.reshape(
        logits[..., num_mixtures:],
        (*leading_shape, num_mixtures, 2, token_dim),
    )
    means = components[..., 0, :]
    scales = ops.maximum(squareplus(components[..., 1, :]), scale_tol)
    return mixture_logits, means, scales


def normal_log_prob(x, mean, scale):
    """Elementwise log density of `N(mean, scale**2)` at `x`."""
    x = ops.convert_to_tensor(x)
    mean = ops.cast(mean, x.dtype)
    scale = ops.cast(scale, x.dtype)
    z = (x - mean) / scale
    return -0.5 * ops.square(z) - ops.log(scale) - 0.5 * math.log(2 * math.pi)


def mixture_log_prob(x, mixture_logits, means, scales):
    """Log density of `x` `[..., d]` under a diagonal Gaussian mixture.

    Computed in float32 with `logsumexp` over the components, so that very
    small scales and extreme logits stay finite. Returns `[...]` nats.
    """
    x = ops.cast(x, "float32")
    mixture_logits = ops.cast(mixture_logits, "float32")
    means = ops.cast(means, "float32")
    scales = ops.cast(scales, "float32")
    log_weights = ops.log_softmax(mixture_logits, axis=-1)
    component_log_probs = ops.sum(
        normal_log_prob(ops.expand_dims(x, -2), means, scales), axis=-1
    )
    return ops.logsumexp(log_weights + component_log_probs, axis=-1)


@keras.saving.register_keras_serializable(package="keras_jetformer")
class GaussianMixtureHead(keras.layers.Layer):
    """Dense head producing a diagonal Gaussian mixture per image token.

    The reference initialises the whole head to zero, so every component
    starts identical, receives the same gradient and stays identical. This
    head starts the component means at small random values instead (the
    kernel, mixture logits and raw scales still start at zero), which breaks
    that symmetry. Loaded weights replace this initialisation entirely.

    Args:
        num_mixtures: int. Number of components `K`.
        token_dim: int. Dimension `d` of the modelled tokens.
        scale_tol: float. Lower bound of the standard deviations. Defaults
            to `1e-6`.
        mean_init_stddev: float. Standard deviation of the initial component
            means. Defaults to `0.5`.
    """

    def __init__(
        self,
        num_mixtures,
        token_dim,
        scale_tol=1e-6,
        mean_init_stddev=0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(
                "`num_mixtures` must be a positive integer. "
                f"Received: num_mixtures={num_mixtures!r}"
            )
        if not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(
                "`token_dim` must be a positive integer. "
                f"Received: token_dim={token_dim!r}"
            )
        if not scale_tol > 0:
            raise ValueError(
                f"`scale_tol` must be positive. Received: scale_tol={scale_tol}"
            )
        self.num_mixtures = num_mixtures
        self.token_dim = token_dim
        self.scale_tol = scale_tol
        self.mean_init_stddev = mean_init_stddev

    @property
    def num_outputs(self):
        return self.num_mixtures * (1 + 2 * self.token_dim)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(hidden_dim, self.num_outputs),
            initializer="zeros",
        )

        def bias_initializer(shape, dtype=None):
            # Layout per component: d means, then d raw scales.
            offsets = keras.random.normal(
                (self.num_mixtures, 1, self.token_dim),
                stddev=self.mean_init_stddev,
                dtype=dtype,
            )
            offsets = ops.concatenate([offsets, ops.zeros_like(offsets)], 1)
            return ops.concatenate(
                [
                    ops.zeros((self.num_mixtures,), dtype=dtype),
                    ops.reshape(offsets, (-1,)),
                ],
                axis=0,
            )

        self.bias = self.add_weight(
            name="bias", shape=(self.num_outputs,), initializer=bias_initializer
        )
        self.built = True

    def call(self, hidden_states):
        """Return the raw head outputs `[..., K * (1 + 2d)]`."""
        return ops.matmul(hidden_states, self.kernel) + self.bias

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_outputs)

    def mixture(self, logits):
        """Return `(mixture_logits, means, scales)` for head outputs."""
        return mixture_parameters(
            logits, self.num_mixtures, self.token_dim, self.scale_tol
        )

    def log_prob(self, logits, x):
        """Log density in nats of tokens `x` `[..., d]` under `logits`."""
        return mixture_log_prob(x, *self.mixture(logits))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_mixtures": self.num_mixtures,
                "token_dim": self.token_dim,
                "scale_tol": self.scale_tol,
                "mean_init_stddev": self.mean_init_stddev,
            }
        )
        return config
