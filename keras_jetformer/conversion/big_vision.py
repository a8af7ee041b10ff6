"""Load JetFormer parameters from the big_vision reference implementation.

big_vision (github.com/google-research/big_vision, `models/proj/jetformer`
and `models/proj/jet`) stores parameters as a nested dict; flattened with
`/` the names look like `decoder/layers/attn/q_einsum/w` or
`params_adaptor/couplings/dnn/init_proj/kernel`. Its decoder layers and flow
couplings are scanned, so those arrays carry a leading layer axis.

Differences in parameterisation that the mapping absorbs:
- big_vision's RMSNorm multiplies by `1 + scale`, Keras' by `scale`.
- big_vision's frozen coupling projections are 0/1 matrices; here they are
  the equivalent index permutations.
"""

import re

import numpy as np

from keras_jetformer.layers.jet_coupling import SPATIAL_PATTERNS
from keras_jetformer.layers.jet_coupling import spatial_permutation
from keras_jetformer.models.jetformer_backbone import JetFormerBackbone

FLOW_PREFIX = "params_adaptor"
CHANNEL_PROJECTIONS = f"{FLOW_PREFIX}/channel_coupling_masks-FREEZE_ME"
SPATIAL_PROJECTIONS = f"{FLOW_PREFIX}/spatial_coupling_masks-FREEZE_ME"
COUPLINGS = f"{FLOW_PREFIX}/couplings/dnn"


def _projection_to_permutation(projection, name):
    """Turn a 0/1 projection `P` (`out[j] = in[argmax_k P[k, j]]`) into indices."""
    projection = np.asarray(projection)
    permutation = np.argmax(projection, axis=0)
    is_permutation = np.array_equal(
        projection, np.eye(len(permutation))[permutation].T
    )
    if not is_permutation:
        raise ValueError(
            f"The frozen projection {name!r} is not a permutation matrix, "
            "which this implementation requires."
        )
    return permutation.astype("int32")


def _coupling_kinds(params):
    """Return the kind of each flow coupling from its projections."""
    channel = np.asarray(params[CHANNEL_PROJECTIONS])
    spatial = np.asarray(params[SPATIAL_PROJECTIONS])
    kinds = []
    for index in range(channel.shape[0]):
        channel_used = bool(np.any(channel[index]))
        spatial_used = bool(np.any(spatial[index]))
        if channel_used == spatial_used:
            raise ValueError(
                f"Flow coupling {index} must have exactly one of a channel "
                "and a spatial projection."
            )
        kinds.append("channels" if channel_used else "spatial")
    return kinds


def _spatial_pattern(permutation, grid_shape):
    for pattern in SPATIAL_PATTERNS:
        try:
            candidate = spatial_permutation(pattern, *grid_shape)
        except ValueError:
            continue
        if np.array_equal(candidate, permutation):
            return pattern
    raise ValueError(
        "A spatial coupling projection matches none of the known patterns "
        f"{SPATIAL_PATTERNS}."
    )


