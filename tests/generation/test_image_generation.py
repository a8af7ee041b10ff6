"""Cached image decoding and mixture sampling against independent checks."""

import keras
import numpy as np
import pytest
from jetformer_test_utils import perturb_weights
from jetformer_test_utils import tiny_backbone
from keras import ops
from scipy import stats

from keras_jetformer.generation.image_generation import extend_image_cache
from keras_jetformer.generation.image_generation import prefill_image_prompt
from keras_jetformer.generation.image_sampling import guided_gaussian
from keras_jetformer.generation.image_sampling import rejection_sample_guided
from keras_jetformer.generation.image_sampling import sample_guided_mixture
from keras_jetformer.generation.image_sampling import sample_mixture


def to_numpy(x):
    return ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def backbone():
    model = tiny_backbone()
    perturb_weights(model, scale=0.2)
    return model


def test_cached_decoding_matches_full_forward(backbone):
    transformer = backbone.transformer
    rng = np.random.default_rng(0)
    batch_size, text_length = 3, 4
    token_ids = rng.integers(0, 10, (batch_size, text_length)).astype("int32")
    # Prompts of different lengths in one batch, padded at the end.
    padding_mask = np.array(
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool
    )
    num_tokens = transformer.num_image_tokens
    image_tokens = rng.standard_normal(
        (batch_size, num_tokens, transformer.image_token_dim)
    ).astype("float32")

    # Full forward pass over [BOS, text, BOI, image].
    embeddings, input_mask = transformer.embed_sequence(
        token_ids, padding_mask, image_tokens, np.ones(batch_size, bool)
    )
    hidden = transformer.run_transformer(
        embeddings,
        transformer.causal_attention_mask(input_mask),
        transformer.positions_from_mask(input_mask),
    )
    _, full_image_hidden = transformer.split_hidden_states(
        hidden, np.ones(batch_size, bool), text_length
    )

    # Prefill the prompt, then feed one image token per step.
    prompt_hidden, cache, key_mask, next_positions = prefill_image_prompt(
        transformer, token_ids, padding_mask
    )
    prompt_length = prompt_hidden.shape[1]
    cached = [prompt_hidden[:, -1]]
    for index in range(1, num_tokens):
        step_hidden, cache = extend_image_cache(
            transformer,
            image_tokens[:, index - 1],
            cache,
            key_mask,
            next_positions + index - 1,
            prompt_length + index - 1,
        )
        cached.append(step_hidden)
    cached = np.stack([to_numpy(h) for h in cached], axis=1)
    np.testing.assert_allclose(
        cached, to_numpy(full_image_hidden), rtol=1e-5, atol=1e-5
    )

    # Each padded prompt decodes like the same prompt without padding.
    for row, length in ((1, 2), (2, 1)):
        short_hidden, *_ = prefill_image_prompt(
            transformer, token_ids[row : row + 1, :length],
            padding_mask[row : row + 1, :length],
        )
        np.testing.assert_allclose(
            to_numpy(short_hidden[:, -1]),
            to_numpy(prompt_hidden[row : row + 1, -1]),
            rtol=1e-5,
            atol=1e-5,
        )


def test_mixture_sampling_matches_component_statistics():
    seed = keras.random.SeedGenerator(1)
    count = 20000
    logits = np.log(np.array([[0.2, 0.8]], "float32")).repeat(count, 0)
    means = np.array([[[-3.0], [2.0]]], "float32").repeat(count, 0)
    scales = np.array([[[0.5], [1.0]]], "float32").repeat(count, 0)
    samples = to_numpy(
        sample_mixture(logits, means, scales, seed, temperature=0.5)
    )[:, 0]
    low = samples < -0.5
    assert abs(low.mean() - 0.2) < 0.015
    np.testing.assert_allclose(samples[low].mean(), -3.0, atol=0.03)
    np.testing.assert_allclose(samples[low].std(), 0.25, rtol=0.05)
    np.testing.assert_allclose(samples[~low].std(), 0.5, rtol=0.05)
    # A mixture temperature of 2 halves the logits: weights 1:2.
    sharpened = to_numpy(
        sample_mixture(logits, means, scales, seed, mixture_temperature=2.0)
    )[:, 0]
    assert abs((sharpened < -0.5).mean() - 1 / 3) < 0.015


def guided_log_density(x, mean_c, scale_c, mean_u, scale_u, w):
    return (1 + w) * stats.norm.logpdf(x, mean_c, scale_c) - w * stats.norm.logpdf(
        x, mean_u, scale_u
    )


def numpy_rejection_samples(mean_c, scale_c, mean_u, scale_u, w, count, rng):
    """Independent rejection sampler of the guided density (numpy)."""
    proposal_scale = 3.0 * max(scale_c, scale_u)
    grid = np.linspace(mean_c - 12, mean_c + 12, 20001)
    log_envelope = np.max(
        guided_log_density(grid, mean_c, scale_c, mean_u, scale_u, w)
        - stats.norm.logpdf(grid, mean_c, proposal_scale)
    )
    samples = []
    while len(samples) < count:
        x = rng.normal(mean_c, proposal_scale, 100000)
        log_ratio = guided_log_density(
            x, mean_c, scale_c, mean_u, scale_u, w
        ) - stats.norm.logpdf(x, mean_c, proposal_scale)
        keep = np.log(rng.uniform(size=x.shape)) < log_ratio - log_envelope
        samples.extend(x[keep].tolist())
    return np.array(samples[:count])


