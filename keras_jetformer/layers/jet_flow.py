"""Jet: a normalizing flow built from ViT affine couplings.

Reference: Kolesnikov et al., "Jet: A Modern Transformer-Based Normalizing
Flow", arXiv 2412.15129.

Dimension legend: B batch, H and W input height and width, C input channels,
p the flow's own patch size, N = (H / p) * (W / p) tokens, D = p * p * C.
"""

import itertools

import keras

from keras_jetformer.layers.jet_coupling import COUPLING_KINDS
from keras_jetformer.layers.jet_coupling import JetCoupling
from keras_jetformer.layers.patching import grid_to_tokens
from keras_jetformer.layers.patching import patchify
from keras_jetformer.layers.patching import tokens_to_grid
from keras_jetformer.layers.patching import unpatchify
from keras_jetformer.layers.rematerialization import rematerialized_call


def _sum(tensors):
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFlow(keras.layers.Layer):
    """An invertible flow over `[B, H, W, C]` inputs.

    The input is cut into `patch_size` patches (N tokens of D values), passed
    through `num_couplings` `JetCoupling` layers and reassembled.
    `forward_and_log_det(x)` returns `(z, logdet)` and
    `inverse_and_log_det(z)` returns `(x, logdet)`; `logdet` is the
    per-example `log|det J|` of the map that was applied, in nats, so the
    inverse's is the negative of the forward's. Calling the layer runs the
    forward map, or the inverse with `inverse=True`. (The methods are not
    named `forward` because the torch backend routes every layer call
    through `torch.nn.Module.forward`.)

    Coupling kinds cycle through `coupling_kinds`; every spatial coupling
    takes the next pattern of `spatial_patterns`.

    Args:
        num_couplings: int. Number of coupling layers. Defaults to `8`.
        coupling_kinds: sequence of strings. `"channels"` and/or
            `"spatial"`, cycled over the layers. Defaults to
            `("channels",)`.
        spatial_patterns: sequence of strings. Split patterns cycled over the
            spatial couplings. Defaults to
            `("checkerboard", "checkerboard-inv")`.
        patch_size: int. Patch size of the flow's own patching. JetFormer
            runs the flow on an already patchified grid with `1`. Defaults
            to `1`.
        hidden_dim: int. Hidden size of each coupling ViT. Defaults to `256`.
        num_layers: int. ViT blocks per coupling. Defaults to `1`.
        num_heads: int. Attention heads per ViT block. Defaults to `4`.
        intermediate_dim: int. MLP size of the ViT blocks. Defaults to
            `4 * hidden_dim`.
        scale_factor: float. Upper bound of the affine scales. Defaults to
            `2.0`.
        context_dim: int. Feature size of an optional conditioning context,
            read by every coupling through cross-attention. Defaults to
            `None`.
        layer_norm_epsilon: float. Defaults to `1e-6`.
        dropout: float. Dropout rate of the coupling ViTs. Defaults to `0.0`.
        seed: int. Seed of the random channel permutations. Defaults to
            `None`.
        remat: bool. Recompute each coupling's activations in the backward
            pass (`rematerialized_call`) of `forward_and_log_det` instead of
            storing them, which saves memory in training at the cost of a
            second forward pass through the couplings. Defaults to `False`.

    Example:

    ```python
    import numpy as np
    flow = keras_jetformer.layers.JetFlow(
        num_couplings=4, hidden_dim=32, num_heads=2
    )
    x = np.random.uniform(-1, 1, size=(2, 4, 4, 12)).astype("float32")
    z, logdet = flow.forward_and_log_det(x)
    x_again, inverse_logdet = flow.inverse_and_log_det(z)
    ```
    """

    def __init__(
        self,
        num_couplings=8,
        coupling_kinds=("channels",),
        spatial_patterns=("checkerboard", "checkerboard-inv"),
        patch_size=1,
        hidden_dim=256,
        num_layers=1,
        num_heads=4,
        intermediate_dim=None,
        scale_factor=2.0,
        context_dim=None,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        seed=None,
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(coupling_kinds, str):
            coupling_kinds = (coupling_kinds,)
        if isinstance(spatial_patterns, str):
            spatial_patterns = (spatial_patterns,)
        if not isinstance(num_couplings, int) or num_couplings < 1:
            raise ValueError(
                "`num_couplings` must be a positive integer. "
                f"Received: num_couplings={num_couplings!r}"
            )
        if not coupling_kinds or any(
            kind not in COUPLING_KINDS for kind in coupling_kinds
        ):
            raise ValueError(
                f"`coupling_kinds` must be a non-empty sequence of "
                f"{COUPLING_KINDS}. Received: coupling_kinds={coupling_kinds!r}"
            )
        if "spatial" in coupling_kinds and not spatial_patterns:
            raise ValueError(
                "Spatial couplings need at least one spatial pattern. "
                f"Received: spatial_patterns={spatial_patterns!r}"
            )
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(
                "`patch_size` must be a positive integer. "
                f"Received: patch_size={patch_size!r}"
            )
        self.num_couplings = num_couplings
        self.coupling_kinds = tuple(coupling_kinds)
        self.spatial_patterns = tuple(spatial_patterns)
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.scale_factor = scale_factor
        self.context_dim = context_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.seed = seed
        self.remat = remat
        self.couplings = []

    @property
    def input_dtype(self):
        # Inputs are cast to the variable dtype, not the compute dtype.
        # Under a mixed policy only the coupling networks then run in
        # bfloat16. The tokens and the affine maps stay in float32, so the
        # flow stays invertible to float32 precision.
        return self.variable_dtype

    def _coupling_plan(self):
        """Yield `(kind, spatial_pattern)` for each coupling in order."""
        kinds = itertools.cycle(self.coupling_kinds)
        patterns = itertools.cycle(self.spatial_patterns)
        for _ in range(self.num_couplings):
            kind = next(kinds)
            pattern = next(patterns) if kind == "spatial" else None
            yield kind, pattern

    def build(self, input_shape):
        _, height, width, channels = input_shape
        if height is None or width is None or channels is None:
            raise ValueError(
                "JetFlow needs static height, width and channels. "
                f"Received: input_shape={input_shape}"
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                "The input height and width must be divisible by "
                f"`patch_size`. Received: input_shape={input_shape}, "
                f"patch_size={self.patch_size}"
            )
        grid_shape = (height // self.patch_size, width // self.patch_size)
        token_dim = self.patch_size * self.patch_size * channels
        if token_dim % 2:
            raise ValueError(
                "Couplings split every token in halves, so "
                "`patch_size**2 * channels` must be even. "
                f"Received: input_shape={input_shape}, "
                f"patch_size={self.patch_size}"
            )
        self.grid_shape = grid_shape
        self.couplings = []
        for index, (kind, pattern) in enumerate(self._coupling_plan()):
            coupling = JetCoupling(
                kind=kind,
                grid_shape=grid_shape,
                spatial_pattern=pattern or "checkerboard",
                hidden_dim=self.hidden_dim,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                intermediate_dim=self.intermediate_dim,
                scale_factor=self.scale_factor,
                context_dim=self.context_dim,
                layer_norm_epsilon=self.layer_norm_epsilon,
                dropout=self.dropout,
                seed=None if self.seed is None else self.seed + index,
                dtype=self.dtype_policy,
                name=f"coupling_{index}",
            )
            coupling.build((None, grid_shape[0] * grid_shape[1], token_dim))
            self.couplings.append(coupling)
        self.built = True

    def _to_tokens(self, x):
        return grid_to_tokens(patchify(x, self.patch_size))

    def _from_tokens(self, tokens):
        grid = tokens_to_grid(tokens, *self.grid_shape)
        return unpatchify(grid, self.patch_size)

    def forward_and_log_det(self, x, context=None, training=None):
        """Map `x` `[B, H, W, C]` to `(z, logdet)`; `logdet` is `[B]` nats."""
        if not self.built:
            self.build(x.shape)
        tokens = self._to_tokens(x)
        logdets = []
        for coupling in self.couplings:
            if self.remat:
                tokens, coupling_logdet = self._rematerialized_coupling(
                    coupling, tokens, context, training
                )
            else:
                tokens, coupling_logdet = coupling.forward_and_log_det(
                    tokens, context=context, training=training
                )
            logdets.append(coupling_logdet)
        return self._from_tokens(tokens), _sum(logdets)

    def inverse_and_log_det(self, z, context=None, training=None):
        """Map `z` back to `(x, logdet)`; `logdet` is the forward's negated."""
        if not self.built:
            self.build(z.shape)
        tokens = self._to_tokens(z)
        logdets = []
        for coupling in reversed(self.couplings):
            tokens, coupling_logdet = coupling.inverse_and_log_det(
                tokens, context=context, training=training
            )
            logdets.append(coupling_logdet)
        return self._from_tokens(tokens), _sum(logdets)

    def call(self, x, context=None, inverse=False, training=None):
        if inverse:
            return self.inverse_and_log_det(x, context=context, training=training)
        return self.forward_and_log_det(x, context=context, training=training)

    def compute_output_spec(self, x, context=None, inverse=False, training=None):
        logdet = keras.KerasTensor((x.shape[0],), dtype="float32")
        return keras.KerasTensor(x.shape, dtype=x.dtype), logdet

    def _rematerialized_coupling(self, coupling, tokens, context, training):
        """Run one rematerialized coupling; return `(tokens, logdet)`."""

        # The context is an argument rather than a closure, because
        # `tf.recompute_grad` and `jax.custom_vjp` differentiate only the
        # arguments and the variables read inside.
        def run_coupling(tokens, context):
            return coupling.forward_and_log_det(
                tokens, context=context, training=training
            )

        return rematerialized_call(coupling, run_coupling, tokens, context)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_couplings": self.num_couplings,
                "coupling_kinds": self.coupling_kinds,
                "spatial_patterns": self.spatial_patterns,
                "patch_size": self.patch_size,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "scale_factor": self.scale_factor,
                "context_dim": self.context_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "seed": self.seed,
                "remat": self.remat,
            }
        )
        return config
