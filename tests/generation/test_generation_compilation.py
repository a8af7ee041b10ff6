"""Compiled generation: traced once per shape, streams kept apart."""

import keras
import numpy as np
import pytest
from jetformer_test_utils import perturb_weights
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch
from keras import ops

from keras_jetformer.generation.image_generation import extend_image_cache
from keras_jetformer.generation.image_generation import prefill_image_prompt
from keras_jetformer.models import JetFormerTextToImage

COMPILING_BACKENDS = ("jax", "tensorflow")


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.fixture(scope="module")
def task():
    keras.utils.set_random_seed(0)
    backbone = tiny_backbone()
    perturb_weights(backbone, scale=0.2)
    return JetFormerTextToImage(backbone, seed=0)


def prompts(batch_size, seed=0):
    batch = tiny_batch(batch_size, seed=seed)
    return {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]}


def count_generate_steps(task):
    """Make `task.generate_step` count the Python executions of its body."""
    calls = []
    original = type(task).generate_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(task, *args, **kwargs)

    task.generate_step = counting
    task.generate_function = None
    return calls


@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_same_shapes_do_not_retrace(task, guidance_scale):
    calls = count_generate_steps(task)
    try:
        first = task.generate(prompts(3), guidance_scale=guidance_scale, seed=1)
        traces = len(calls)
        assert traces >= 1
        # New values of the same shapes, new scalar arguments.
        second = task.generate(
            prompts(3, seed=1),
            guidance_scale=guidance_scale + 0.5 * (guidance_scale > 0),
            temperature=0.7,
            mixture_temperature=2.0,
            seed=2,
        )
        assert first.shape == second.shape
        if keras.config.backend() in COMPILING_BACKENDS:
            assert len(calls) == traces
        else:
            # Torch runs the step eagerly: one execution per call.
            assert len(calls) == 2 * traces
        # A new batch size is a new shape: compiled backends trace again.
        task.generate(prompts(2), guidance_scale=guidance_scale, seed=1)
        assert len(calls) > traces
    finally:
        del task.generate_step
        task.generate_function = None


def test_generate_function_is_reused_per_setting(task):
    task.generate_function = None
    unguided = task.make_generate_function(guided=False)
    guided = task.make_generate_function(guided=True)
    rejection = task.make_generate_function(guided=True, guidance_method="rejection")
    assert unguided is task.make_generate_function(guided=False)
    assert guided is task.make_generate_function(guided=True)
    assert len({id(unguided), id(guided), id(rejection)}) == 3


def test_unconditional_stream_never_reads_conditional_cache(task):
    """The unconditional rows of a guided batch decode as if alone."""
    transformer = task.backbone.transformer
    rng = np.random.default_rng(3)
    batch = prompts(2)
    token_ids, padding_mask = batch["token_ids"], batch["padding_mask"]
    num_tokens = transformer.num_image_tokens
    image_tokens = rng.standard_normal(
        (2, num_tokens, transformer.image_token_dim)
    ).astype("float32")

    def decode(token_ids, padding_mask, drop_prefix, image_tokens):
        hidden, cache, key_mask, positions = prefill_image_prompt(
            transformer, token_ids, padding_mask, drop_prefix
        )
        prompt_length = hidden.shape[1]
        outputs = [to_numpy(hidden[:, -1])]
        for index in range(1, num_tokens):
            step_hidden, cache = extend_image_cache(
                transformer,
                image_tokens[:, index - 1],
                cache,
                key_mask,
                positions + index - 1,
                prompt_length + index - 1,
            )
            outputs.append(to_numpy(step_hidden))
        return np.stack(outputs, axis=1)

    # The guided layout: conditional rows, then their unconditional copies.
    doubled = decode(
        np.concatenate([token_ids, token_ids]),
        np.concatenate([padding_mask, padding_mask]),
        np.array([False, False, True, True]),
        np.concatenate([image_tokens, image_tokens]),
    )
    alone = decode(token_ids, padding_mask, np.ones(2, bool), image_tokens)
    np.testing.assert_allclose(doubled[2:], alone, rtol=1e-5, atol=1e-5)

    # Other conditional prompts and image tokens leave them unchanged.
    other_ids = (token_ids + 1) % 10
    other_tokens = rng.standard_normal(image_tokens.shape).astype("float32")
    changed = decode(
        np.concatenate([other_ids, token_ids]),
        np.concatenate([np.ones_like(padding_mask), padding_mask]),
        np.array([False, False, True, True]),
        np.concatenate([other_tokens, image_tokens]),
    )
    assert not np.allclose(changed[:2], doubled[:2], atol=1e-3)
    np.testing.assert_allclose(changed[2:], doubled[2:], rtol=1e-5, atol=1e-5)
    # Without the label the text prompt no longer matters.
    np.testing.assert_allclose(alone[0, 0], alone[1, 0], rtol=1e-5, atol=1e-5)
