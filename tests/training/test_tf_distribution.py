"""JetFormer training under `tf.distribute.MirroredStrategy` on 2 CPUs.

The comparison runs in a subprocess (`tf_distribution_worker.py`), because
the logical devices must be configured before TensorFlow starts.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="tf.distribute runs on the TensorFlow backend only.",
)

WORKER = os.path.join(os.path.dirname(__file__), "tf_distribution_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("tf_distribution") / "results.json"
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow"}
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


def test_two_replicas_in_sync(results):
    assert results["num_replicas"] == 2


def test_noiseless_fit_matches_single_device(results):
    single = results["single_noiseless"]
    mirrored = results["mirrored_noiseless"]
    for name in ("loss", "nll_image", "nll_text", "logdet"):
        np.testing.assert_allclose(
            mirrored["history"][name], single["history"][name], atol=1e-5
        )
    for mirrored_weight, single_weight in zip(
        mirrored["weights"], single["weights"]
    ):
        np.testing.assert_allclose(mirrored_weight, single_weight, atol=1e-5)


def test_curriculum_follows_global_step(results):
    mirrored = results["mirrored_noisy"]
    # One optimizer step per global batch, not one per replica.
    assert mirrored["iterations"] == 3
    # The last of 3 steps runs at step 2 of a 10-step curriculum, 64 -> 0.
    expected = 64.0 * (1.0 + math.cos(math.pi * 2 / 10)) / 2.0
    np.testing.assert_allclose(
        mirrored["history"]["noise_scale"], [expected], rtol=1e-6
    )


def test_replicas_draw_different_noise(results):
    first, second = (np.asarray(noise) for noise in results["replica_noise"])
    assert first.shape == second.shape
    assert np.abs(first - second).max() > 0.1


def test_shared_seed_state_alone_repeats_noise(results):
    # Without folding in the replica id, the mirrored seed state gives every
    # replica the same draws: the case that `replica_seed_generator` fixes.
    first, second = (
        np.asarray(noise) for noise in results["replica_noise_shared_seed"]
    )
    np.testing.assert_array_equal(first, second)


def test_noisy_fit_is_finite(results):
    for name, values in results["mirrored_noisy"]["history"].items():
        assert np.all(np.isfinite(values)), name
