"""Sampling soft image tokens from the Gaussian-mixture head.

Dimension legend: B batch, K mixture components, d token dims, P proposals
of the rejection sampler.

Temperatures: `temperature` multiplies every component's standard deviation
(the reference implementation's `temperature`); `mixture_temperature`
divides the mixture logits, so the reference's `temperature_probs`
multiplier is `1 / mixture_temperature`.

Classifier-free guidance samples, for the component drawn from the
conditional mixture, the per-dimension density proportional to
`p_c(x)**(1 + w) / p_u(x)**w`. With Gaussians `N(m_c, s_c)` and
`N(m_u, s_u)` its log is quadratic with precision
`(1 + w) / s_c**2 - w / s_u**2`: a Gaussian when that is positive (sampled
in closed form), an improper density otherwise.
"""

import math

import keras
from keras import ops

from keras_jetformer.generation.loops import stateful_cond
from keras_jetformer.layers.gaussian_mixture import normal_log_prob

GUIDANCE_METHODS = ("closed_form", "rejection")


def choose_components(mixture_logits, seed, mixture_temperature=1.0):
    """Draw one component index `[B]` per row of `mixture_logits` `[B, K]`."""
    logits = ops.cast(mixture_logits, "float32") / mixture_temperature
    return ops.cast(keras.random.categorical(logits, 1, seed=seed)[:, 0], "int32")


def select_component(values, components):
    """Pick `values[b, components[b]]` from `[B, K, d]`: `[B, d]`."""
    one_hot = ops.one_hot(components, ops.shape(values)[1], dtype=values.dtype)
    return ops.sum(values * one_hot[:, :, None], axis=1)


def sample_mixture(
    mixture_logits,
    means,
    scales,
    seed,
    temperature=1.0,
    mixture_temperature=1.0,
):
    """Draw tokens `[B, d]` from a diagonal Gaussian mixture."""
    means = ops.cast(means, "float32")
    scales = ops.cast(scales, "float32")
    components = choose_components(mixture_logits, seed, mixture_temperature)
    mean = select_component(means, components)
    scale = select_component(scales, components) * temperature
    return mean + scale * keras.random.normal(ops.shape(mean), seed=seed)


def guided_gaussian(mean_c, scale_c, mean_u, scale_u, guidance_scale):
    """Mean, std and validity of the guided per-dimension density.

    With `r = (s_c / s_u)**2` the precision relative to the conditional one
    is `1 + w * (1 - r)`, the mean is `m_c + w * r * (m_c - m_u) / (1 + w *
    (1 - r))` and the std `s_c / sqrt(1 + w * (1 - r))`. Written this way
    `w = 0` gives the conditional Gaussian bit for bit. Returns `(mean,
    scale, proper)`; where `proper` is False the guided density is improper
    and `mean`/`scale` are placeholders.
    """
    mean_c, scale_c, mean_u, scale_u = [
        ops.cast(x, "float32") for x in (mean_c, scale_c, mean_u, scale_u)
    ]
    w = guidance_scale
    ratio = ops.square(scale_c / scale_u)
    relative_precision = 1.0 + w * (1.0 - ratio)
    proper = relative_precision > 0
    safe_precision = ops.where(proper, relative_precision, 1.0)
    mean = mean_c + w * ratio * (mean_c - mean_u) / safe_precision
    scale = scale_c / ops.sqrt(safe_precision)
    return mean, scale, proper


def guided_log_density(x, mean_c, scale_c, mean_u, scale_u, guidance_scale):
    """Unnormalised guided log density `(1 + w) log p_c - w log p_u`."""
    w = guidance_scale
    return (1.0 + w) * normal_log_prob(x, mean_c, scale_c) - w * normal_log_prob(
        x, mean_u, scale_u
    )


