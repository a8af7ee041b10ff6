"""Tests for the Gaussian-mixture head and its density.

The expected densities come from scipy in float64: `scipy.stats.norm.logpdf`
summed over the token dimensions, then `scipy.special.logsumexp` over the
components with log-softmax weights. Inputs are made in float32 first, so
both sides see the same numbers.
"""

import keras
import numpy as np
import scipy.special
import scipy.stats
from keras import ops

from keras_hub.src.tests.test_case import TestCase

from keras_jetformer.layers.gaussian_mixture import GaussianMixtureHead
from keras_jetformer.layers.gaussian_mixture import mixture_log_prob
from keras_jetformer.layers.gaussian_mixture import mixture_parameters
from keras_jetformer.layers.gaussian_mixture import squareplus

NUM_MIXTURES = 3
TOKEN_DIM = 4


def expected_log_prob(x, mixture_logits, means, scales):
    """Return the float64 mixture log density of `x` `[..., d]`."""
    x, mixture_logits, means, scales = (
        np.asarray(value, "float64")
        for value in (x, mixture_logits, means, scales)
    )
    log_weights = scipy.special.log_softmax(mixture_logits, axis=-1)
    component_log_probs = scipy.stats.norm.logpdf(
        x[..., None, :], loc=means, scale=scales
    ).sum(axis=-1)
    return scipy.special.logsumexp(log_weights + component_log_probs, axis=-1)


def expected_squareplus(x):
    """Return `(x + sqrt(x**2 + 4)) / 2` in float64 without cancellation."""
    x = np.asarray(x, "float64")
    root = np.sqrt(x * x + 4.0)
    # For negative x, (x + root) / 2 equals 2 / (root - x), which adds two
    # positive numbers instead of cancelling two nearly equal ones.
    return np.where(x >= 0, (x + root) / 2.0, 2.0 / (root - x))


