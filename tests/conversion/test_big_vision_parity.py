"""Parity of converted big_vision weights with the reference JetFormer.

The arrays in `tests/fixtures/parity_tiny` come from the reference JAX/Flax
implementation (big_vision), run on a tiny configuration whose weights were
perturbed away from their initial values. `FIXTURE.md` there describes every
array. The tests convert the reference parameters with
`backbone_from_big_vision`, replay the reference's random draws, and compare
the flow, every intermediate of the objective in training and evaluation
mode, the gradients and cached decoding.

The expensive computations run once per module in module-scoped fixtures.
"""

import json
import math
import pathlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_jetformer.conversion.big_vision import _weight_assignments
from keras_jetformer.conversion.big_vision import (
    backbone_config_from_big_vision,
)
from keras_jetformer.conversion.big_vision import backbone_from_big_vision
from keras_jetformer.generation.image_generation import extend_image_cache
from keras_jetformer.generation.image_generation import prefill_image_prompt
from keras_jetformer.layers.patching import grid_to_tokens
from keras_jetformer.layers.patching import patchify
from keras_jetformer.training.objective import jetformer_objective

FIXTURE_DIR = pathlib.Path(__file__).parents[1] / "fixtures" / "parity_tiny"
# Measured in float32 on CPU with all three backends, most differences stay
# below a third of this tolerance. The text logits use up to 0.9 of it,
# because the tied text embedding (row norms 6 to 9) scales up the rounding
# error of the pre-logits.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# The flow's attention key biases have a gradient of exactly zero in theory,
# because softmax is invariant to a shift shared by all keys. Both sides
# contain rounding noise of about 1e-10 there, which `atol` absorbs.
GRADIENT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}

METRIC_NAMES = (
    "logdet",
    "loss",
    "nll_image",
    "nll_image_prefix",
    "nll_image_suffix",
    "nll_image_tokens",
    "nll_text",
    "nll_text_prefix",
    "nll_text_suffix",
)
INTERMEDIATE_NAMES = (
    "images_noised",
    "images_dequantized",
    "patch_tokens",
    "flow_tokens",
    "flow_logdet",
    "flow_tokens_model",
    "flow_tokens_factored",
    "factored_nll",
    "model_in_tokens",
    "drop_prefix",
    "seq_embeddings",
    "seq_input_mask",
    "seq_attn_mask",
    "seq_positions",
    "text_prelogits",
    "image_prelogits",
    "text_logits",
    "image_logits",
    "gmm_log_weights",
    "gmm_locs",
    "gmm_scales",
    "gmm_logprob",
    "text_logprob",
    "nll_text",
    "nll_image_tokens",
    "logdet_bpd",
    "nll_image",
    "loss",
) + tuple(f"metrics/{name}" for name in METRIC_NAMES)
# Boolean and integer intermediates must match exactly.
EXACT_NAMES = (
    "drop_prefix",
    "seq_input_mask",
    "seq_attn_mask",
    "seq_positions",
)
DECODE_NAMES = (
    "gmm_locs",
    "gmm_log_weights",
    "gmm_logprob",
    "gmm_scales",
    "image_prelogits",
)


def _to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _load_npz(name):
    with np.load(FIXTURE_DIR / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def _is_frozen(name):
    return "FREEZE_ME" in name


def _compiled(layer, function):
    """Return `function` compiled with `jax.jit` on JAX, else unchanged.

    Eager JAX compiles every operation separately, which makes these tests
    several times slower than one compiled program. The compiled function
    reads the layer's weights through a `keras.StatelessScope`.
    """
    if keras.backend.backend() != "jax":
        return function
    import jax

    variables = layer.variables

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    compiled = jax.jit(stateless)

    def call(*args):
        return compiled([variable.value for variable in variables], *args)

    return call


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURE_DIR / "meta.json").read_text())


@pytest.fixture(scope="module")
def reference():
    """All fixture arrays, by file name without `.npz`."""
    names = ("params", "batch", "randomness", "intermediates")
    names += ("flow", "grads", "decode")
    return {name: _load_npz(name) for name in names}


@pytest.fixture(scope="module")
def config_kwargs(meta):
    values = meta["config_values"]
    model = values["model"]
    size = values["image_size"]
    return {
        "image_shape": (size, size, values["image_channels"]),
        "patch_size": values["patch_size"],
        "num_vocab_repeats": model["num_vocab_repeats"],
        "bos_id": model["bos_id"],
        "boi_id": model["boi_id"],
        "nolabel_id": model["nolabel_id"],
    }


