"""The JetFormer training objective as a pure function of explicit draws.

Dimension legend: B batch, H, W, C image height, width and channels, N image
tokens, d modelled dims per token, T text length.

Everything random in one training step is an argument here (the `draws`
dict), so the same function reproduces the reference implementation exactly
when given its draws, and `draw_training_noise` makes fresh draws from seed
generators inside compiled training steps.

Per example, in bits per dimension (base 2, per subpixel H * W * C):

    nll_image_tokens = (-sum_tokens log GMM(z[:d]) - sum log N(z[d:]; 0, 1))
                       / (H * W * C) / ln 2
    logdet_bpd       = (logdet / (H * W * C) - ln 127.5) / ln 2
    nll_image        = nll_image_tokens - logdet_bpd

`- ln 127.5` converts the density of images on the [-1, 1] scale to 8-bit
pixel units, so that the number compares with published bits per dimension.
"""

import math

import keras
from keras import ops

from keras_jetformer.layers.gaussian_mixture import normal_log_prob

# Pixel values of an 8-bit image on the [-1, 1] scale are k / 127.5 - 1.
PIXEL_HALF_RANGE = 127.5


def noise_curriculum(step, total_steps, noise_max, noise_min):
    """Cosine curriculum of the RGB noise standard deviation.

    `noise_min + (noise_max - noise_min) * (1 + cos(pi * step / total_steps))
    / 2`, in 8-bit pixel units; progress is clipped to [0, 1]. With
    `total_steps=None` the curriculum is over and `noise_min` is returned.
    """
    if total_steps is None:
        return ops.convert_to_tensor(noise_min, "float32")
    progress = ops.cast(step, "float32") / float(total_steps)
    progress = ops.clip(progress, 0.0, 1.0)
    cosine = (1.0 + ops.cos(math.pi * progress)) / 2.0
    return noise_min + (noise_max - noise_min) * cosine


def add_rgb_noise(images, noise_scale, rgb_noise):
    """Add rounded Gaussian noise in 8-bit pixel units to `[-1, 1]` images.

    The image is mapped to [0, 255] and rounded, `noise_scale * rgb_noise`
    is added and the sum rounded again (half to even), as if the noise had
    been added to the uint8 image before scaling. Nothing is clipped.

    Args:
        images: `[B, H, W, C]` float in [-1, 1].
        noise_scale: scalar or `[B]` standard deviation in pixel units.
        rgb_noise: `[B, H, W, C]` standard normal draws.
    """
    noise_scale = ops.cast(noise_scale, "float32")
    if len(noise_scale.shape) == 1:
        noise_scale = noise_scale[:, None, None, None]
    pixels = ops.round((ops.cast(images, "float32") + 1.0) * PIXEL_HALF_RANGE)
    pixels = ops.round(pixels + noise_scale * rgb_noise)
    return pixels / PIXEL_HALF_RANGE - 1.0


def bits_per_dim(gmm_log_prob, factored_tokens, logdet, num_subpixels):
    """Per-example image NLL in bits per subpixel.

    Args:
        gmm_log_prob: `[B, N]` log densities (nats) of the modelled tokens.
        factored_tokens: `[B, N, D - d]` factored-out flow outputs.
        logdet: `[B]` flow log-determinant (nats, [-1, 1] image scale).
        num_subpixels: int, `H * W * C`.

    Returns:
        `(nll_image, nll_image_tokens, logdet_bpd)`, each `[B]`.
    """
    factored_nll = -ops.sum(
        normal_log_prob(ops.cast(factored_tokens, "float32"), 0.0, 1.0),
        axis=(1, 2),
    )
    nll_image_tokens = (-ops.sum(gmm_log_prob, axis=1) + factored_nll) / (
        num_subpixels * math.log(2.0)
    )
    logdet_bpd = (logdet / num_subpixels - math.log(PIXEL_HALF_RANGE)) / math.log(
        2.0
    )
    return nll_image_tokens - logdet_bpd, nll_image_tokens, logdet_bpd


def text_log_probs(text_logits, token_ids):
    """`log p(token)` `[B, T]` under categorical `text_logits` `[B, T, V]`."""
    log_probs = ops.log_softmax(ops.cast(text_logits, "float32"), axis=-1)
    one_hot = ops.one_hot(token_ids, ops.shape(text_logits)[-1])
    return ops.sum(log_probs * one_hot, axis=-1)


def masked_mean(values, mask):
    """Mean of `values` where `mask`; NaN when nothing is selected."""
    mask = ops.cast(mask, "float32")
    return ops.sum(values * mask) / ops.sum(mask)


