"""Losses, gradients and samples stay finite on extreme inputs and weights,
and a non-finite loss stops training with an error naming the steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from jetformer_test_utils import gradients
from jetformer_test_utils import perturb_weights
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch

from keras_jetformer.models import JetFormerTextToImage
from keras_jetformer.training import NonFiniteLossError
from keras_jetformer.training import NonFiniteLossGuard

BATCH_SIZE = 4
# Largest RGB noise of the reference curriculum, in 8-bit pixel units.
MAX_NOISE_SCALE = 64.0
# Raw scales that put the mixture scales at their floor (`scale_tol`) and
# far above any token value.
RAW_SCALES = {"small": -1e6, "large": 1e6}


def make_task(dtype=None, seed=0):
    keras.utils.set_random_seed(seed)
    return JetFormerTextToImage(
        tiny_backbone(dtype=dtype),
        training_steps=100,
        text_prefix_prob=0.5,
        noise_scale=MAX_NOISE_SCALE,
        seed=seed,
    )


def batch_of(kind):
    batch = tiny_batch(batch_size=BATCH_SIZE)
    images = batch["images"]
    if kind == "black":
        batch["images"] = np.full_like(images, -1.0)
    elif kind == "white":
        batch["images"] = np.full_like(images, 1.0)
    return batch


def assert_finite_objective(task, batch, step):
    variables = task.trainable_variables

    def loss_fn():
        loss, _ = task.compute_objective(
            batch, step=keras.ops.convert_to_tensor(step), training=True
        )
        return loss

    loss, grads = gradients(loss_fn, variables)
    assert np.isfinite(loss), loss
    for variable, grad in zip(variables, grads):
        if grad is not None:
            assert np.all(np.isfinite(grad)), variable.path


@pytest.fixture(scope="module")
def float32_task():
    return make_task()


@pytest.mark.parametrize("kind", ["black", "white", "random"])
@pytest.mark.parametrize("step", [0, 100], ids=["max_noise", "no_noise"])
def test_objective_finite_on_extreme_images(float32_task, kind, step):
    # Step 0 of the curriculum has the largest noise, step 100 none.
    assert_finite_objective(float32_task, batch_of(kind), step)


@pytest.mark.parametrize("size", sorted(RAW_SCALES))
def test_objective_finite_for_extreme_mixture_scales(size):
    task = make_task(seed=1)
    head = task.backbone.transformer.image_head
    num_mixtures, token_dim = head.num_mixtures, head.token_dim
    bias = keras.ops.convert_to_numpy(head.bias).copy()
    # Layout: K mixture logits, then per component d means and d raw scales.
    components = bias[num_mixtures:].reshape(num_mixtures, 2, token_dim)
    components[:, 1, :] = RAW_SCALES[size]
    bias[num_mixtures:] = components.reshape(-1)
    head.bias.assign(bias)
    head.kernel.assign(np.zeros(head.kernel.shape, "float32"))
    for kind in ("black", "random"):
        assert_finite_objective(task, batch_of(kind), step=0)


@pytest.fixture(scope="module")
def bfloat16_task():
    return make_task(dtype="mixed_bfloat16", seed=2)


@pytest.mark.parametrize("kind", ["black", "white", "random"])
def test_objective_finite_in_mixed_bfloat16(bfloat16_task, kind):
    assert bfloat16_task.backbone.compute_dtype == "bfloat16"
    assert_finite_objective(bfloat16_task, batch_of(kind), step=0)


@pytest.fixture(scope="module")
def perturbed_backbone():
    keras.utils.set_random_seed(3)
    backbone = tiny_backbone()
    # Random weights of this size make the couplings' scales far from 1.
    perturb_weights(backbone, scale=1.0, seed=3)
    return backbone


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_flow_inverse_finite_for_hot_latents(perturbed_backbone, temperature):
    backbone = perturbed_backbone
    rng = np.random.default_rng(3)
    latents = temperature * rng.standard_normal(
        (64, backbone.num_image_tokens, backbone.token_dim)
    )
    images = keras.ops.convert_to_numpy(
        backbone.decode_images(latents.astype("float32"))
    )
    assert np.all(np.isfinite(images))


def test_generation_finite_at_temperature_1_5():
    task = make_task(seed=4)
    perturb_weights(task.backbone, scale=0.3, seed=4)
    batch = tiny_batch(batch_size=2)
    images = task.generate_step(
        keras.ops.convert_to_tensor(batch["token_ids"]),
        keras.ops.convert_to_tensor(batch["padding_mask"]),
        guidance_scale=keras.ops.convert_to_tensor(3.0),
        temperature=keras.ops.convert_to_tensor(1.5),
        mixture_temperature=keras.ops.convert_to_tensor(1.5),
    )
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(images)))


def nan_at_step(step, num_steps=4, batch_size=2):
    """A dataset whose `step`-th batch (from 1) has NaN images."""
    batch = tiny_batch(batch_size=num_steps * batch_size)
    rows = slice((step - 1) * batch_size, step * batch_size)
    batch["images"][rows] = np.nan
    return tf.data.Dataset.from_tensor_slices(batch).batch(batch_size)


def test_non_finite_loss_stops_training_with_step_range():
    task = make_task(seed=5)
    task.compile()
    with pytest.raises(
        NonFiniteLossError, match=r"between 3 and 4 \(epoch 1\)"
    ):
        task.fit(
            nan_at_step(3),
            epochs=2,
            callbacks=[NonFiniteLossGuard(check_every=2)],
            verbose=0,
        )
    # The model is usable after the error, also on JAX, and its weights
    # are now NaN, so the default guard stops the next run at its epoch
    # end: steps 5 to 8 continue the count of the first run.
    assert keras.ops.convert_to_numpy(task.optimizer.iterations) == 4
    with pytest.raises(NonFiniteLossError, match="between 5 and 8"):
        task.fit(nan_at_step(1), epochs=1, verbose=0)


def test_guard_rejects_zero_check_every():
    with pytest.raises(ValueError, match="Received: check_every=0"):
        NonFiniteLossGuard(check_every=0)