@pytest.fixture(scope="module")
def backbone(reference, config_kwargs):
    kwargs = dict(config_kwargs)
    image_shape = kwargs.pop("image_shape")
    patch_size = kwargs.pop("patch_size")
    return backbone_from_big_vision(
        reference["params"], image_shape, patch_size, **kwargs
    )


@pytest.fixture(scope="module")
def source_indices(backbone, reference):
    """Flat indices of the big_vision elements that feed each weight.

    Every trainable array is replaced by `k * arange(size)` for k = 1 and
    k = 2 before running the converter's mapping. Each transform that the
    mapping applies has the form `x + c` (a slice, a reshape, or `1 + x` for
    RMSNorm scales), so the difference between the two mapped values is the
    flat source index of every element. Frozen projections keep their real
    values, because the mapping turns them into permutations.

    Returns a list of `(variable, big_vision_name, indices)`, with
    `indices=None` for frozen projections.
    """
    params = reference["params"]

    def coded(multiplier):
        return {
            name: value
            if _is_frozen(name)
            else multiplier * np.arange(value.size).reshape(value.shape)
            for name, value in params.items()
        }

    once = list(_weight_assignments(backbone, coded(1)))
    twice = list(_weight_assignments(backbone, coded(2)))
    assert [name for _, _, name in once] == [name for _, _, name in twice]
    results = []
    for (variable, value_once, name), (_, value_twice, _) in zip(once, twice):
        if _is_frozen(name):
            results.append((variable, name, None))
            continue
        indices = np.asarray(value_twice, "float64") - value_once
        results.append((variable, name, indices.astype("int64")))
    return results


def _draws(randomness, training):
    draws = {
        "text_first_mask": randomness["text_first_mask"],
        "dequantization_noise": randomness["dequant_noise_image"],
    }
    if training:
        draws.update(
            rgb_noise=randomness["rgb_noise"],
            input_noise_std=randomness["input_noise_std"].reshape(-1),
            input_noise=randomness["input_noise"],
            drop_labels=randomness["drop_labels"],
        )
    return draws


def _decoder_block_outputs(transformer, embeddings, input_mask, training):
    """Run the decoder blocks one by one; return outputs `[layers, B, L, E]`."""
    attention_mask = transformer.causal_attention_mask(input_mask)
    positions = transformer.positions_from_mask(input_mask)
    outputs = []
    x = embeddings
    for block in transformer.decoder_blocks:
        x = block(
            x,
            attention_mask=attention_mask,
            positions=positions,
            training=training,
        )
        outputs.append(x)
    return ops.stack(outputs, axis=0)


def _run_objective(backbone, reference, meta, training):
    """Run the objective with the fixture's draws.

    In training mode the gradients of the loss with respect to every
    trainable variable are returned too. Returns a dict of numpy values:
    `loss`, `metrics`, `intermediates`, `decoder_block_outputs` and
    `gradients` (a list aligned with `backbone.trainable_variables`, or
    None).
    """
    batch = reference["batch"]
    randomness = reference["randomness"]
    inputs = {
        "images": batch["image"],
        "token_ids": batch["text"],
        "padding_mask": batch["text_mask"],
        "loss_mask": batch["text_loss"],
    }
    draws = _draws(randomness, training)
    noise_scale = randomness["noise_scale"] if training else None
    text_loss_weight = meta["config_values"]["text_loss_weight"]

    def compute():
        loss, metrics, intermediates = jetformer_objective(
            backbone,
            inputs,
            draws,
            noise_scale=noise_scale,
            text_loss_weight=text_loss_weight,
            training=training,
            return_intermediates=True,
        )
        block_outputs = _decoder_block_outputs(
            backbone.transformer,
            intermediates["seq_embeddings"],
            intermediates["seq_input_mask"],
            training,
        )
        return loss, (metrics, intermediates, block_outputs)

    trainable = backbone.trainable_variables
    gradients = None
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def stateless(values):
            mapping = list(zip(trainable, values))
            with keras.StatelessScope(state_mapping=mapping):
                return compute()

        values = [variable.value for variable in trainable]
        # One compiled program is much faster than eager JAX here.
        if training:
            function = jax.value_and_grad(stateless, has_aux=True)
            (loss, aux), gradients = jax.jit(function)(values)
        else:
            loss, aux = jax.jit(stateless)(values)
    elif backend == "tensorflow":
        import tensorflow as tf

        if training:
            with tf.GradientTape() as tape:
                loss, aux = compute()
            gradients = tape.gradient(
                loss, [variable.value for variable in trainable]
            )
        else:
            loss, aux = compute()
    elif backend == "torch":
        import torch

        if training:
            loss, aux = compute()
            gradients = torch.autograd.grad(
                loss, [variable.value for variable in trainable]
            )
        else:
            with torch.no_grad():
                loss, aux = compute()
    else:
        pytest.skip(f"Backend {backend!r} is not covered by this test.")

    metrics, intermediates, block_outputs = aux
    return {
        "loss": _to_numpy(loss),
        "metrics": {key: _to_numpy(value) for key, value in metrics.items()},
        "intermediates": {
            key: _to_numpy(value) for key, value in intermediates.items()
        },
        "decoder_block_outputs": _to_numpy(block_outputs),
        "gradients": None
        if gradients is None
        else [_to_numpy(gradient) for gradient in gradients],
    }


