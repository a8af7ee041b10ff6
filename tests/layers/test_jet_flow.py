"""Tests for the Jet normalizing flow and its affine coupling layer.

Most tests first overwrite every trainable weight with `stddev * N(0, 1)`
values from a fixed numpy seed. A new flow is the identity with a log-det of
zero, so without this step a wrong sign or a missing log-det term would pass.
"""

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

from keras_hub.src.tests.test_case import TestCase

from keras_jetformer.layers.jet_coupling import JetCoupling
from keras_jetformer.layers.jet_coupling import spatial_permutation
from keras_jetformer.layers.jet_flow import JetFlow

# A depth-8 flow that alternates channel and spatial couplings, so the
# spatial ones use each of the four patterns once.
FLOW_KWARGS = {
    "num_couplings": 8,
    "coupling_kinds": ("channels", "spatial"),
    "spatial_patterns": (
        "checkerboard",
        "checkerboard-inv",
        "vstripes",
        "hstripes",
    ),
    "hidden_dim": 16,
    "num_heads": 2,
    "seed": 1,
}
INPUT_SHAPE = (2, 4, 4, 4)
# The smallest input for the Jacobian checks: a 2x2 grid of 4 values.
TINY_SHAPE = (1, 2, 2, 4)
# Standard deviation and numpy seed of the perturbed weights. With these
# values the log-dets of `FLOW_KWARGS` flows measured 6 to 17 nats in
# magnitude on the jax, tensorflow and torch CPU backends, and float32 round
# trips stayed within 1e-5.
PERTURB_STDDEV = 0.4
PERTURB_SEED = 1


def perturb_weights(layer, stddev=PERTURB_STDDEV, seed=PERTURB_SEED):
    """Overwrite every trainable weight of `layer` with `stddev * N(0, 1)`."""
    rng = np.random.default_rng(seed)
    for weight in layer.trainable_weights:
        values = stddev * rng.standard_normal(weight.shape)
        weight.assign(values.astype(weight.dtype))


def uniform_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=shape).astype("float32")


def to_numpy(x):
    return ops.convert_to_numpy(x)


def compute_jacobian(fn, x):
    """Return the `[M, N]` Jacobian of `fn` at the flat float32 vector `x`.

    Uses the automatic differentiation of the active Keras backend, so the
    result does not depend on the flow's own log-det code.
    """
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        # Without `jax.jit`, the tests share the compiled single operations
        # instead of compiling one program per Jacobian.
        return np.asarray(jax.jacfwd(fn)(x))
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        # NOTE: `experimental_use_pfor=True` crashed the Python process
        # ("corrupted double-linked list") with TensorFlow in this venv, so
        # the Jacobian is built one output at a time.
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = fn(x)
        return tape.jacobian(y, x, experimental_use_pfor=False).numpy()
    if backend == "torch":
        import torch

        jacobian = torch.autograd.functional.jacobian(fn, torch.tensor(x))
        return jacobian.detach().cpu().numpy()
    raise ValueError(f"Unsupported Keras backend: {backend!r}")


def jacobian_log_det(fn, x, shape):
    """Return `(sign, log|det J|)` in float64 of `fn` at `x` of `shape`."""

    def flat_fn(flat_x):
        return ops.reshape(fn(ops.reshape(flat_x, shape)), (-1,))

    jacobian = compute_jacobian(flat_fn, x.reshape(-1))
    return np.linalg.slogdet(jacobian.astype("float64"))


def build_flow(input_shape=INPUT_SHAPE, perturb=True, **overrides):
    flow = JetFlow(**{**FLOW_KWARGS, **overrides})
    flow.build(input_shape)
    if perturb:
        perturb_weights(flow)
    return flow


_SHARED_FLOWS = {}


def shared_flow(**options):
    """Return a flow from `build_flow(**options)`, built once per `options`.

    Only for tests that leave the weights unchanged: sharing a flow saves a
    build and a weight perturbation per test.
    """
    key = tuple(sorted(options.items()))
    if key not in _SHARED_FLOWS:
        _SHARED_FLOWS[key] = build_flow(**options)
    return _SHARED_FLOWS[key]


