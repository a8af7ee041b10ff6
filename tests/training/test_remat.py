"""Rematerialization of the flow couplings and the transformer blocks."""

import keras
import numpy as np
import pytest
from jetformer_test_utils import gradients
from jetformer_test_utils import perturb_weights
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import TINY_BACKBONE_CONFIG
from jetformer_test_utils import tiny_batch

from keras_jetformer.layers import JetFlow
from keras_jetformer.models import JetFormerBackbone
from keras_jetformer.models import JetFormerTextToImage
from keras_jetformer.training.objective import draw_training_noise
from keras_jetformer.training.objective import jetformer_objective


@pytest.fixture(scope="module")
def backbones():
    plain = tiny_backbone()
    perturb_weights(plain, scale=0.2, seed=3)
    remat = tiny_backbone(remat=True)
    remat.set_weights(plain.get_weights())
    return plain, remat


def objective_gradients(backbone, batch, draws):
    def loss_fn():
        loss, _ = jetformer_objective(
            backbone, batch, draws, noise_scale=8.0, training=True
        )
        return loss

    return gradients(loss_fn, backbone.trainable_variables)


def test_remat_same_loss_and_gradients(backbones):
    plain, remat = backbones
    batch = tiny_batch(batch_size=4, seed=5)
    draws = draw_training_noise(
        keras.random.SeedGenerator(7),
        images_shape=batch["images"].shape,
        num_image_tokens=plain.num_image_tokens,
        image_token_dim=plain.image_token_dim,
        text_prefix_prob=0.5,
        input_noise_std=0.3,
        label_drop_rate=0.1,
        training=True,
    )
    draws = {name: keras.ops.convert_to_numpy(x) for name, x in draws.items()}
    plain_loss, plain_grads = objective_gradients(plain, batch, draws)
    remat_loss, remat_grads = objective_gradients(remat, batch, draws)

    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert len(remat_grads) == len(plain_grads)
    for variable, expected, actual in zip(
        plain.trainable_variables, plain_grads, remat_grads
    ):
        assert actual is not None, variable.path
        np.testing.assert_allclose(
            actual, expected, rtol=1e-5, atol=1e-5, err_msg=variable.path
        )


def test_remat_kept_in_config(backbones):
    _, remat = backbones
    config = remat.get_config()
    assert config["remat"] is True
    restored = JetFormerBackbone.from_config(config)
    assert restored.remat
    assert restored.flow.remat
    assert restored.transformer.remat


def test_remat_rejects_dropout():
    with pytest.raises(ValueError, match="requires `dropout=0`"):
        tiny_backbone(remat=True, dropout=0.1)
    with pytest.raises(ValueError, match="flow_dropout=0.1"):
        tiny_backbone(remat=True, flow_dropout=0.1)


def test_remat_compiled_training_matches():
    # Two steps of `fit` from the same weights and noise: the second step's
    # loss depends on the first step's gradients, taken inside the compiled
    # step (a jax.custom_vjp, tf.recompute_grad or torch checkpointing).
    plain = tiny_backbone()
    remat = tiny_backbone(remat=True)
    remat.set_weights(plain.get_weights())
    batch = tiny_batch(batch_size=4, seed=6)
    losses = []
    for backbone in (plain, remat):
        task = JetFormerTextToImage(
            backbone, training_steps=4, text_prefix_prob=0.5, seed=2
        )
        task.compile(optimizer="adam")
        history = task.fit(
            batch, batch_size=4, epochs=2, shuffle=False, verbose=0
        )
        losses.append(history.history["loss"])
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def conditional_flow_gradients(remat):
    flow = JetFlow(
        num_couplings=4,
        coupling_kinds=("channels", "spatial"),
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        context_dim=6,
        seed=3,
        remat=remat,
    )
    flow.build((2, 4, 4, 4))
    perturb_weights(flow, scale=0.3, seed=4)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (2, 4, 4, 4)).astype("float32")
    # A variable, so that `gradients` also returns d loss / d context.
    context = keras.Variable(
        rng.uniform(-1, 1, (2, 3, 6)).astype("float32"), name="context"
    )

    def loss_fn():
        z, logdet = flow.forward_and_log_det(x, context=context.value)
        return keras.ops.sum(z**2) - keras.ops.sum(logdet)

    return gradients(loss_fn, [*flow.trainable_variables, context])


def test_remat_conditional_flow_gradients():
    plain_loss, plain_grads = conditional_flow_gradients(remat=False)
    remat_loss, remat_grads = conditional_flow_gradients(remat=True)

    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5)
    assert len(remat_grads) == len(plain_grads)
    # The last gradient is the context's.
    assert np.abs(plain_grads[-1]).max() > 0
    for expected, actual in zip(plain_grads, remat_grads):
        assert actual is not None
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def compiled_step_temp_bytes(remat, batch):
    import jax

    # Wide enough that activations, not weights, fill the step's buffers.
    backbone = tiny_backbone(
        remat=remat,
        flow_num_couplings=4,
        flow_hidden_dim=32,
        flow_num_layers=2,
        hidden_dim=32,
        intermediate_dim=128,
        num_layers=4,
    )
    task = JetFormerTextToImage(backbone, training_steps=4, seed=2)
    task.compile(optimizer="adam")
    task.optimizer.build(task.trainable_variables)
    state = (
        [v.value for v in task.trainable_variables],
        [v.value for v in task.non_trainable_variables],
        [v.value for v in task.optimizer.variables],
        [v.value for v in task.metrics_variables],
    )
    step = jax.jit(task.train_step).lower(state, (batch,)).compile()
    return step.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="reads XLA's buffer sizes of a jax-compiled train step",
)
def test_remat_lowers_compiled_jax_memory():
    # XLA's CPU compiler merges `jax.checkpoint`'s recomputation into the
    # forward pass, so plain `keras.remat` would leave this ratio near 1.
    batch = tiny_batch(batch_size=64, seed=0, config=TINY_BACKBONE_CONFIG)
    plain_bytes = compiled_step_temp_bytes(False, batch)
    remat_bytes = compiled_step_temp_bytes(True, batch)
    assert remat_bytes < 0.7 * plain_bytes, (remat_bytes, plain_bytes)