def _fixture_names(backbone, run):
    """Map our outputs to the fixture's intermediate names, as numpy."""
    intermediates = run["intermediates"]
    metrics = run["metrics"]
    transformer = backbone.transformer

    # Images, patches and the flow.
    modelled, factored = backbone.split_image_tokens(
        intermediates["flow_tokens"]
    )
    factored = _to_numpy(factored).astype("float64")
    values = {
        "images_noised": intermediates["images_noised"],
        "images_dequantized": intermediates["images_dequantized"],
        "patch_tokens": grid_to_tokens(
            patchify(intermediates["images_dequantized"], backbone.patch_size)
        ),
        "flow_tokens": intermediates["flow_tokens"],
        "flow_logdet": intermediates["flow_logdet"],
        "flow_tokens_model": modelled,
        "flow_tokens_factored": factored,
        # The definition: -sum log N(z; 0, 1), in float64.
        "factored_nll": np.sum(
            0.5 * np.square(factored) + 0.5 * math.log(2 * math.pi),
            axis=(1, 2),
        ),
        "model_in_tokens": intermediates["model_in_tokens"],
    }

    # The transformer's input sequence.
    input_mask = intermediates["seq_input_mask"]
    drop_prefix = intermediates.get("drop_prefix")
    if drop_prefix is None:
        # Evaluation mode drops no prefix.
        drop_prefix = np.zeros(input_mask.shape[:1], "bool")
    values.update(
        {
            "drop_prefix": drop_prefix,
            "seq_embeddings": intermediates["seq_embeddings"],
            "seq_input_mask": input_mask,
            "seq_attn_mask": transformer.causal_attention_mask(input_mask),
            "seq_positions": transformer.positions_from_mask(input_mask),
        }
    )

    # Heads and log-likelihoods.
    mixture_logits, means, scales = transformer.image_head.mixture(
        intermediates["image_logits"]
    )
    values.update(
        {
            "text_prelogits": intermediates["text_prelogits"],
            "image_prelogits": intermediates["image_prelogits"],
            "text_logits": intermediates["text_logits"],
            "image_logits": intermediates["image_logits"],
            "gmm_log_weights": ops.log_softmax(mixture_logits, axis=-1),
            "gmm_locs": means,
            "gmm_scales": scales,
            "gmm_logprob": intermediates["gmm_logprob"],
            "text_logprob": intermediates["text_logprob"],
        }
    )

    # Per-example values, the loss and the metrics.
    values.update(
        {
            "nll_text": metrics["per_example_nll_text"],
            "nll_image_tokens": metrics["per_example_nll_image_tokens"],
            "logdet_bpd": metrics["per_example_logdet"],
            "nll_image": metrics["per_example_nll_image"],
            "loss": run["loss"],
        }
    )
    for name in METRIC_NAMES:
        values[f"metrics/{name}"] = metrics[name]
    return {name: _to_numpy(value) for name, value in values.items()}


@pytest.fixture(scope="module")
def train_run(backbone, reference, meta):
    run = _run_objective(backbone, reference, meta, training=True)
    run["named"] = _fixture_names(backbone, run)
    return run


@pytest.fixture(scope="module")
def eval_run(backbone, reference, meta):
    run = _run_objective(backbone, reference, meta, training=False)
    run["named"] = _fixture_names(backbone, run)
    return run


def _mixture_outputs(head, prelogits, tokens):
    logits = head(prelogits)
    mixture_logits, means, scales = head.mixture(logits)
    return {
        "gmm_locs": means,
        "gmm_log_weights": ops.log_softmax(mixture_logits, axis=-1),
        "gmm_logprob": head.log_prob(logits, tokens),
        "gmm_scales": scales,
        "image_prelogits": prelogits,
    }