class JetFlowTest(TestCase):
    # --- Invertibility and log-dets ------------------------------------------

    def test_inverse_recovers_inputs(self):
        flow = shared_flow()
        x = uniform_inputs(INPUT_SHAPE)

        z, logdet = flow.forward_and_log_det(x)
        x_restored, _ = flow.inverse_and_log_det(z)

        self.assertGreater(np.mean(np.abs(to_numpy(logdet))), 5.0)
        self.assertGreater(np.max(np.abs(to_numpy(z) - x)), 0.1)
        self.assertLessEqual(np.max(np.abs(to_numpy(x_restored) - x)), 1e-4)

    def test_forward_recovers_latents(self):
        flow = shared_flow()
        z = uniform_inputs(INPUT_SHAPE, seed=3)

        x, _ = flow.inverse_and_log_det(z)
        z_restored, _ = flow.forward_and_log_det(x)

        self.assertLessEqual(np.max(np.abs(to_numpy(z_restored) - z)), 1e-4)

    def test_call_runs_forward_and_inverse(self):
        flow = shared_flow()
        x = uniform_inputs(INPUT_SHAPE)

        z, logdet = flow(x)
        z_forward, logdet_forward = flow.forward_and_log_det(x)
        x_restored, _ = flow(z, inverse=True)

        self.assertAllClose(z, z_forward)
        self.assertAllClose(logdet, logdet_forward)
        self.assertLessEqual(np.max(np.abs(to_numpy(x_restored) - x)), 1e-4)

    def test_inverse_logdet_negates_forward(self):
        flow = shared_flow()
        x = uniform_inputs(INPUT_SHAPE)

        z, forward_logdet = flow.forward_and_log_det(x)
        _, inverse_logdet = flow.inverse_and_log_det(z)

        self.assertEqual(tuple(forward_logdet.shape), (INPUT_SHAPE[0],))
        self.assertEqual(tuple(inverse_logdet.shape), (INPUT_SHAPE[0],))
        self.assertAllClose(
            inverse_logdet, -to_numpy(forward_logdet), atol=1e-4, rtol=1e-5
        )

    def test_forward_logdet_matches_jacobian(self):
        flow = build_flow(TINY_SHAPE)
        x = uniform_inputs(TINY_SHAPE, seed=2)

        _, logdet = flow.forward_and_log_det(x)
        sign, expected = jacobian_log_det(
            lambda v: flow.forward_and_log_det(v)[0], x, TINY_SHAPE
        )

        logdet = float(to_numpy(logdet)[0])
        self.assertGreater(abs(expected), 5.0)
        # Every coupling scales by positive factors, so det J > 0.
        self.assertEqual(sign, 1.0)
        self.assertAllClose(logdet, expected, atol=1e-4, rtol=1e-3)

    def test_logdet_is_per_example(self):
        flow = shared_flow()
        x = uniform_inputs(INPUT_SHAPE)

        z, logdet = flow.forward_and_log_det(x)
        z, logdet = to_numpy(z), to_numpy(logdet)

        self.assertGreater(abs(logdet[0] - logdet[1]), 1e-2)
        # A batch that repeats one example gives that example's result alone
        # without a new batch size, so no backend compiles new shapes.
        for index in range(INPUT_SHAPE[0]):
            repeated = np.stack([x[index], x[index]])
            single_z, single_logdet = flow.forward_and_log_det(repeated)
            self.assertAllClose(
                to_numpy(single_logdet)[0], logdet[index], atol=1e-4, rtol=1e-5
            )
            self.assertAllClose(
                to_numpy(single_z)[0], z[index], atol=1e-5, rtol=1e-5
            )

    def test_patch_size_two_round_trip(self):
        # An 8x8 image with one channel and 2x2 patches gives the same 4x4
        # grid of 4 values per token as `INPUT_SHAPE`.
        shape = (2, 8, 8, 1)
        flow = build_flow(shape, patch_size=2)
        x = uniform_inputs(shape)

        z, logdet = flow.forward_and_log_det(x)
        x_restored, inverse_logdet = flow.inverse_and_log_det(z)

        self.assertEqual(flow.grid_shape, (4, 4))
        self.assertGreater(np.max(np.abs(to_numpy(z) - x)), 0.1)
        self.assertLessEqual(np.max(np.abs(to_numpy(x_restored) - x)), 1e-4)
        self.assertAllClose(
            inverse_logdet, -to_numpy(logdet), atol=1e-4, rtol=1e-5
        )

    # --- Initial state and frozen permutations -------------------------------

    def test_new_flow_is_identity(self):
        flow = shared_flow(perturb=False)
        x = uniform_inputs(INPUT_SHAPE)

        z, logdet = flow.forward_and_log_det(x)
        x_restored, inverse_logdet = flow.inverse_and_log_det(x)

        self.assertAllClose(z, x, atol=1e-6, rtol=0)
        self.assertAllClose(x_restored, x, atol=1e-6, rtol=0)
        self.assertAllClose(logdet, np.zeros(INPUT_SHAPE[0]), atol=1e-5)
        self.assertAllClose(
            inverse_logdet, np.zeros(INPUT_SHAPE[0]), atol=1e-5
        )

    def test_new_coupling_output_projection_is_zero(self):
        flow = shared_flow(perturb=False)

        for coupling in flow.couplings:
            projection = coupling.output_projection
            self.assertAllEqual(
                projection.kernel, np.zeros(projection.kernel.shape)
            )
            self.assertAllEqual(projection.bias, np.zeros(projection.bias.shape))

    def test_permutations_are_frozen_weights(self):
        flow = shared_flow()

        trainable_ids = {id(weight) for weight in flow.trainable_weights}
        non_trainable_ids = {
            id(weight) for weight in flow.non_trainable_weights
        }
        for coupling in flow.couplings:
            permutation = coupling.permutation
            self.assertFalse(permutation.trainable)
            self.assertNotIn(id(permutation), trainable_ids)
            self.assertIn(id(permutation), non_trainable_ids)
            self.assertEqual(
                keras.backend.standardize_dtype(permutation.dtype), "int32"
            )
            self.assertAllEqual(
                np.sort(to_numpy(permutation)), np.arange(permutation.shape[0])
            )

    def test_permutation_sizes_and_patterns(self):
        flow = shared_flow(perturb=False)
        num_tokens = INPUT_SHAPE[1] * INPUT_SHAPE[2]
        token_dim = INPUT_SHAPE[3]

        spatial_index = 0
        for coupling in flow.couplings:
            permutation = to_numpy(coupling.permutation)
            if coupling.kind == "channels":
                self.assertEqual(permutation.shape, (token_dim,))
                continue
            pattern = FLOW_KWARGS["spatial_patterns"][spatial_index]
            spatial_index += 1
            self.assertEqual(coupling.spatial_pattern, pattern)
            self.assertEqual(permutation.shape, (num_tokens,))
        self.assertEqual(spatial_index, 4)

    def test_optimizer_step_leaves_permutations_unchanged(self):
        flow = build_flow()
        permutations = [to_numpy(c.permutation) for c in flow.couplings]
        trainable_before = [to_numpy(w) for w in flow.trainable_weights]
        optimizer = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)

        gradients = [ops.ones(w.shape) for w in flow.trainable_weights]
        optimizer.apply(gradients, flow.trainable_weights)

        for before, weight in zip(trainable_before, flow.trainable_weights):
            self.assertFalse(np.allclose(before, to_numpy(weight)))
        for before, coupling in zip(permutations, flow.couplings):
            self.assertAllEqual(to_numpy(coupling.permutation), before)

    # --- Conditional flow ---------------------------------------------------

    def test_conditional_round_trip(self):
        flow = shared_flow(context_dim=6)
        x = uniform_inputs(INPUT_SHAPE)
        context = uniform_inputs((INPUT_SHAPE[0], 3, 6), seed=5)

        z, logdet = flow.forward_and_log_det(x, context=context)
        x_restored, inverse_logdet = flow.inverse_and_log_det(z, context=context)

        self.assertLessEqual(np.max(np.abs(to_numpy(x_restored) - x)), 1e-4)
        self.assertAllClose(
            inverse_logdet, -to_numpy(logdet), atol=1e-4, rtol=1e-5
        )

    def test_conditional_output_depends_on_context(self):
        flow = shared_flow(context_dim=6)
        x = uniform_inputs(INPUT_SHAPE)
        context = uniform_inputs((INPUT_SHAPE[0], 3, 6), seed=5)
        other_context = uniform_inputs((INPUT_SHAPE[0], 3, 6), seed=6)

        z, logdet = flow.forward_and_log_det(x, context=context)
        other_z, other_logdet = flow.forward_and_log_det(x, context=other_context)
        x_wrong_context, _ = flow.inverse_and_log_det(z, context=other_context)

        self.assertGreater(np.max(np.abs(to_numpy(z) - to_numpy(other_z))), 1e-2)
        self.assertGreater(
            np.max(np.abs(to_numpy(logdet) - to_numpy(other_logdet))), 1e-2
        )
        self.assertGreater(np.max(np.abs(to_numpy(x_wrong_context) - x)), 1e-2)

    def test_new_conditional_flow_is_identity(self):
        flow = shared_flow(perturb=False, context_dim=6)
        x = uniform_inputs(INPUT_SHAPE)
        context = uniform_inputs((INPUT_SHAPE[0], 3, 6), seed=5)

        z, logdet = flow.forward_and_log_det(x, context=context)

        self.assertAllClose(z, x, atol=1e-6, rtol=0)
        self.assertAllClose(logdet, np.zeros(INPUT_SHAPE[0]), atol=1e-5)

    def test_missing_context_raises(self):
        flow = shared_flow(context_dim=6)
        x = uniform_inputs(INPUT_SHAPE)

        with self.assertRaisesRegex(ValueError, "context"):
            flow.forward_and_log_det(x)

    def test_unexpected_context_raises(self):
        flow = shared_flow()
        x = uniform_inputs(INPUT_SHAPE)
        context = uniform_inputs((INPUT_SHAPE[0], 3, 6), seed=5)

        with self.assertRaisesRegex(ValueError, "context"):
            flow.forward_and_log_det(x, context=context)

    # --- Config and serialization --------------------------------------------

    def test_config_round_trip(self):
        flow = build_flow(context_dim=6, intermediate_dim=24, dropout=0.1)

        config = flow.get_config()
        restored = JetFlow.from_config(config)

        self.assertEqual(restored.get_config(), config)
        self.assertEqual(config["num_couplings"], 8)
        self.assertEqual(
            tuple(config["coupling_kinds"]), ("channels", "spatial")
        )
        self.assertEqual(
            tuple(config["spatial_patterns"]),
            FLOW_KWARGS["spatial_patterns"],
        )
        self.assertEqual(config["context_dim"], 6)
        self.assertEqual(config["intermediate_dim"], 24)

    def test_restored_flow_with_copied_weights_matches(self):
        flow = shared_flow()
        x = uniform_inputs(INPUT_SHAPE)
        restored = JetFlow.from_config(flow.get_config())
        restored.build(INPUT_SHAPE)

        restored.set_weights(flow.get_weights())
        z, logdet = flow.forward_and_log_det(x)
        restored_z, restored_logdet = restored.forward_and_log_det(x)

        self.assertAllClose(restored_z, z)
        self.assertAllClose(restored_logdet, logdet)

    def test_layer_behaviour(self):
        # The log-det stays float32 under mixed precision by design, which
        # the precision checks of `run_layer_test` do not allow.
        self.run_layer_test(
            cls=JetFlow,
            init_kwargs={
                "num_couplings": 2,
                "coupling_kinds": ("channels", "spatial"),
                "hidden_dim": 8,
                "num_heads": 2,
                "seed": 3,
            },
            input_data=uniform_inputs((2, 4, 4, 2)),
            expected_output_shape=((2, 4, 4, 2), (2,)),
            expected_num_trainable_weights=46,
            expected_num_non_trainable_weights=2,
            expected_num_non_trainable_variables=2,
            run_precision_checks=False,
        )

    # --- Invalid arguments ----------------------------------------------------

    def test_rejects_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "num_couplings"):
            JetFlow(num_couplings=0)
        with self.assertRaisesRegex(ValueError, "coupling_kinds"):
            JetFlow(coupling_kinds=("diagonal",))
        with self.assertRaisesRegex(ValueError, "patch_size"):
            JetFlow(patch_size=0)

    def test_rejects_odd_token_dim(self):
        flow = JetFlow(**FLOW_KWARGS)

        with self.assertRaisesRegex(ValueError, "must be even"):
            flow.build((1, 4, 4, 3))

    def test_rejects_indivisible_input(self):
        flow = JetFlow(**{**FLOW_KWARGS, "patch_size": 2})

        with self.assertRaisesRegex(ValueError, "divisible"):
            flow.build((1, 5, 4, 2))