def test_guided_closed_form_matches_density():
    mean_c, scale_c, mean_u, scale_u, w = 1.0, 0.8, 0.0, 1.2, 3.0
    count = 6000
    shape = (count, 1)
    mean, scale, proper = guided_gaussian(
        np.full(shape, mean_c, "float32"),
        np.full(shape, scale_c, "float32"),
        np.full(shape, mean_u, "float32"),
        np.full(shape, scale_u, "float32"),
        w,
    )
    assert bool(np.all(to_numpy(proper)))
    precision = (1 + w) / scale_c**2 - w / scale_u**2
    expected_mean = ((1 + w) * mean_c / scale_c**2 - w * mean_u / scale_u**2) / (
        precision
    )
    np.testing.assert_allclose(to_numpy(mean)[0, 0], expected_mean, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(scale)[0, 0], precision**-0.5, rtol=1e-5
    )

    # Samples of the task's sampler (one component) against a numpy
    # rejection sampler of the same density.
    conditional = (
        np.zeros((count, 1), "float32"),
        np.full((count, 1, 1), mean_c, "float32"),
        np.full((count, 1, 1), scale_c, "float32"),
    )
    unconditional = (
        np.zeros((count, 1), "float32"),
        np.full((count, 1, 1), mean_u, "float32"),
        np.full((count, 1, 1), scale_u, "float32"),
    )
    samples = to_numpy(
        sample_guided_mixture(
            conditional, unconditional, w, keras.random.SeedGenerator(2)
        )
    )[:, 0]
    reference = numpy_rejection_samples(
        mean_c, scale_c, mean_u, scale_u, w, count, np.random.default_rng(0)
    )
    assert stats.ks_2samp(samples, reference).pvalue > 1e-3
    np.testing.assert_allclose(samples.mean(), expected_mean, atol=0.05)
    np.testing.assert_allclose(samples.std(), precision**-0.5, rtol=0.05)


def test_rejection_sampler_matches_proper_density():
    mean_c, scale_c, mean_u, scale_u, w = 0.5, 1.0, -0.5, 1.5, 1.0
    count = 4000
    samples, accepted = rejection_sample_guided(
        np.full((count, 1), mean_c, "float32"),
        np.full((count, 1), scale_c, "float32"),
        np.full((count, 1), mean_u, "float32"),
        np.full((count, 1), scale_u, "float32"),
        w,
        keras.random.SeedGenerator(3),
        num_proposals=200,
    )
    assert to_numpy(accepted).mean() > 0.99
    reference = numpy_rejection_samples(
        mean_c, scale_c, mean_u, scale_u, w, count, np.random.default_rng(1)
    )
    assert stats.ks_2samp(to_numpy(samples)[:, 0], reference).pvalue > 1e-3


def test_improper_guided_density_stays_finite():
    # Precision (1 + w) / s_c**2 - w / s_u**2 < 0: the density is improper.
    count = 500
    shape = (count, 1)
    _, _, proper = guided_gaussian(
        np.full(shape, 0.0, "float32"),
        np.full(shape, 2.0, "float32"),
        np.full(shape, 0.0, "float32"),
        np.full(shape, 0.5, "float32"),
        3.0,
    )
    assert not bool(np.any(to_numpy(proper)))
    conditional = (
        np.zeros((count, 1), "float32"),
        np.zeros((count, 1, 1), "float32"),
        np.full((count, 1, 1), 2.0, "float32"),
    )
    unconditional = (
        np.zeros((count, 1), "float32"),
        np.zeros((count, 1, 1), "float32"),
        np.full((count, 1, 1), 0.5, "float32"),
    )
    samples = to_numpy(
        sample_guided_mixture(
            conditional, unconditional, 3.0, keras.random.SeedGenerator(4)
        )
    )
    assert np.all(np.isfinite(samples))


def test_zero_guidance_reproduces_conditional_sampling():
    rng = np.random.default_rng(5)
    batch, components, dims = 64, 3, 4
    logits = rng.standard_normal((batch, components)).astype("float32")
    means = rng.standard_normal((batch, components, dims)).astype("float32")
    scales = rng.uniform(0.2, 1.5, (batch, components, dims)).astype("float32")
    other = (
        rng.standard_normal((batch, components)).astype("float32"),
        rng.standard_normal((batch, components, dims)).astype("float32"),
        rng.uniform(0.2, 1.5, (batch, components, dims)).astype("float32"),
    )
    conditional = to_numpy(
        sample_mixture(
            logits, means, scales, keras.random.SeedGenerator(7),
            temperature=0.8,
        )
    )
    guided = to_numpy(
        sample_guided_mixture(
            (logits, means, scales),
            other,
            0.0,
            keras.random.SeedGenerator(7),
            temperature=0.8,
        )
    )
    np.testing.assert_array_equal(conditional, guided)
