"""Training under the `mixed_bfloat16` dtype policy."""

import keras
import numpy as np
import pytest
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch

from keras_jetformer.models import JetFormerTextToImage

NUM_STEPS = 8
# Largest relative gap between the per-step bits/dim losses of bfloat16 and
# float32 training from the same weights and noise. Measured gaps on the
# tiny model over 8 steps on torch are at most 0.2% (the loss is about 9
# bits/dim).
LOSS_RTOL = 0.01


def train(dtype, initial_weights=None):
    backbone = tiny_backbone(dtype=dtype)
    if initial_weights is not None:
        backbone.set_weights(initial_weights)
    task = JetFormerTextToImage(
        backbone,
        training_steps=NUM_STEPS,
        text_prefix_prob=0.5,
        noise_scale=16.0,
        seed=11,
    )
    task.compile(
        optimizer=keras.optimizers.Adam(1e-3, beta_2=0.95, global_clipnorm=1.0)
    )
    batch = tiny_batch(batch_size=4, seed=2)
    # One step per epoch, so that the history contains each step's loss.
    history = task.fit(
        batch, batch_size=4, epochs=NUM_STEPS, shuffle=False, verbose=0
    )
    return task, history.history["loss"], batch


@pytest.fixture(scope="module")
def runs():
    keras.utils.set_random_seed(0)
    float32_backbone = tiny_backbone()
    weights = float32_backbone.get_weights()
    float32_run = train("float32", weights)
    bfloat16_run = train("mixed_bfloat16", weights)
    return float32_run, bfloat16_run


def test_mixed_precision_weights_stay_float32(runs):
    _, (task, _, _) = runs
    assert task.backbone.compute_dtype == "bfloat16"
    for variable in task.backbone.trainable_variables:
        assert variable.dtype == "float32", variable.path


def test_mixed_precision_training_finite(runs):
    _, (task, losses, _) = runs
    assert np.all(np.isfinite(losses))
    for variable in task.backbone.trainable_variables:
        values = keras.ops.convert_to_numpy(variable)
        assert np.all(np.isfinite(values)), variable.path


def test_mixed_precision_objective_in_float32(runs):
    _, (task, _, batch) = runs
    loss, metrics = task.compute_objective(
        batch, step=keras.ops.convert_to_tensor(0), training=True
    )
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    # The flow's token stream and log-determinant stay in float32.
    tokens, logdet = task.backbone.encode_images(batch["images"])
    assert keras.backend.standardize_dtype(tokens.dtype) == "float32"
    assert keras.backend.standardize_dtype(logdet.dtype) == "float32"
    for name in (
        "per_example_nll_image",
        "per_example_logdet",
        "per_example_nll_text",
    ):
        dtype = keras.backend.standardize_dtype(metrics[name].dtype)
        assert dtype == "float32", name


def test_mixed_precision_loss_close_to_float32(runs):
    (_, float32_losses, _), (_, bfloat16_losses, _) = runs
    np.testing.assert_allclose(
        bfloat16_losses, float32_losses, rtol=LOSS_RTOL
    )