@pytest.fixture(scope="module")
def decode_run(backbone, reference):
    """Teacher-forced decoding, one full pass and prefill plus cache steps."""
    decode = reference["decode"]
    transformer = backbone.transformer
    head = transformer.image_head
    token_ids = decode["text"]
    padding_mask = decode["text_mask"]
    drop_prefix = decode["drop_prefix"]
    image_tokens = decode["image_tokens"]
    batch_size, num_image_tokens, _ = image_tokens.shape
    text_first = np.ones((batch_size,), "bool")

    def full_pass(token_ids, padding_mask, image_tokens, drop_prefix):
        outputs = transformer(
            {
                "token_ids": token_ids,
                "padding_mask": padding_mask,
                "image_tokens": image_tokens,
                "text_first_mask": text_first,
            },
            drop_prefix=drop_prefix,
        )
        _, prelogits = transformer.split_hidden_states(
            outputs["hidden_states"], text_first, token_ids.shape[1]
        )
        return _mixture_outputs(head, prelogits, image_tokens)

    def prefill(token_ids, padding_mask, drop_prefix):
        return prefill_image_prompt(
            transformer, token_ids, padding_mask, drop_prefix=drop_prefix
        )

    def extend(tokens, cache, key_mask, positions, cache_index):
        return extend_image_cache(
            transformer, tokens, cache, key_mask, positions, cache_index
        )

    def mixture_outputs(prelogits, image_tokens):
        return _mixture_outputs(head, prelogits, image_tokens)

    results = {}
    full = _compiled(transformer, full_pass)(
        token_ids, padding_mask, image_tokens, drop_prefix
    )
    for name, value in full.items():
        results[f"full/{name}"] = _to_numpy(value)

    hidden_states, cache, key_mask, next_positions = _compiled(
        transformer, prefill
    )(token_ids, padding_mask, drop_prefix)
    prompt_length = hidden_states.shape[1]
    extend = _compiled(transformer, extend)
    cached_prelogits = [hidden_states[:, -1]]
    for index in range(1, num_image_tokens):
        # Image token i >= 1 goes to cache slot P + i - 1, and its rotary
        # position continues from the prompt's valid tokens.
        hidden, cache = extend(
            image_tokens[:, index - 1],
            cache,
            key_mask,
            next_positions + index - 1,
            np.int32(prompt_length + index - 1),
        )
        cached_prelogits.append(hidden)
    cached_prelogits = ops.stack(cached_prelogits, axis=1)
    cached = _compiled(transformer, mixture_outputs)(
        cached_prelogits, image_tokens
    )
    for name, value in cached.items():
        results[f"cached/{name}"] = _to_numpy(value)
    return results


# --- Flow --------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_flow_matches_reference(backbone, reference, direction):
    flow = reference["flow"]

    def run_flow(x):
        return backbone.flow(x, inverse=direction == "inverse")

    run_flow = _compiled(backbone.flow, run_flow)
    outputs, logdet = run_flow(flow[f"{direction}_in"])
    np.testing.assert_allclose(
        _to_numpy(outputs), flow[f"{direction}_out"], **TOLERANCE
    )
    np.testing.assert_allclose(
        _to_numpy(logdet), flow[f"{direction}_logdet"], **TOLERANCE
    )


# --- Objective ---------------------------------------------------------------


def _assert_matches(ours, expected, name):
    assert ours.shape == expected.shape, (name, ours.shape, expected.shape)
    if name in EXACT_NAMES:
        np.testing.assert_array_equal(ours, expected, err_msg=name)
    else:
        np.testing.assert_allclose(ours, expected, err_msg=name, **TOLERANCE)


@pytest.mark.parametrize("name", INTERMEDIATE_NAMES)
def test_train_intermediate_matches(train_run, reference, name):
    expected = reference["intermediates"][f"train/{name}"]
    _assert_matches(train_run["named"][name], expected, name)


@pytest.mark.parametrize("name", INTERMEDIATE_NAMES)
def test_eval_intermediate_matches(eval_run, reference, name):
    expected = reference["intermediates"][f"eval/{name}"]
    _assert_matches(eval_run["named"][name], expected, name)


def test_train_decoder_block_outputs_match(train_run, reference):
    np.testing.assert_allclose(
        train_run["decoder_block_outputs"],
        reference["intermediates"]["train/decoder_block_outputs"],
        **TOLERANCE,
    )


def test_fixture_covers_both_orders_and_label_drop(reference):
    # Without these rows, several checks above would compare empty sets.
    randomness = reference["randomness"]
    text_first = randomness["text_first_mask"]
    assert text_first.any()
    assert not text_first.all()
    assert randomness["drop_prefix"].any()
    assert not (randomness["drop_prefix"] & ~text_first).any()
    assert reference["decode"]["drop_prefix"].any()
    assert not reference["decode"]["text_mask"].all()