def random_mixture(shape, seed=0):
    """Return float32 `(x, mixture_logits, means, scales)` of moderate size."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*shape, TOKEN_DIM)).astype("float32")
    mixture_logits = rng.normal(scale=2.0, size=(*shape, NUM_MIXTURES))
    means = rng.normal(size=(*shape, NUM_MIXTURES, TOKEN_DIM))
    scales = rng.uniform(0.1, 2.0, size=(*shape, NUM_MIXTURES, TOKEN_DIM))
    return (
        x,
        mixture_logits.astype("float32"),
        means.astype("float32"),
        scales.astype("float32"),
    )


def compute_gradients(fn, *args):
    """Return the gradients of the scalar `fn(*args)` with the backend's
    automatic differentiation, as float64 numpy arrays."""
    args = [np.asarray(arg, "float32") for arg in args]
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        gradients = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
    elif backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(arg) for arg in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = fn(*tensors)
        gradients = tape.gradient(value, tensors)
    elif backend == "torch":
        import torch

        tensors = [torch.tensor(arg, requires_grad=True) for arg in args]
        fn(*tensors).backward()
        gradients = [tensor.grad for tensor in tensors]
    else:
        raise ValueError(f"Unsupported Keras backend: {backend!r}")
    return [np.asarray(ops.convert_to_numpy(g), "float64") for g in gradients]


def expected_gradients(x, mixture_logits, means, scales):
    """Return float64 gradients of the summed log density with respect to
    the mixture logits and `x`, from the closed form."""
    x, mixture_logits, means, scales = (
        np.asarray(value, "float64")
        for value in (x, mixture_logits, means, scales)
    )
    log_weights = scipy.special.log_softmax(mixture_logits, axis=-1)
    component_log_probs = scipy.stats.norm.logpdf(
        x[..., None, :], loc=means, scale=scales
    ).sum(axis=-1)
    joint = log_weights + component_log_probs
    posterior = scipy.special.softmax(joint, axis=-1)
    logits_gradient = posterior - scipy.special.softmax(mixture_logits, -1)
    # d/dx log N(x; mean, scale) = -(x - mean) / scale**2 per component.
    component_x_gradient = -(x[..., None, :] - means) / scales**2
    x_gradient = np.sum(posterior[..., None] * component_x_gradient, axis=-2)
    return logits_gradient, x_gradient


def summed_log_prob(means, scales):
    """Return `fn(mixture_logits, x)`: the summed log density."""
    # The means and scales become tensors because Python arithmetic between
    # a numpy array and a torch tensor that requires gradients makes numpy
    # convert the tensor, which torch rejects.
    means = ops.convert_to_tensor(means)
    scales = ops.convert_to_tensor(scales)

    def fn(mixture_logits, x):
        return ops.sum(mixture_log_prob(x, mixture_logits, means, scales))

    return fn


class MixtureLogProbTest(TestCase):
    def test_matches_scipy(self):
        x, mixture_logits, means, scales = random_mixture((2, 5))

        log_prob = mixture_log_prob(x, mixture_logits, means, scales)

        self.assertEqual(tuple(log_prob.shape), (2, 5))
        self.assertAllClose(
            log_prob,
            expected_log_prob(x, mixture_logits, means, scales),
            atol=1e-5,
            rtol=1e-5,
        )

    def test_single_component_is_diagonal_normal(self):
        x, _, means, scales = random_mixture((6,), seed=1)
        means, scales = means[:, :1], scales[:, :1]

        log_prob = mixture_log_prob(x, np.zeros((6, 1), "float32"), means, scales)

        expected = scipy.stats.norm.logpdf(
            x.astype("float64"), means[:, 0], scales[:, 0]
        ).sum(axis=-1)
        self.assertAllClose(log_prob, expected, atol=1e-5, rtol=1e-5)

    def test_tiny_scales(self):
        x, mixture_logits, means, scales = random_mixture((2, 5), seed=2)
        # `0.5 + k * 2**-20` is exact in float32, so `x - mean` carries no
        # rounding error although it is of the order of the scale.
        means = np.full_like(means, 0.5)
        offsets = np.arange(2 * 5 * TOKEN_DIM).reshape(2, 5, TOKEN_DIM) % 5
        x = (0.5 + offsets * 2.0**-20).astype("float32")
        scales[..., 0, :] = 1e-6
        scales[..., 1, :] = 1e-5

        log_prob = mixture_log_prob(x, mixture_logits, means, scales)

        expected = expected_log_prob(x, mixture_logits, means, scales)
        self.assertTrue(np.all(np.isfinite(ops.convert_to_numpy(log_prob))))
        self.assertAllClose(log_prob, expected, atol=1e-3, rtol=1e-5)

    def test_extreme_logits(self):
        x, _, means, scales = random_mixture((2, 5), seed=3)
        mixture_logits = np.zeros((2, 5, NUM_MIXTURES), "float32")
        mixture_logits[..., 0] = 1e4
        mixture_logits[..., 1] = -1e4
        # Give the heavily down-weighted component a far better fit.
        means[..., 1, :] = x
        scales[..., 1, :] = 1e-3

        log_prob = mixture_log_prob(x, mixture_logits, means, scales)

        expected = expected_log_prob(x, mixture_logits, means, scales)
        self.assertTrue(np.all(np.isfinite(ops.convert_to_numpy(log_prob))))
        self.assertAllClose(log_prob, expected, atol=1e-3, rtol=1e-5)

    def test_large_distance_from_means(self):
        x, mixture_logits, means, scales = random_mixture((2, 5), seed=4)
        x = np.full_like(x, 1e3)
        scales[..., 0, :] = 1e-6

        log_prob = mixture_log_prob(x, mixture_logits, means, scales)

        expected = expected_log_prob(x, mixture_logits, means, scales)
        self.assertTrue(np.all(np.isfinite(ops.convert_to_numpy(log_prob))))
        self.assertAllClose(log_prob, expected, atol=1e-3, rtol=1e-5)

    def test_gradients_match_closed_form(self):
        x, mixture_logits, means, scales = random_mixture((2, 5), seed=5)

        logits_gradient, x_gradient = compute_gradients(
            summed_log_prob(means, scales), mixture_logits, x
        )

        expected_logits, expected_x = expected_gradients(
            x, mixture_logits, means, scales
        )
        self.assertAllClose(logits_gradient, expected_logits, atol=1e-5)
        self.assertAllClose(x_gradient, expected_x, atol=1e-4, rtol=1e-4)

    def test_gradients_finite_in_extreme_regimes(self):
        x, _, means, scales = random_mixture((2, 5), seed=6)
        mixture_logits = np.zeros((2, 5, NUM_MIXTURES), "float32")
        mixture_logits[..., 0] = 1e4
        mixture_logits[..., 1] = -1e4
        scales[..., 0, :] = 1e-6
        scales[..., 2, :] = 1e-6
        # The first example is far from every mean, the second is close to
        # the means of the tiny-scale components.
        x[0] = 1e3
        means[1, :, 0] = x[1]
        means[1, :, 2] = x[1] + 2.0**-18

        logits_gradient, x_gradient = compute_gradients(
            summed_log_prob(means, scales), mixture_logits, x
        )

        self.assertTrue(np.all(np.isfinite(logits_gradient)))
        self.assertTrue(np.all(np.isfinite(x_gradient)))
        expected_logits, expected_x = expected_gradients(
            x, mixture_logits, means, scales
        )
        self.assertAllClose(logits_gradient, expected_logits, atol=1e-4)
        self.assertAllClose(x_gradient, expected_x, atol=1e-3, rtol=1e-3)

    def test_gradients_finite_through_scale_floor(self):
        rng = np.random.default_rng(7)
        head_outputs = rng.normal(
            size=(2, 5, NUM_MIXTURES * (1 + 2 * TOKEN_DIM))
        ).astype("float32")
        # Raw scales of the second component far below the floor.
        start = NUM_MIXTURES + 2 * TOKEN_DIM + TOKEN_DIM
        head_outputs[..., start : start + TOKEN_DIM] = -1e7
        x = rng.normal(size=(2, 5, TOKEN_DIM)).astype("float32")

        def fn(head_outputs, x):
            parameters = mixture_parameters(
                head_outputs, NUM_MIXTURES, TOKEN_DIM
            )
            return ops.sum(mixture_log_prob(x, *parameters))

        outputs_gradient, x_gradient = compute_gradients(fn, head_outputs, x)

        self.assertTrue(np.all(np.isfinite(outputs_gradient)))
        self.assertTrue(np.all(np.isfinite(x_gradient)))


class MixtureParametersTest(TestCase):
    def test_layout_on_hand_built_vector(self):
        num_mixtures, token_dim = 2, 3
        # 2 logits, then means [2, 3, 4] and raw scales [5, 6, 7] of the
        # first component, then means [8, 9, 10] and raw scales [11, 12, 13].
        head_outputs = np.arange(14, dtype="float32")

        mixture_logits, means, scales = mixture_parameters(
            head_outputs, num_mixtures, token_dim
        )

        self.assertAllEqual(mixture_logits, [0.0, 1.0])
        self.assertAllEqual(means, [[2.0, 3.0, 4.0], [8.0, 9.0, 10.0]])
        self.assertAllClose(
            scales,
            expected_squareplus([[5.0, 6.0, 7.0], [11.0, 12.0, 13.0]]),
        )

    def test_layout_with_leading_axes(self):
        num_mixtures, token_dim = 3, 2
        num_outputs = num_mixtures * (1 + 2 * token_dim)
        head_outputs = np.arange(2 * 4 * num_outputs, dtype="float32")
        head_outputs = head_outputs.reshape(2, 4, num_outputs) / 10.0

        mixture_logits, means, scales = mixture_parameters(
            head_outputs, num_mixtures, token_dim
        )

        self.assertEqual(tuple(mixture_logits.shape), (2, 4, 3))
        self.assertEqual(tuple(means.shape), (2, 4, 3, 2))
        self.assertEqual(tuple(scales.shape), (2, 4, 3, 2))
        for component in range(num_mixtures):
            start = num_mixtures + component * 2 * token_dim
            self.assertAllClose(
                means[..., component, :],
                head_outputs[..., start : start + token_dim],
            )
            self.assertAllClose(
                scales[..., component, :],
                expected_squareplus(
                    head_outputs[..., start + token_dim : start + 2 * token_dim]
                ),
            )
        self.assertAllClose(mixture_logits, head_outputs[..., :num_mixtures])

    def test_scale_floor(self):
        head_outputs = np.zeros((1 + 2 * 2,), "float32")
        # The exact squareplus of -1e7 is 1e-7, below the default floor.
        head_outputs[3:] = -1e7

        _, _, scales = mixture_parameters(head_outputs, 1, 2)

        self.assertAllEqual(scales, np.full((1, 2), np.float32(1e-6)))

    def test_custom_scale_floor(self):
        head_outputs = np.zeros((1 + 2 * 2,), "float32")
        head_outputs[3] = -100.0
        head_outputs[4] = -1e5

        _, _, scales = mixture_parameters(head_outputs, 1, 2, scale_tol=1e-3)

        # squareplus(-100) is about 0.01, above the floor of 1e-3, while
        # squareplus(-1e5) is about 1e-5, below it.
        self.assertAllClose(
            scales, [[expected_squareplus(-100.0), 1e-3]], rtol=1e-3
        )

    def test_floor_log_prob_matches_scipy(self):
        rng = np.random.default_rng(8)
        head_outputs = rng.normal(size=(2, 5, NUM_MIXTURES * 9))
        head_outputs = head_outputs.astype("float32")
        # Raw scales of the first component: the floor of 1e-6 applies.
        head_outputs[..., NUM_MIXTURES + 4 : NUM_MIXTURES + 8] = -1e7
        x = rng.normal(size=(2, 5, TOKEN_DIM)).astype("float32")

        parameters = mixture_parameters(head_outputs, NUM_MIXTURES, TOKEN_DIM)
        log_prob = mixture_log_prob(x, *parameters)

        expected_logits = head_outputs[..., :NUM_MIXTURES]
        components = head_outputs[..., NUM_MIXTURES:].reshape(
            2, 5, NUM_MIXTURES, 2, TOKEN_DIM
        )
        expected_scales = np.maximum(
            expected_squareplus(components[..., 1, :]), np.float32(1e-6)
        )
        expected = expected_log_prob(
            x, expected_logits, components[..., 0, :], expected_scales
        )
        self.assertAllClose(log_prob, expected, atol=1e-3, rtol=1e-5)

    def test_rejects_wrong_output_size(self):
        with self.assertRaisesRegex(ValueError, "Expected 9 head outputs"):
            mixture_parameters(np.zeros((2, 10), "float32"), 1, 4)


class SquareplusTest(TestCase):
    def test_value_at_zero_is_one(self):
        value = squareplus(ops.convert_to_tensor(0.0))

        self.assertEqual(float(ops.convert_to_numpy(value)), 1.0)

    def test_matches_float64_on_moderate_inputs(self):
        # Below about -5 the float32 formula loses digits to cancellation,
        # which `test_accurate_for_large_negative_inputs` covers.
        x = np.linspace(-5.0, 20.0, 51).astype("float32")

        values = squareplus(ops.convert_to_tensor(x))

        self.assertAllClose(values, expected_squareplus(x), atol=0, rtol=1e-5)

    def test_accurate_for_large_negative_inputs(self):
        # squareplus(x) is about -1 / x for large negative x.
        x = np.array([-1e2, -1e3, -1e4, -1e5], "float32")

        values = ops.convert_to_numpy(squareplus(ops.convert_to_tensor(x)))

        self.assertTrue(
            np.all(values > 0), msg=f"squareplus({x}) returned {values}"
        )
        self.assertAllClose(values, expected_squareplus(x), atol=0, rtol=1e-3)

    def test_positive_and_above_identity(self):
        x = np.linspace(-5.0, 50.0, 56).astype("float32")

        values = ops.convert_to_numpy(squareplus(ops.convert_to_tensor(x)))

        self.assertTrue(np.all(values > 0))
        self.assertTrue(np.all(values >= x))


class GaussianMixtureHeadTest(TestCase):
    def build_head(self, num_mixtures=4, token_dim=3, hidden_dim=8):
        head = GaussianMixtureHead(num_mixtures, token_dim)
        head.build((None, None, hidden_dim))
        return head

    def test_output_shape(self):
        head = self.build_head()
        hidden_states = np.ones((2, 5, 8), "float32")

        outputs = head(hidden_states)

        self.assertEqual(tuple(outputs.shape), (2, 5, 4 * (1 + 2 * 3)))
        self.assertEqual(head.num_outputs, 28)
        self.assertEqual(head.compute_output_shape((2, 5, 8)), (2, 5, 28))

    def test_initial_weights(self):
        head = self.build_head()

        kernel = ops.convert_to_numpy(head.kernel)
        bias = ops.convert_to_numpy(head.bias)
        components = bias[4:].reshape(4, 2, 3)
        means, raw_scales = components[:, 0], components[:, 1]

        self.assertAllEqual(kernel, np.zeros((8, 28)))
        self.assertAllEqual(bias[:4], np.zeros(4))
        self.assertAllEqual(raw_scales, np.zeros((4, 3)))
        # Symmetry breaking: no two components start with the same means.
        for first in range(4):
            for second in range(first + 1, 4):
                self.assertFalse(np.allclose(means[first], means[second]))

    def test_initial_outputs_ignore_inputs(self):
        head = self.build_head()
        rng = np.random.default_rng(9)
        hidden_states = rng.normal(size=(2, 5, 8)).astype("float32")

        outputs = ops.convert_to_numpy(head(hidden_states))

        expected = np.broadcast_to(ops.convert_to_numpy(head.bias), (2, 5, 28))
        self.assertAllClose(outputs, expected)

    def test_initial_mixture_has_unit_scales(self):
        head = self.build_head()
        outputs = head(np.ones((2, 5, 8), "float32"))

        mixture_logits, _, scales = head.mixture(outputs)

        self.assertAllEqual(mixture_logits, np.zeros((2, 5, 4)))
        self.assertAllEqual(scales, np.ones((2, 5, 4, 3)))

    def test_log_prob_matches_scipy(self):
        head = self.build_head()
        rng = np.random.default_rng(10)
        head.kernel.assign(rng.normal(size=(8, 28)).astype("float32") * 0.3)
        hidden_states = rng.normal(size=(2, 5, 8)).astype("float32")
        x = rng.normal(size=(2, 5, 3)).astype("float32")

        outputs = head(hidden_states)
        log_prob = head.log_prob(outputs, x)

        outputs = ops.convert_to_numpy(outputs)
        components = outputs[..., 4:].reshape(2, 5, 4, 2, 3)
        expected = expected_log_prob(
            x,
            outputs[..., :4],
            components[..., 0, :],
            expected_squareplus(components[..., 1, :]),
        )
        self.assertAllClose(log_prob, expected, atol=1e-5, rtol=1e-5)

    def test_config_round_trip(self):
        head = GaussianMixtureHead(
            num_mixtures=5, token_dim=2, scale_tol=1e-4, mean_init_stddev=0.1
        )

        config = head.get_config()
        restored = GaussianMixtureHead.from_config(config)

        self.assertEqual(restored.get_config(), config)
        self.assertEqual(restored.num_mixtures, 5)
        self.assertEqual(restored.token_dim, 2)
        self.assertEqual(restored.scale_tol, 1e-4)
        self.assertEqual(restored.mean_init_stddev, 0.1)

    def test_layer_behaviour(self):
        self.run_layer_test(
            cls=GaussianMixtureHead,
            init_kwargs={"num_mixtures": 2, "token_dim": 3},
            # The input is a backend tensor because `compute_output_spec` in
            # the precision checks finds no input shape in a numpy array
            # (`keras.layers.Dense` fails there the same way in Keras 3.15).
            input_data=ops.ones((2, 5, 8)),
            expected_output_shape=(2, 5, 14),
            expected_num_trainable_weights=2,
        )

    def test_rejects_invalid_arguments(self):
        for num_mixtures in (0, -1, 1.5):
            with self.assertRaisesRegex(ValueError, "num_mixtures"):
                GaussianMixtureHead(num_mixtures=num_mixtures, token_dim=3)
        with self.assertRaisesRegex(ValueError, "token_dim"):
            GaussianMixtureHead(num_mixtures=2, token_dim=0)
        with self.assertRaisesRegex(ValueError, "scale_tol"):
            GaussianMixtureHead(num_mixtures=2, token_dim=3, scale_tol=0.0)