def rejection_sample_guided(
    mean_c,
    scale_c,
    mean_u,
    scale_u,
    guidance_scale,
    seed,
    num_proposals=1000,
):
    """Sample the guided density as the reference does, by rejection.

    Proposals come from `N(m_c, 2 * max(s_c, s_u))`. The envelope constant
    is the largest ratio of the guided density on a grid of 1001 points over
    `m_c +- 10` to the proposal density at its mode. The first accepted
    proposal is returned; where none of `num_proposals` is accepted (the
    envelope can fail, e.g. for an improper density), the sample falls back
    to the conditional Gaussian. Computed in log space.

    Returns `(samples [B, d], accepted [B, d] bool)`.
    """
    mean_c, scale_c, mean_u, scale_u = [
        ops.cast(x, "float32")
        for x in (mean_c, scale_c, mean_u, scale_u)
    ]
    proposal_scale = 2.0 * ops.maximum(scale_c, scale_u)
    grid = mean_c[None] + ops.reshape(
        ops.linspace(-10.0, 10.0, 1001), (-1, 1, 1)
    )
    grid_log_density = guided_log_density(
        grid, mean_c[None], scale_c[None], mean_u[None], scale_u[None],
        guidance_scale,
    )
    proposal_log_mode = -ops.log(proposal_scale) - 0.5 * math.log(2 * math.pi)
    log_envelope = ops.max(grid_log_density, axis=0) - proposal_log_mode

    shape = (num_proposals, *ops.shape(mean_c))
    proposals = mean_c[None] + proposal_scale[None] * keras.random.normal(
        shape, seed=seed
    )
    uniforms = keras.random.uniform(shape, minval=1e-12, maxval=1.0, seed=seed)
    log_density = guided_log_density(
        proposals, mean_c[None], scale_c[None], mean_u[None], scale_u[None],
        guidance_scale,
    )
    log_proposal = normal_log_prob(proposals, mean_c[None], proposal_scale[None])
    accept = ops.log(uniforms) + log_envelope[None] + log_proposal < log_density
    # Keep the first accepted proposal of each dimension.
    accepted_before = ops.cumsum(ops.cast(accept, "int32"), axis=0)
    first = ops.logical_and(accept, accepted_before == 1)
    sample = ops.sum(ops.where(first, proposals, 0.0), axis=0)
    accepted = ops.any(accept, axis=0)
    fallback = mean_c + scale_c * keras.random.normal(
        ops.shape(mean_c), seed=seed
    )
    return ops.where(accepted, sample, fallback), accepted


def sample_guided_mixture(
    conditional,
    unconditional,
    guidance_scale,
    seed,
    temperature=1.0,
    mixture_temperature=1.0,
    method="closed_form",
    num_proposals=1000,
):
    """Draw guided tokens `[B, d]` from conditional/unconditional mixtures.

    Args:
        conditional: `(mixture_logits [B, K], means [B, K, d],
            scales [B, K, d])` of the conditional stream.
        unconditional: the same for the unconditional (NOLABEL) stream.
        guidance_scale: float `w >= 0`.
        seed: a `keras.random.SeedGenerator`.
        temperature: multiplier of the component standard deviations.
        mixture_temperature: divisor of the mixture logits.
        method: `"closed_form"` samples the guided Gaussian exactly where its
            precision is positive and uses the rejection sampler elsewhere;
            `"rejection"` uses the reference's rejection sampler everywhere.
        num_proposals: proposals of the rejection sampler.
    """
    if method not in GUIDANCE_METHODS:
        raise ValueError(
            f"`method` must be one of {GUIDANCE_METHODS}. Received: "
            f"method={method!r}"
        )
    logits_c, means_c, scales_c = [
        ops.cast(x, "float32") for x in conditional
    ]
    _, means_u, scales_u = [
        ops.cast(x, "float32") for x in unconditional
    ]
    # The component is chosen from the conditional mixture and used in both.
    # The draws come in the order of `sample_mixture`, so that `w = 0`
    # reproduces conditional sampling exactly.
    components = choose_components(logits_c, seed, mixture_temperature)
    mean_c = select_component(means_c, components)
    scale_c = select_component(scales_c, components) * temperature
    mean_u = select_component(means_u, components)
    scale_u = select_component(scales_u, components) * temperature
    noise = keras.random.normal(ops.shape(mean_c), seed=seed)

    def rejection():
        sample, _ = rejection_sample_guided(
            mean_c, scale_c, mean_u, scale_u, guidance_scale, seed,
            num_proposals,
        )
        return sample

    if method == "rejection":
        return rejection()
    mean, scale, proper = guided_gaussian(
        mean_c, scale_c, mean_u, scale_u, guidance_scale
    )
    exact = mean + scale * noise
    # The rejection sampler runs only when some dimension needs it.
    return stateful_cond(
        ops.all(proper),
        lambda: exact,
        lambda: ops.where(proper, exact, rejection()),
        stateful_variables=[seed.state],
    )
