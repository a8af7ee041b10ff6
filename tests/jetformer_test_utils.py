"""Tiny models, batches and backend-neutral gradients for the tests."""

import keras
import numpy as np
from keras import ops

# A backbone small enough to compile and train in seconds.
TINY_BACKBONE_CONFIG = {
    "image_shape": (8, 8, 1),
    "patch_size": 2,
    "image_token_dim": 2,
    "vocabulary_size": 13,
    "num_layers": 2,
    "hidden_dim": 16,
    "intermediate_dim": 32,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_mixtures": 3,
    "flow_num_couplings": 2,
    "flow_hidden_dim": 8,
    "flow_num_layers": 1,
    "flow_num_heads": 2,
    "seed": 1,
}

TEXT_LENGTH = 4


def tiny_backbone(**overrides):
    from keras_jetformer.models import JetFormerBackbone

    return JetFormerBackbone(**{**TINY_BACKBONE_CONFIG, **overrides})


def tiny_batch(batch_size=4, seed=0, config=TINY_BACKBONE_CONFIG):
    """Preprocessed inputs: images in [-1, 1] on the 8-bit grid, text ids."""
    rng = np.random.default_rng(seed)
    height, width, channels = config["image_shape"]
    pixels = rng.integers(0, 256, (batch_size, height, width, channels))
    padding_mask = np.ones((batch_size, TEXT_LENGTH), bool)
    padding_mask[0, -1] = False
    return {
        "images": (pixels / 127.5 - 1.0).astype("float32"),
        "token_ids": rng.integers(
            0, config["vocabulary_size"] - 3, (batch_size, TEXT_LENGTH)
        ).astype("int32"),
        "padding_mask": padding_mask,
    }


def perturb_weights(model, scale=0.3, seed=0):
    """Set every trainable weight to `scale * N(0, 1)` noise."""
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        variable.assign(
            (scale * rng.standard_normal(variable.shape)).astype(
                variable.dtype
            )
        )


def gradients(loss_fn, variables):
    """Return `(loss, [d loss / d variable])` as numpy, on any backend."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        def stateless_loss(values):
            with keras.StatelessScope(state_mapping=zip(variables, values)):
                return loss_fn()

        values = [variable.value for variable in variables]
        loss, grads = jax.value_and_grad(stateless_loss)(values)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, [variable.value for variable in variables])
    else:
        for variable in variables:
            variable.value.grad = None
        loss = loss_fn()
        loss.backward()
        grads = [variable.value.grad for variable in variables]
        loss = loss.detach()
    return (
        float(ops.convert_to_numpy(loss)),
        [None if g is None else ops.convert_to_numpy(g) for g in grads],
    )