# --- Gradients ---------------------------------------------------------------


def test_train_gradients_match(backbone, train_run, source_indices, reference):
    gradients = {
        id(variable): gradient
        for variable, gradient in zip(
            backbone.trainable_variables, train_run["gradients"]
        )
    }
    reference_gradients = reference["grads"]
    checked = set()
    for variable, name, indices in source_indices:
        if indices is None:
            assert not variable.trainable, variable.path
            continue
        assert variable.trainable, variable.path
        expected = reference_gradients[name].reshape(-1)[indices]
        np.testing.assert_allclose(
            gradients[id(variable)],
            expected,
            err_msg=f"{variable.path} <- {name}",
            **GRADIENT_TOLERANCE,
        )
        checked.add(id(variable))
    assert checked == set(gradients)


# --- Cached decoding ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "cached"])
@pytest.mark.parametrize("name", DECODE_NAMES)
def test_decoding_matches_reference(decode_run, reference, kind, name):
    key = f"{kind}/{name}"
    ours = decode_run[key]
    expected = reference["decode"][key]
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, err_msg=key, **TOLERANCE)


# --- Name mapping and config -------------------------------------------------


def test_every_backbone_weight_has_a_source(backbone, source_indices):
    sources = {}
    for variable, name, _ in source_indices:
        assert id(variable) not in sources, f"{variable.path} assigned twice"
        sources[id(variable)] = name
    unmapped = [v.path for v in backbone.weights if id(v) not in sources]
    assert unmapped == []


def test_every_trainable_parameter_is_used_once(reference, source_indices):
    params = reference["params"]
    used = {}
    for _, name, indices in source_indices:
        if indices is not None:
            used.setdefault(name, []).append(indices.reshape(-1))
    trainable_names = sorted(name for name in params if not _is_frozen(name))
    assert sorted(used) == trainable_names
    for name in trainable_names:
        # Every element is read by exactly one weight.
        indices = np.sort(np.concatenate(used[name]))
        np.testing.assert_array_equal(
            indices, np.arange(params[name].size), err_msg=name
        )


def test_used_projections_are_loaded(reference, source_indices):
    params = reference["params"]
    frozen_used = {
        name for _, name, indices in source_indices if indices is None
    }
    for name in params:
        if _is_frozen(name) and np.any(params[name]):
            assert name in frozen_used, name


def test_config_inference(reference, meta, config_kwargs):
    model = meta["config_values"]["model"]
    adaptor = meta["config_values"]["adaptor"]
    kwargs = dict(config_kwargs)
    config = backbone_config_from_big_vision(
        reference["params"],
        kwargs.pop("image_shape"),
        kwargs.pop("patch_size"),
        **kwargs,
    )
    expected = {
        "image_shape": config_kwargs["image_shape"],
        "patch_size": config_kwargs["patch_size"],
        "image_token_dim": model["out_dim"],
        "vocabulary_size": model["vocab_size"],
        "num_layers": model["depth"],
        "hidden_dim": model["width"],
        "intermediate_dim": model["mlp_dim"],
        "num_query_heads": model["num_heads"],
        "num_key_value_heads": model["num_kv_heads"],
        "head_dim": model["head_dim"],
        "num_mixtures": model["num_mixtures"],
        "flow_num_couplings": adaptor["depth"],
        "flow_hidden_dim": adaptor["emb_dim"],
        "flow_num_layers": adaptor["block_depth"],
        "flow_num_heads": adaptor["num_heads"],
        # The reference ViT MLP is 4x its width.
        "flow_intermediate_dim": 4 * adaptor["emb_dim"],
        "flow_coupling_kinds": tuple(adaptor["kinds"]) * adaptor["depth"],
        "bos_id": model["bos_id"],
        "boi_id": model["boi_id"],
        "nolabel_id": model["nolabel_id"],
        "num_vocab_repeats": model["num_vocab_repeats"],
        "tie_text_embeddings": not model["untie_output_vocab"],
    }
    for key, value in expected.items():
        assert config[key] == value, key


def test_config_inference_rejects_bad_repeats(reference):
    # 35 embedding rows cannot hold 2 repeats of one vocabulary.
    with pytest.raises(ValueError, match="num_vocab_repeats"):
        backbone_config_from_big_vision(
            reference["params"], (16, 16, 3), 4, num_vocab_repeats=2
        )
