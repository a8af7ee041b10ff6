"""JetFormer training under `keras.distribution` on 8 virtual CPU devices.

The comparison runs in a subprocess (`jax_distribution_worker.py`), because
`XLA_FLAGS` must be set before JAX starts. It covers one device,
`DataParallel` over 8 devices and `ModelParallel` on a `(batch=2,
model=4)` mesh with `JetFormerBackbone.get_layout_map`.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="keras.distribution runs on the JAX backend only.",
)

WORKER = os.path.join(os.path.dirname(__file__), "jax_distribution_worker.py")
DISTRIBUTIONS = ("data_parallel", "model_parallel")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("jax_distribution") / "results.json"
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    completed = subprocess.run(
        [sys.executable, WORKER, str(output)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    with open(output) as file:
        return json.load(file)


def test_eight_devices(results):
    assert results["num_devices"] == 8


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_loss_matches_single_device(results, name):
    np.testing.assert_allclose(
        results[name]["loss"], results["single"]["loss"], atol=1e-5
    )


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_gradients_match_single_device(results, name):
    for gradient, expected in zip(
        results[name]["gradients"], results["single"]["gradients"]
    ):
        # Sharded matmuls sum their float32 terms in another order, so an
        # entry near zero can move by a small fraction of the tensor's
        # largest entry: up to 4e-6 of it in measured runs.
        expected = np.asarray(expected)
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(
            gradient, expected, rtol=1e-5, atol=3e-5 * scale
        )


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_fit_matches_single_device(results, name):
    single = results["single"]
    for metric, values in single["fit_history"].items():
        np.testing.assert_allclose(
            results[name]["fit_history"][metric], values, atol=1e-5
        )
    for weight, expected in zip(
        results[name]["fit_weights"], single["fit_weights"]
    ):
        np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-5)


def test_layout_map_shards_kernels(results):
    shardings = results["model_parallel"]["shardings"]
    sharded = {
        "transformer/token_embedding/embeddings": [None, "model"],
        "transformer/decoder_block_0/attention/query/kernel": [
            None,
            "model",
            None,
        ],
        "transformer/decoder_block_1/ffw_down/kernel": ["model", None],
        "transformer/image_head/kernel": ["model", None],
        "flow/coupling_0/position_embedding": [None, None, "model"],
        "flow/coupling_1/transformer_layer_0/feedforward_intermediate_dense/"
        "kernel": [None, "model"],
    }
    for path, spec in sharded.items():
        entry = shardings[path]
        assert entry["spec"] == spec, path
        # Each device stores a quarter of the model-axis dimension.
        axis = spec.index("model")
        assert entry["shard_shape"][axis] * 4 == entry["shape"][axis], path


def test_layout_map_replicates_small_variables(results):
    shardings = results["model_parallel"]["shardings"]
    for path in (
        "transformer/final_norm/scale",
        "transformer/image_head/bias",
        "flow/coupling_0/output_norm/gamma",
        "flow/coupling_0/permutation",
    ):
        assert shardings[path]["shard_shape"] == shardings[path]["shape"], path


def test_optimizer_state_is_sharded(results):
    # The momentum variables follow their weights' layouts.
    assert results["model_parallel"]["optimizer_shard_fraction"] < 0.5
    assert results["data_parallel"]["optimizer_shard_fraction"] == 1.0


@pytest.mark.parametrize("name", ("single", *DISTRIBUTIONS))
def test_rows_draw_different_noise(results, name):
    # Every row contains the same image. Rows 0 and 4 sit on different
    # data shards under both distributions.
    noise = np.asarray(results[name]["noise_rows"])
    assert np.abs(noise[0] - noise[4]).max() > 0.1


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_noise_matches_single_device(results, name):
    # One program draws the noise of the whole global batch.
    np.testing.assert_array_equal(
        results[name]["noise_rows"], results["single"]["noise_rows"]
    )