def draw_training_noise(
    seed_generator,
    images_shape,
    num_image_tokens,
    image_token_dim,
    text_prefix_prob,
    input_noise_std,
    label_drop_rate,
    training,
):
    """Draw every random input of one objective evaluation.

    Returns the `draws` dict of `jetformer_objective`: `text_first_mask`
    `[B]`, `dequantization_noise` `[B, H, W, C]` uniform in
    `[0, 1 / 127.5)`, and in training also `rgb_noise` `[B, H, W, C]`,
    `input_noise_std` `[B]` uniform in `[0, input_noise_std)`,
    `input_noise` `[B, N, d]` and `drop_labels` `[B]`.
    """
    batch_size = images_shape[0]
    draws = {
        "text_first_mask": keras.random.uniform(
            (batch_size,), seed=seed_generator
        )
        < text_prefix_prob,
        "dequantization_noise": keras.random.uniform(
            images_shape, maxval=1.0 / PIXEL_HALF_RANGE, seed=seed_generator
        ),
    }
    if training:
        draws["rgb_noise"] = keras.random.normal(
            images_shape, seed=seed_generator
        )
        draws["input_noise_std"] = keras.random.uniform(
            (batch_size,), maxval=input_noise_std, seed=seed_generator
        )
        draws["input_noise"] = keras.random.normal(
            (batch_size, num_image_tokens, image_token_dim),
            seed=seed_generator,
        )
        draws["drop_labels"] = (
            keras.random.uniform((batch_size,), seed=seed_generator)
            < label_drop_rate
        )
    return draws