def coupling_cases():
    cases = [{"testcase_name": "channels", "kind": "channels", "pattern": None}]
    for pattern in FLOW_KWARGS["spatial_patterns"]:
        cases.append(
            {"testcase_name": pattern, "kind": "spatial", "pattern": pattern}
        )
    return cases


class JetCouplingTest(TestCase):
    def build_coupling(self, kind, pattern, perturb=True):
        coupling = JetCoupling(
            kind=kind,
            grid_shape=(2, 2),
            spatial_pattern=pattern or "checkerboard",
            hidden_dim=16,
            num_heads=2,
            seed=7,
        )
        coupling.build((None, 4, 4))
        if perturb:
            perturb_weights(coupling, stddev=0.6)
        return coupling

    @parameterized.named_parameters(*coupling_cases())
    def test_logdet_matches_jacobian(self, kind, pattern):
        coupling = self.build_coupling(kind, pattern)
        tokens = uniform_inputs((1, 4, 4), seed=8)

        _, logdet = coupling.forward_and_log_det(tokens)
        sign, expected = jacobian_log_det(
            lambda v: coupling.forward_and_log_det(v)[0], tokens, (1, 4, 4)
        )

        self.assertGreater(abs(expected), 0.5)
        self.assertEqual(sign, 1.0)
        self.assertAllClose(
            float(to_numpy(logdet)[0]), expected, atol=1e-4, rtol=1e-3
        )

    def test_flattened_encoder_matches_keras_hub(self):
        coupling = self.build_coupling("channels", None)
        hidden = ops.convert_to_tensor(uniform_inputs((3, 4, 16), seed=10))

        for layer in coupling.transformer_layers:
            expected = to_numpy(layer(hidden))
            actual = to_numpy(coupling._encode(layer, hidden))
            self.assertGreater(np.abs(expected - to_numpy(hidden)).max(), 0.1)
            self.assertAllClose(actual, expected, atol=1e-6, rtol=1e-6)

    @parameterized.named_parameters(*coupling_cases())
    def test_split_follows_permutation(self, kind, pattern):
        coupling = self.build_coupling(kind, pattern, perturb=False)
        tokens = uniform_inputs((1, 4, 4), seed=9)
        permutation = to_numpy(coupling.permutation)

        first, second = coupling.split(tokens)
        merged = coupling.merge(first, second)

        if kind == "channels":
            expected_first = tokens[:, :, permutation[:2]]
            expected_second = tokens[:, :, permutation[2:]]
        else:
            # Each half contains two whole tokens, cut into four half tokens.
            expected_first = tokens[:, permutation[:2]].reshape(1, 4, 2)
            expected_second = tokens[:, permutation[2:]].reshape(1, 4, 2)
        self.assertAllEqual(first, expected_first)
        self.assertAllEqual(second, expected_second)
        self.assertAllEqual(merged, tokens)

    @parameterized.named_parameters(*coupling_cases())
    def test_forward_changes_only_second_half(self, kind, pattern):
        coupling = self.build_coupling(kind, pattern)
        tokens = uniform_inputs((1, 4, 4), seed=10)

        outputs, _ = coupling.forward_and_log_det(tokens)
        first, second = coupling.split(tokens)
        out_first, out_second = coupling.split(outputs)

        self.assertAllEqual(out_first, first)
        self.assertGreater(
            np.max(np.abs(to_numpy(out_second) - to_numpy(second))), 1e-2
        )

    def test_call_runs_forward_and_inverse(self):
        coupling = self.build_coupling("channels", None)
        tokens = uniform_inputs((1, 4, 4), seed=11)

        outputs, logdet = coupling(tokens)
        forward_outputs, forward_logdet = coupling.forward_and_log_det(tokens)
        restored, inverse_logdet = coupling(outputs, inverse=True)

        self.assertAllClose(outputs, forward_outputs)
        self.assertAllClose(logdet, forward_logdet)
        self.assertAllClose(restored, tokens, atol=1e-5, rtol=0)
        self.assertAllClose(inverse_logdet, -to_numpy(logdet), atol=1e-5)

    def test_spatial_patterns_on_grid(self):
        rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
        rows, cols = rows.reshape(-1), cols.reshape(-1)
        expected_first_halves = {
            "checkerboard": (rows + cols) % 2 == 0,
            "checkerboard-inv": (rows + cols) % 2 == 1,
            "vstripes": cols % 2 == 0,
            "vstripes-inv": cols % 2 == 1,
            "hstripes": rows % 2 == 0,
            "hstripes-inv": rows % 2 == 1,
        }

        for pattern, first_mask in expected_first_halves.items():
            permutation = spatial_permutation(pattern, 4, 4)
            self.assertAllEqual(
                np.sort(permutation[:8]), np.flatnonzero(first_mask)
            )
            self.assertAllEqual(
                np.sort(permutation[8:]), np.flatnonzero(~first_mask)
            )

    def test_spatial_pattern_rejects_unknown_name(self):
        with self.assertRaisesRegex(ValueError, "spatial_pattern"):
            spatial_permutation("diagonal", 4, 4)

    def test_spatial_coupling_needs_grid_shape(self):
        with self.assertRaisesRegex(ValueError, "grid_shape"):
            JetCoupling(kind="spatial")