def backbone_config_from_big_vision(
    params,
    image_shape,
    patch_size,
    num_vocab_repeats=1,
    bos_id=None,
    boi_id=None,
    nolabel_id=None,
    scale_tol=1e-6,
    dropout=0.0,
):
    """Infer `JetFormerBackbone` arguments from big_vision parameters.

    The image shape, patch size, vocabulary repeats and special ids are not
    recoverable from the parameter shapes and must be given (they are in the
    big_vision config: `patch_pca.model.input_size`, `patch_size`,
    `model.num_vocab_repeats`, `model.bos_id` ...).
    """
    image_shape = tuple(image_shape)
    query = np.asarray(params["decoder/layers/attn/q_einsum/w"])
    key_value = np.asarray(params["decoder/layers/attn/kv_einsum/w"])
    gating = np.asarray(params["decoder/layers/mlp/gating_einsum"])
    num_layers, num_query_heads, hidden_dim, head_dim = query.shape
    num_key_value_heads = key_value.shape[2]
    image_token_dim = np.asarray(params["EmbedImage/kernel"]).shape[0]
    num_outputs = np.asarray(params["LogitsImage/kernel"]).shape[1]
    num_mixtures = num_outputs // (1 + 2 * image_token_dim)
    embedding_rows = np.asarray(params["EmbedText/embedding"]).shape[0]
    if embedding_rows % num_vocab_repeats:
        raise ValueError(
            f"The text embedding has {embedding_rows} rows, which is not a "
            f"multiple of num_vocab_repeats={num_vocab_repeats}."
        )
    vocabulary_size = embedding_rows // num_vocab_repeats

    init_projection = np.asarray(params[f"{COUPLINGS}/init_proj/kernel"])
    flow_num_couplings, _, flow_hidden_dim = init_projection.shape
    block_names = sorted(
        {
            match.group(1)
            for name in params
            if (match := re.match(rf"{COUPLINGS}/vit/(encoderblock_\d+)/", name))
        }
    )
    flow_query = np.asarray(
        params[
            f"{COUPLINGS}/vit/encoderblock_0/MultiHeadDotProductAttention_0/"
            "query/kernel"
        ]
    )
    flow_mlp = np.asarray(
        params[f"{COUPLINGS}/vit/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
    )
    kinds = _coupling_kinds(params)
    grid_shape = (image_shape[0] // patch_size, image_shape[1] // patch_size)
    spatial = np.asarray(params[SPATIAL_PROJECTIONS])
    spatial_patterns = [
        _spatial_pattern(
            _projection_to_permutation(spatial[index], SPATIAL_PROJECTIONS),
            grid_shape,
        )
        for index, kind in enumerate(kinds)
        if kind == "spatial"
    ]
    untied = "LogitsText/kernel" in params
    return {
        "image_shape": image_shape,
        "patch_size": patch_size,
        "image_token_dim": int(image_token_dim),
        "vocabulary_size": int(vocabulary_size),
        "num_layers": int(num_layers),
        "hidden_dim": int(hidden_dim),
        "intermediate_dim": int(gating.shape[-1]),
        "num_query_heads": int(num_query_heads),
        "num_key_value_heads": int(num_key_value_heads),
        "head_dim": int(head_dim),
        "num_mixtures": int(num_mixtures),
        "flow_num_couplings": int(flow_num_couplings),
        "flow_hidden_dim": int(flow_hidden_dim),
        "flow_num_layers": len(block_names),
        "flow_num_heads": int(flow_query.shape[2]),
        "flow_intermediate_dim": int(flow_mlp.shape[-1]),
        "flow_coupling_kinds": tuple(kinds),
        "flow_spatial_patterns": tuple(spatial_patterns)
        or ("checkerboard", "checkerboard-inv"),
        "bos_id": bos_id,
        "boi_id": boi_id,
        "nolabel_id": nolabel_id,
        "num_vocab_repeats": num_vocab_repeats,
        "tie_text_embeddings": not untied,
        "scale_tol": scale_tol,
        "dropout": dropout,
    }


def _weight_assignments(backbone, params):
    """Yield `(variable, value, big_vision_name)` for every backbone weight."""
    transformer = backbone.transformer

    def get(name, index=None):
        if name not in params:
            raise KeyError(f"big_vision parameter {name!r} is missing.")
        value = np.asarray(params[name], dtype="float32")
        return value if index is None else value[index]

    yield transformer.image_embedding.kernel, get("EmbedImage/kernel"), "EmbedImage/kernel"
    yield transformer.image_embedding.bias, get("EmbedImage/bias"), "EmbedImage/bias"
    yield (
        transformer.token_embedding.embeddings,
        get("EmbedText/embedding"),
        "EmbedText/embedding",
    )
    if not backbone.tie_text_embeddings:
        yield (
            transformer.token_embedding.reverse_embeddings,
            get("LogitsText/kernel"),
            "LogitsText/kernel",
        )
        yield (
            transformer.text_logits_bias,
            get("LogitsText/bias"),
            "LogitsText/bias",
        )
    yield transformer.image_head.kernel, get("LogitsImage/kernel"), "LogitsImage/kernel"
    yield transformer.image_head.bias, get("LogitsImage/bias"), "LogitsImage/bias"
    yield (
        transformer.final_norm.scale,
        1.0 + get("decoder/final_norm/scale"),
        "decoder/final_norm/scale",
    )
    layers = "decoder/layers"
    for index, block in enumerate(transformer.decoder_blocks):
        attention = block.attention
        key_value = get(f"{layers}/attn/kv_einsum/w", index)
        gating = get(f"{layers}/mlp/gating_einsum", index)
        yield (
            block.pre_attention_norm.scale,
            1.0 + get(f"{layers}/pre_attention_norm/scale", index),
            f"{layers}/pre_attention_norm/scale",
        )
        yield (
            block.pre_ffw_norm.scale,
            1.0 + get(f"{layers}/pre_ffw_norm/scale", index),
            f"{layers}/pre_ffw_norm/scale",
        )
        yield (
            attention.query_dense.kernel,
            get(f"{layers}/attn/q_einsum/w", index),
            f"{layers}/attn/q_einsum/w",
        )
        yield attention.key_dense.kernel, key_value[0], f"{layers}/attn/kv_einsum/w"
        yield attention.value_dense.kernel, key_value[1], f"{layers}/attn/kv_einsum/w"
        yield (
            attention.output_dense.kernel,
            get(f"{layers}/attn/attn_vec_einsum/w", index),
            f"{layers}/attn/attn_vec_einsum/w",
        )
        yield block.ffw_gating.kernel, gating[0], f"{layers}/mlp/gating_einsum"
        yield block.ffw_up.kernel, gating[1], f"{layers}/mlp/gating_einsum"
        yield (
            block.ffw_down.kernel,
            get(f"{layers}/mlp/linear", index),
            f"{layers}/mlp/linear",
        )

    for index, coupling in enumerate(backbone.flow.couplings):
        projections = (
            CHANNEL_PROJECTIONS
            if coupling.kind == "channels"
            else SPATIAL_PROJECTIONS
        )
        yield (
            coupling.permutation,
            _projection_to_permutation(get(projections, index), projections),
            projections,
        )
        dense_pairs = [
            (coupling.input_projection, f"{COUPLINGS}/init_proj"),
            (coupling.output_projection, f"{COUPLINGS}/final_proj"),
        ]
        for layer, name in dense_pairs:
            yield from _dense(layer, get, name, index)
        yield (
            coupling.position_embedding,
            get(f"{COUPLINGS}/posemb", index),
            f"{COUPLINGS}/posemb",
        )
        yield from _layer_norm(
            coupling.output_norm, get, f"{COUPLINGS}/vit/encoder_norm", index
        )
        if coupling.context_attention is not None:
            yield from _attention(
                coupling.context_attention,
                get,
                f"{COUPLINGS}/MultiHeadDotProductAttention_0",
                index,
            )
        for block_index, block in enumerate(coupling.transformer_layers):
            prefix = f"{COUPLINGS}/vit/encoderblock_{block_index}"
            yield from _layer_norm(
                block._self_attention_layer_norm, get, f"{prefix}/LayerNorm_0", index
            )
            yield from _attention(
                block._self_attention_layer,
                get,
                f"{prefix}/MultiHeadDotProductAttention_0",
                index,
            )
            yield from _layer_norm(
                block._feedforward_layer_norm, get, f"{prefix}/LayerNorm_1", index
            )
            for layer, name in (
                (block._feedforward_intermediate_dense, "Dense_0"),
                (block._feedforward_output_dense, "Dense_1"),
            ):
                full_name = f"{prefix}/MlpBlock_0/{name}"
                yield from _dense(layer, get, full_name, index)


def _layer_norm(layer, get, name, index):
    yield layer.gamma, get(f"{name}/scale", index), f"{name}/scale"
    yield layer.beta, get(f"{name}/bias", index), f"{name}/bias"


def _dense(layer, get, name, index):
    yield layer.kernel, get(f"{name}/kernel", index), f"{name}/kernel"
    yield layer.bias, get(f"{name}/bias", index), f"{name}/bias"


def _attention(layer, get, name, index):
    for dense, part in (
        (layer._query_dense, "query"),
        (layer._key_dense, "key"),
        (layer._value_dense, "value"),
        (layer._output_dense, "out"),
    ):
        yield from _dense(dense, get, f"{name}/{part}", index)


def load_big_vision_weights(backbone, params):
    """Copy big_vision parameters into `backbone`, checking every shape."""
    assigned = set()
    for variable, value, name in _weight_assignments(backbone, params):
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"Shape mismatch for {name!r} -> {variable.path}: the backbone "
                f"expects {tuple(variable.shape)}, the checkpoint has "
                f"{value.shape}."
            )
        variable.assign(value.astype(variable.dtype))
        assigned.add(id(variable))
    missing = [v.path for v in backbone.weights if id(v) not in assigned]
    if missing:
        raise ValueError(
            f"These backbone weights got no big_vision parameter: {missing}"
        )
    return backbone


def big_vision_weight_names(backbone, params):
    """Map each backbone weight path to the big_vision name it comes from."""
    return {
        variable.path: name
        for variable, _, name in _weight_assignments(backbone, params)
    }


def backbone_from_big_vision(params, image_shape, patch_size, **config):
    """Build a `JetFormerBackbone` from big_vision parameters."""
    arguments = backbone_config_from_big_vision(
        params, image_shape, patch_size, **config
    )
    backbone = JetFormerBackbone(**arguments)
    return load_big_vision_weights(backbone, params)
