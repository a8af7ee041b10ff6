"""Autoregressive text-to-image decoding with a key/value cache.

Dimension legend: B batch (2B with guidance: conditional rows first, then
their unconditional copies), P prompt length `[BOS, text, BOI]`, N image
tokens, d modelled dims, S = P + N - 1 cache length.

The prompt is prefilled in one call; then one image token per step is
sampled, embedded and appended. Padding inside the prompt stays in the cache
but is masked as a key, and rotary positions continue from each prompt's
number of valid tokens, so a padded prompt decodes exactly like the same
prompt without padding.
"""

from keras import ops

from keras_jetformer.generation.image_sampling import sample_guided_mixture
from keras_jetformer.generation.image_sampling import sample_mixture
from keras_jetformer.generation.loops import stateful_fori_loop


def prefill_image_prompt(transformer, token_ids, padding_mask, drop_prefix=None):
    """Embed `[BOS, text, BOI]` prompts and run them into a fresh cache.

    Returns `(hidden_states [B, P, E], cache, key_mask [B, S],
    next_positions [B])`; the last hidden state predicts image token 0.
    """
    batch_size = ops.shape(token_ids)[0]
    text_first = ops.ones((batch_size,), dtype="bool")
    no_image = ops.zeros((batch_size, 0, transformer.image_token_dim))
    embeddings, input_mask = transformer.embed_sequence(
        token_ids,
        padding_mask,
        no_image,
        text_first,
        drop_prefix=drop_prefix,
        drop_last=False,
    )
    prompt_length = embeddings.shape[1]
    num_image_tokens = transformer.num_image_tokens
    cache_length = prompt_length + num_image_tokens - 1
    block = transformer.decoder_blocks[0]
    cache = ops.zeros(
        (
            batch_size,
            transformer.num_layers,
            2,
            cache_length,
            block.num_key_value_heads,
            block.head_dim,
        ),
        dtype=transformer.compute_dtype,
    )
    # Generated tokens are always valid keys once written.
    key_mask = ops.concatenate(
        [input_mask, ops.ones((batch_size, num_image_tokens - 1), "bool")],
        axis=1,
    )
    slots = ops.arange(cache_length)
    causal = slots[None, :] <= ops.arange(prompt_length)[:, None]
    attention_mask = ops.logical_and(causal[None], key_mask[:, None, :])
    positions = transformer.positions_from_mask(input_mask)
    hidden_states, cache = transformer.run_transformer(
        embeddings, attention_mask, positions, cache=cache, cache_update_index=0
    )
    next_positions = ops.sum(ops.cast(input_mask, "int32"), axis=1)
    return hidden_states, cache, key_mask, next_positions


def extend_image_cache(
    transformer, image_tokens, cache, key_mask, positions, cache_index
):
    """Append one image token `[B, d]` per row; return `(hidden [B, E], cache)`.

    `cache_index` is the cache slot written and `positions` `[B]` the rotary
    positions of the new tokens.
    """
    embeddings = transformer.image_embedding(image_tokens[:, None, :])
    slots = ops.arange(ops.shape(key_mask)[1])
    attention_mask = ops.logical_and(key_mask, slots[None, :] <= cache_index)
    hidden_states, cache = transformer.run_transformer(
        embeddings,
        attention_mask[:, None, :],
        positions[:, None],
        cache=cache,
        cache_update_index=cache_index,
    )
    return hidden_states[:, 0], cache


def generate_image_tokens(
    transformer,
    token_ids,
    padding_mask,
    seed_generator,
    guidance_scale=None,
    temperature=1.0,
    mixture_temperature=1.0,
    guidance_method="closed_form",
    read_only_variables=(),
):
    """Sample the modelled image tokens `[B, N, d]` for text prompts.

    Args:
        transformer: a `JetFormerTransformer`.
        token_ids: `[B, T]` prompt ids; `padding_mask` `[B, T]`.
        seed_generator: `keras.random.SeedGenerator` for all draws.
        guidance_scale: float or scalar tensor. Classifier-free guidance
            weight `w`; `None` runs the conditional stream alone.
        temperature: multiplier of the component standard deviations.
        mixture_temperature: divisor of the mixture logits.
        guidance_method: `"closed_form"` or `"rejection"`, see
            `sample_guided_mixture`.
        read_only_variables: variables the decoding loop reads (the model's
            weights); needed on JAX, see `stateful_fori_loop`.
    """
    guided = guidance_scale is not None
    batch_size = ops.shape(token_ids)[0]
    drop_prefix = None
    if guided:
        token_ids = ops.concatenate([token_ids, token_ids], axis=0)
        padding_mask = ops.concatenate([padding_mask, padding_mask], axis=0)
        drop_prefix = ops.concatenate(
            [
                ops.zeros((batch_size,), "bool"),
                ops.ones((batch_size,), "bool"),
            ],
            axis=0,
        )
    head = transformer.image_head

    def sample_next(hidden_states):
        mixture = head.mixture(head(hidden_states))
        if not guided:
            return sample_mixture(
                *mixture,
                seed=seed_generator,
                temperature=temperature,
                mixture_temperature=mixture_temperature,
            )
        conditional = [part[:batch_size] for part in mixture]
        unconditional = [part[batch_size:] for part in mixture]
        tokens = sample_guided_mixture(
            conditional,
            unconditional,
            guidance_scale,
            seed=seed_generator,
            temperature=temperature,
            mixture_temperature=mixture_temperature,
            method=guidance_method,
        )
        # Both streams continue with the guided token.
        return ops.concatenate([tokens, tokens], axis=0)

    hidden_states, cache, key_mask, next_positions = prefill_image_prompt(
        transformer, token_ids, padding_mask, drop_prefix
    )
    prompt_length = hidden_states.shape[1]
    num_image_tokens = transformer.num_image_tokens
    first_token = sample_next(hidden_states[:, -1])
    image_tokens = ops.zeros(
        (ops.shape(first_token)[0], num_image_tokens, transformer.image_token_dim),
        dtype=first_token.dtype,
    )
    image_tokens = ops.slice_update(image_tokens, [0, 0, 0], first_token[:, None])

    def step(index, carry):
        image_tokens, cache, previous_token = carry
        hidden, cache = extend_image_cache(
            transformer,
            previous_token,
            cache,
            key_mask,
            next_positions + index - 1,
            prompt_length + index - 1,
        )
        token = ops.cast(sample_next(hidden), image_tokens.dtype)
        image_tokens = ops.slice_update(
            image_tokens, [0, index, 0], token[:, None]
        )
        return image_tokens, cache, token

    image_tokens, _, _ = stateful_fori_loop(
        1,
        num_image_tokens,
        step,
        (image_tokens, cache, first_token),
        stateful_variables=[seed_generator.state],
        read_only_variables=read_only_variables,
    )
    return image_tokens[:batch_size]