def jetformer_objective(
    backbone,
    inputs,
    draws,
    noise_scale=None,
    text_loss_weight=1.0,
    loss_on_prefix=False,
    rgb_noise_on_image_prefix=True,
    stop_flow_gradient_on_prefix=True,
    training=False,
    return_intermediates=False,
):
    """Compute the JetFormer loss and metrics for one batch.

    Training mode (`noise_scale` given) applies, in order: the RGB noise
    curriculum, dequantization noise, the flow, latent input noise on
    text-first rows, NOLABEL replacement of dropped text prefixes, and a
    stop-gradient into the flow on image-first rows. Evaluation mode
    (`noise_scale=None`) keeps only the dequantization noise and the random
    order.

    Args:
        backbone: a `JetFormerBackbone`.
        inputs: dict with `"images"` `[B, H, W, C]` float in [-1, 1],
            `"token_ids"` `[B, T]`, `"padding_mask"` `[B, T]` and optionally
            `"loss_mask"` `[B, T]` (defaults to `padding_mask`).
        draws: dict from `draw_training_noise` (or the reference's draws).
        noise_scale: scalar RGB noise std in pixel units, or None for no
            curriculum noise.
        text_loss_weight: float. Weight of the text NLL in the loss.
        loss_on_prefix: bool. Also score the prefix modality.
        rgb_noise_on_image_prefix: bool. Apply the RGB noise to image-first
            rows too.
        stop_flow_gradient_on_prefix: bool. No flow gradient from
            image-first rows.
        training: bool. Forwarded to dropout; also enables the latent input
            noise and the label drop when their draws are present.
        return_intermediates: bool. Also return the intermediate tensors.

    Returns:
        `(loss, metrics)` or `(loss, metrics, intermediates)`. `metrics`
        holds batch means: `nll_image`, `nll_image_tokens`, `logdet`,
        `nll_text`, `nll_text_prefix`, `nll_text_suffix`,
        `nll_image_prefix`, `nll_image_suffix` (NaN when no row qualifies),
        and the per-example values under `per_example_*` keys with their
        selection masks.
    """
    images = ops.cast(inputs["images"], "float32")
    token_ids = ops.cast(inputs["token_ids"], "int32")
    padding_mask = ops.cast(inputs["padding_mask"], "bool")
    loss_mask = ops.cast(inputs.get("loss_mask", padding_mask), "bool")
    text_first_mask = ops.cast(draws["text_first_mask"], "bool")
    image_first_mask = ops.logical_not(text_first_mask)
    intermediates = {}

    # 1. RGB noise curriculum, in 8-bit pixel units.
    if noise_scale is not None and "rgb_noise" in draws:
        row_noise_scale = ops.cast(noise_scale, "float32")
        if not rgb_noise_on_image_prefix:
            row_noise_scale = ops.where(text_first_mask, row_noise_scale, 0.0)
        images = add_rgb_noise(images, row_noise_scale, draws["rgb_noise"])
    intermediates["images_noised"] = images

    # 2. Uniform dequantization noise on the [-1, 1] scale.
    images = images + draws["dequantization_noise"]
    intermediates["images_dequantized"] = images

    # 3. The flow; split modelled and factored-out dims.
    image_tokens, logdet = backbone.encode_images(images, training=training)
    modelled_tokens, factored_tokens = backbone.split_image_tokens(image_tokens)
    intermediates["flow_tokens"] = image_tokens
    intermediates["flow_logdet"] = logdet

    # 4. Latent input noise on text-first rows. The noisy tokens are both the
    # transformer's input and the mixture's target, as in the reference.
    if training and "input_noise" in draws:
        noise_std = ops.where(text_first_mask, draws["input_noise_std"], 0.0)
        modelled_tokens = modelled_tokens + (
            ops.reshape(noise_std, (-1, 1, 1)) * draws["input_noise"]
        )

    # 5. Classifier-free guidance: drop text prefixes to NOLABEL.
    drop_prefix = None
    if training and "drop_labels" in draws:
        drop_prefix = ops.logical_and(
            ops.cast(draws["drop_labels"], "bool"), text_first_mask
        )
    not_dropped = (
        ops.ones_like(text_first_mask)
        if drop_prefix is None
        else ops.logical_not(drop_prefix)
    )
    intermediates["model_in_tokens"] = modelled_tokens

    # 6. When the image is the prefix, the flow only encodes it: no gradient.
    if stop_flow_gradient_on_prefix:
        modelled_tokens = ops.where(
            text_first_mask[:, None, None],
            modelled_tokens,
            ops.stop_gradient(modelled_tokens),
        )

    # 7. Transformer and heads.
    transformer = backbone.transformer
    embeddings, input_mask = transformer.embed_sequence(
        token_ids,
        padding_mask,
        modelled_tokens,
        text_first_mask,
        drop_prefix=drop_prefix,
    )
    hidden_states = transformer.run_transformer(
        embeddings,
        transformer.causal_attention_mask(input_mask),
        transformer.positions_from_mask(input_mask),
        training=training,
    )
    text_hidden_states, image_hidden_states = transformer.split_hidden_states(
        hidden_states, text_first_mask, token_ids.shape[1]
    )
    text_logits = transformer.text_logits(text_hidden_states)
    image_logits = transformer.image_head(image_hidden_states)
    gmm_log_prob = transformer.image_head.log_prob(
        image_logits, modelled_tokens
    )
    text_log_prob = text_log_probs(text_logits, token_ids)
    intermediates.update(
        {
            "seq_embeddings": embeddings,
            "seq_input_mask": input_mask,
            "hidden_states": hidden_states,
            "text_prelogits": text_hidden_states,
            "image_prelogits": image_hidden_states,
            "text_logits": text_logits,
            "image_logits": image_logits,
            "gmm_logprob": gmm_log_prob,
            "text_logprob": text_log_prob,
        }
    )

    # 8. Negative log-likelihoods per example.
    loss_weights = ops.cast(loss_mask, "float32")
    # An example without loss positions scores 0 instead of NaN, so that it
    # cannot poison the gradient through the `where` below.
    nll_text = -ops.sum(text_log_prob * loss_weights, axis=1) / ops.maximum(
        ops.sum(loss_weights, axis=1), 1.0
    )
    num_subpixels = math.prod(backbone.image_shape)
    nll_image, nll_image_tokens, logdet_bpd = bits_per_dim(
        gmm_log_prob, factored_tokens, logdet, num_subpixels
    )

    # 9. Loss: each row scores its suffix modality (and optionally prefix).
    text_prefix_kept = ops.logical_and(text_first_mask, not_dropped)
    image_prefix_kept = ops.logical_and(image_first_mask, not_dropped)
    if loss_on_prefix:
        text_rows = ops.logical_or(text_prefix_kept, image_first_mask)
        image_rows = ops.logical_or(image_prefix_kept, text_first_mask)
        loss = text_loss_weight * masked_mean(
            nll_text, text_rows
        ) + masked_mean(nll_image, image_rows)
        logdet_rows = ops.ones_like(text_first_mask)
    else:
        text_rows, image_rows = image_first_mask, text_first_mask
        per_example_loss = ops.where(
            text_first_mask, nll_image, nll_text * text_loss_weight
        )
        loss = ops.mean(per_example_loss)
        logdet_rows = text_first_mask

    metrics = {
        "loss": loss,
        "nll_image": masked_mean(nll_image, image_rows),
        "nll_image_tokens": masked_mean(nll_image_tokens, image_rows),
        "logdet": masked_mean(logdet_bpd, logdet_rows),
        "nll_text": masked_mean(nll_text, text_rows),
        "nll_text_prefix": masked_mean(nll_text, text_prefix_kept),
        "nll_text_suffix": masked_mean(nll_text, image_first_mask),
        "nll_image_prefix": masked_mean(nll_image, image_prefix_kept),
        "nll_image_suffix": masked_mean(nll_image, text_first_mask),
        "per_example_nll_image": nll_image,
        "per_example_nll_image_tokens": nll_image_tokens,
        "per_example_logdet": logdet_bpd,
        "per_example_nll_text": nll_text,
        "image_rows": image_rows,
        "text_rows": text_rows,
        "logdet_rows": logdet_rows,
    }
    if drop_prefix is not None:
        intermediates["drop_prefix"] = drop_prefix
    if return_intermediates:
        return loss, metrics, intermediates
    return loss, metrics
