"""Convert big_vision JetFormer parameters into a Keras preset.

Example, on the tiny parity fixture of this repository:

    python tools/checkpoint_conversion/convert_big_vision_checkpoint.py \\
        --params tests/fixtures/parity_tiny/params.npz \\
        --image-size 16 --patch-size 4 --channels 3 \\
        --bos-id 32 --boi-id 33 --nolabel-id 34 \\
        --reference-outputs tests/fixtures/parity_tiny/flow.npz \\
        --output-dir /tmp/jetformer_tiny_preset

The tool
1. reads a `.npz` file of big_vision parameters with `/`-joined names
   (`decoder/layers/attn/q_einsum/w`, `params_adaptor/couplings/dnn/...`),
   the flat format that `big_vision.utils.load_checkpoint_np` reads. A file
   that contains a whole training state (`params/...`, `opt/...`,
   `params_ema/...`) is reduced to one subtree, see `--subtree`. bfloat16
   arrays, which numpy stores as 2-byte void values, are read as bfloat16
   and converted to float32;
2. builds a `JetFormerBackbone` whose config is inferred from the parameter
   shapes and the flags below, and loads the weights. Every parameter must
   be used: a name that the conversion does not map (for example
   `ImageNorm/scale` of `per_modality_final_norm` models) is an error;
3. checks the converted model numerically. The flow, the transformer and
   both heads run on a fixed sample input (two rows, text first and image
   first, one padded text slot) and are compared with a float64 numpy
   re-computation written directly against the big_vision parameter layout.
   With `--reference-outputs`, the outputs stored in those files (produced
   by big_vision itself) are compared too;
4. saves the preset with `backbone.save_to_preset`.

Not supported: tensorstore or orbax checkpoint folders (what the big_vision
JetFormer trainer writes as `checkpoint.bv-<step>`). To convert one, load
it with `big_vision.utils.load_checkpoint_ts` in a JAX environment and
flatten its `params` subtree with `big_vision.utils.tree_flatten_with_names`.
Write the `(name, array)` pairs with `np.savez` and pass that file here.
"""

import argparse
import math
import os
import pathlib
import re
import sys
import zipfile

import numpy as np

FLOW_PREFIX = "params_adaptor"
COUPLINGS = f"{FLOW_PREFIX}/couplings/dnn"
CHANNEL_PROJECTIONS = f"{FLOW_PREFIX}/channel_coupling_masks-FREEZE_ME"
SPATIAL_PROJECTIONS = f"{FLOW_PREFIX}/spatial_coupling_masks-FREEZE_ME"
DECODER_LAYERS = "decoder/layers"
# Subtrees of a big_vision training-state file that contain the model
# parameters, tried in this order by `--subtree auto`.
AUTO_SUBTREES = ("params", "opt/target")
# Names that the conversion needs. They are checked before building, so
# that a truncated file fails with the missing name.
REQUIRED_NAMES = (
    "EmbedImage/kernel",
    "EmbedImage/bias",
    "EmbedText/embedding",
    "LogitsImage/kernel",
    "LogitsImage/bias",
    "decoder/final_norm/scale",
    f"{DECODER_LAYERS}/attn/q_einsum/w",
    f"{DECODER_LAYERS}/attn/kv_einsum/w",
    f"{DECODER_LAYERS}/attn/attn_vec_einsum/w",
    f"{DECODER_LAYERS}/mlp/gating_einsum",
    f"{DECODER_LAYERS}/mlp/linear",
    f"{DECODER_LAYERS}/pre_attention_norm/scale",
    f"{DECODER_LAYERS}/pre_ffw_norm/scale",
    CHANNEL_PROJECTIONS,
    SPATIAL_PROJECTIONS,
    f"{COUPLINGS}/init_proj/kernel",
    f"{COUPLINGS}/init_proj/bias",
    f"{COUPLINGS}/final_proj/kernel",
    f"{COUPLINGS}/final_proj/bias",
    f"{COUPLINGS}/posemb",
    f"{COUPLINGS}/vit/encoder_norm/scale",
    f"{COUPLINGS}/vit/encoder_norm/bias",
)
# big_vision's LayerNorm, RMSNorm and Jet defaults.
NORM_EPSILON = 1e-6
FLOW_SCALE_FACTOR = 2.0
ROPE_MAX_WAVELENGTH = 10_000
# The masked attention logit of big_vision's Gemma attention.
MASKED_LOGIT = -2.3819763e38


class ConversionError(Exception):
    """Error raised when a conversion step fails, with the cause and fix."""


# --- Reading parameters ------------------------------------------------------


def _looks_like_tensorstore(path):
    if path.is_dir():
        return True
    return path.name.endswith(("-LAST", "-CUR")) or ".bv-" in path.name


def _recover_bfloat16(array):
    """Return float32 for bfloat16 arrays that numpy stored as void."""
    if array.dtype.type is np.void and array.dtype.itemsize == 2:
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16).astype("float32")
    return array


def read_parameter_file(path, subtree="auto"):
    """Read a flat big_vision `.npz` file into `{name: array}`.

    `subtree` selects the names under one prefix (for example `params`,
    `params_ema` or `opt/target`) and strips that prefix. `"auto"` picks
    the first of `AUTO_SUBTREES` that the file contains, or keeps every
    name when it contains none. `""` keeps every name.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ConversionError(
            f"Parameter file not found: {path}. Pass the path of a .npz "
            "file with --params."
        )
    if _looks_like_tensorstore(path):
        raise ConversionError(
            f"{path} looks like a tensorstore or orbax checkpoint (a folder "
            "or a `-LAST`/`.bv-` name), which this tool does not read. "
            "Export its `params` subtree to a flat .npz file first; see "
            "this tool's --help."
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(
            f"Failed to read {path} as a numpy .npz file: {error}"
        ) from error
    if isinstance(loaded, np.ndarray):
        raise ConversionError(
            f"{path} contains a single array; expected a .npz file of named "
            "parameters."
        )
    with loaded:
        params = {
            name: _recover_bfloat16(loaded[name]) for name in loaded.files
        }
    if not params:
        raise ConversionError(f"{path} contains no arrays.")

    if subtree == "auto":
        subtree = next(
            (
                prefix
                for prefix in AUTO_SUBTREES
                if any(name.startswith(f"{prefix}/") for name in params)
            ),
            "",
        )
    if subtree:
        prefix = f"{subtree.rstrip('/')}/"
        selected = {
            name[len(prefix) :]: value
            for name, value in params.items()
            if name.startswith(prefix)
        }
        if not selected:
            top_level = sorted({name.split("/", 1)[0] for name in params})
            raise ConversionError(
                f"{path} has no parameters under {prefix!r}. Its top-level "
                f"names are {top_level}; pick one with --subtree."
            )
        params = selected
    return params


def normalize_parameter_names(params):
    """Rewrite other big_vision layouts into the one the converter reads.

    - Decoder layers saved without `scan` (`decoder/layers/0/...`) are
      stacked along a new leading layer axis.
    - Models with as many key/value heads as query heads store one
      `qkv_einsum/w` `[layers, 3, heads, width, head_dim]`; it is split
      into `q_einsum/w` and `kv_einsum/w`.
    """
    params = dict(params)
    pattern = re.compile(rf"^{DECODER_LAYERS}/(\d+)/(.+)$")
    unscanned = {}
    for name in list(params):
        match = pattern.match(name)
        if match:
            index, suffix = int(match.group(1)), match.group(2)
            unscanned.setdefault(suffix, {})[index] = params.pop(name)
    for suffix, by_index in unscanned.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ConversionError(
                f"Decoder layers of {suffix!r} are not numbered 0 to "
                f"{len(by_index) - 1}: found {sorted(by_index)}."
            )
        params[f"{DECODER_LAYERS}/{suffix}"] = np.stack(
            [by_index[index] for index in range(len(by_index))]
        )

    fused_name = f"{DECODER_LAYERS}/attn/qkv_einsum/w"
    if fused_name in params:
        fused = params.pop(fused_name)
        params[f"{DECODER_LAYERS}/attn/q_einsum/w"] = fused[:, 0]
        params[f"{DECODER_LAYERS}/attn/kv_einsum/w"] = fused[:, 1:]
    return params


def check_required_names(params):
    missing = [name for name in REQUIRED_NAMES if name not in params]
    if missing:
        raise ConversionError(
            f"The parameter file lacks {len(missing)} required parameter(s): "
            f"{missing}. Check that it is a JetFormer checkpoint with a Jet "
            "flow (`params_adaptor`) and that --subtree selects the model "
            "parameters."
        )


def infer_num_vocab_repeats(params, special_ids):
    """Infer the number of vocabulary repeats of the text embedding.

    The published big_vision configs place the special ids at the end of
    the vocabulary, so the vocabulary size is the largest special id plus
    one and the embedding has `vocabulary_size * repeats` rows. Untied text
    logits imply one repeat. Returns `(repeats, explanation)`.
    """
    rows = params["EmbedText/embedding"].shape[0]
    if "LogitsText/kernel" in params:
        return 1, "untied text logits imply 1 vocabulary repeat"
    known_ids = [value for value in special_ids if value is not None]
    if not known_ids:
        return 1, (
            "assuming 1 vocabulary repeat because no special id was given "
            "(the published ImageNet 256px config uses 16: pass "
            "--num-vocab-repeats 16 or the special ids)"
        )
    vocabulary_size = max(known_ids) + 1
    if rows % vocabulary_size:
        raise ConversionError(
            f"Cannot infer --num-vocab-repeats: the text embedding has {rows} "
            f"rows, which is not a multiple of the largest special id plus "
            f"one ({vocabulary_size}). Pass --num-vocab-repeats."
        )
    repeats = rows // vocabulary_size
    return repeats, (
        f"{rows} embedding rows / vocabulary size {vocabulary_size} = "
        f"{repeats} vocabulary repeat(s)"
    )


# --- Independent numpy re-computation ----------------------------------------


def _gelu(x):
    """GELU, tanh approximation (flax `nn.gelu` default)."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1.0 + np.tanh(inner))


def _softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _layer_norm(x, scale, bias):
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.mean(np.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + NORM_EPSILON) * scale + bias


def _rms_norm(x, scale):
    """big_vision's RMSNorm, which multiplies by `1 + scale`."""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + NORM_EPSILON) * (1.0 + scale)


class _Parameters:
    """float64 views of the parameters, with a layer index for stacks."""

    def __init__(self, params):
        self.params = params

    def __call__(self, name, index=None):
        value = np.asarray(self.params[name], dtype="float64")
        return value if index is None else value[index]


def _vit_attention(x, get, prefix, index):
    """flax `MultiHeadDotProductAttention` self-attention, no mask."""

    def project(part):
        kernel = get(f"{prefix}/{part}/kernel", index)  # [E, heads, H]
        bias = get(f"{prefix}/{part}/bias", index)  # [heads, H]
        return np.einsum("bte,ehk->bthk", x, kernel) + bias

    query, key, value = project("query"), project("key"), project("value")
    query = query / math.sqrt(query.shape[-1])
    weights = _softmax(np.einsum("bqhk,bshk->bhqs", query, key))
    encoded = np.einsum("bhqs,bshk->bqhk", weights, value)
    out_kernel = get(f"{prefix}/out/kernel", index)  # [heads, H, E]
    return np.einsum("bqhk,hke->bqe", encoded, out_kernel) + get(
        f"{prefix}/out/bias", index
    )


def _coupling_network(x1, get, index, num_blocks):
    """Jet's coupling ViT: returns `(bias, raw_scale)` for the other half."""
    h = x1 @ get(f"{COUPLINGS}/init_proj/kernel", index)
    h = h + get(f"{COUPLINGS}/init_proj/bias", index)
    h = h + get(f"{COUPLINGS}/posemb", index)
    for block in range(num_blocks):
        prefix = f"{COUPLINGS}/vit/encoderblock_{block}"
        y = _layer_norm(
            h,
            get(f"{prefix}/LayerNorm_0/scale", index),
            get(f"{prefix}/LayerNorm_0/bias", index),
        )
        h = h + _vit_attention(
            y, get, f"{prefix}/MultiHeadDotProductAttention_0", index
        )
        y = _layer_norm(
            h,
            get(f"{prefix}/LayerNorm_1/scale", index),
            get(f"{prefix}/LayerNorm_1/bias", index),
        )
        mlp = f"{prefix}/MlpBlock_0"
        y = _gelu(
            y @ get(f"{mlp}/Dense_0/kernel", index)
            + get(f"{mlp}/Dense_0/bias", index)
        )
        h = h + y @ get(f"{mlp}/Dense_1/kernel", index) + get(
            f"{mlp}/Dense_1/bias", index
        )
    h = _layer_norm(
        h,
        get(f"{COUPLINGS}/vit/encoder_norm/scale", index),
        get(f"{COUPLINGS}/vit/encoder_norm/bias", index),
    )
    out = h @ get(f"{COUPLINGS}/final_proj/kernel", index)
    out = out + get(f"{COUPLINGS}/final_proj/bias", index)
    return np.split(out, 2, axis=-1)


def numpy_patchify(images, patch_size):
    """Cut `[B, H, W, C]` images into a `[B, H / p, W / p, p * p * C]` grid.

    A patch's values run over (row in patch, column in patch, channel),
    channel fastest, as in big_vision's `patch_pca`.
    """
    batch, height, width, channels = images.shape
    grid_height, grid_width = height // patch_size, width // patch_size
    patches = np.reshape(
        images,
        (batch, grid_height, patch_size, grid_width, patch_size, channels),
    )
    patches = np.transpose(patches, (0, 1, 3, 2, 4, 5))
    return patches.reshape(
        batch, grid_height, grid_width, patch_size * patch_size * channels
    )


def numpy_flow_forward(params, grid, progress=None):
    """Run the Jet flow forward on a `[B, h, w, D]` grid, in float64.

    Returns `(outputs [B, h, w, D], logdet [B])`. `progress(i)` is called
    after coupling `i`.
    """
    get = _Parameters(params)
    context_prefix = f"{COUPLINGS}/MultiHeadDotProductAttention_0/"
    if any(name.startswith(context_prefix) for name in params):
        raise ConversionError(
            "The numpy check does not support class-conditional Jet flows "
            "(context cross-attention)."
        )
    batch, height, width, dim = grid.shape
    x = np.asarray(grid, "float64").reshape(batch, height * width, dim)
    channel = get(CHANNEL_PROJECTIONS)
    spatial = get(SPATIAL_PROJECTIONS)
    block_pattern = re.compile(rf"{COUPLINGS}/vit/encoderblock_(\d+)/")
    num_blocks = len(
        {
            match.group(1)
            for name in params
            if (match := block_pattern.match(name))
        }
    )
    logdet = np.zeros((batch,))
    for index in range(channel.shape[0]):
        if np.any(channel[index]):
            # Column m of the 0/1 projection picks the input value of slot m.
            projected = np.einsum("btk,km->btm", x, channel[index])
            x1, x2 = np.split(projected, 2, axis=-1)
        else:
            projected = np.einsum("btk,tm->bmk", x, spatial[index])
            x1, x2 = np.split(projected, 2, axis=1)
            # Each token of a half becomes two tokens of D / 2 values.
            x1 = x1.reshape(batch, height * width, dim // 2)
            x2 = x2.reshape(batch, height * width, dim // 2)
        bias, raw_scale = _coupling_network(x1, get, index, num_blocks)
        x2 = (x2 + bias) * (FLOW_SCALE_FACTOR / (1.0 + np.exp(-raw_scale)))
        logdet += np.sum(
            _log_sigmoid(raw_scale) + math.log(FLOW_SCALE_FACTOR), axis=(1, 2)
        )
        if np.any(channel[index]):
            merged = np.concatenate([x1, x2], axis=-1)
            x = np.einsum("btm,km->btk", merged, channel[index])
        else:
            half = (batch, height * width // 2, dim)
            merged = np.concatenate(
                [x1.reshape(half), x2.reshape(half)], axis=1
            )
            x = np.einsum("bmk,tm->btk", merged, spatial[index])
        if progress is not None:
            progress(index)
    return x.reshape(batch, height, width, dim), logdet


def _rope(x, positions):
    """Apply rotary embeddings to `[B, L, heads, H]`, rotating half pairs."""
    half = x.shape[-1] // 2
    timescale = ROPE_MAX_WAVELENGTH ** (2.0 * np.arange(half) / x.shape[-1])
    radians = positions[..., None, None] / timescale
    sin, cos = np.sin(radians), np.cos(radians)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _decoder_layer(x, get, index, attention_mask, positions):
    """Apply one Gemma block: pre-norms, grouped-query attention, gated GELU."""
    layers = DECODER_LAYERS
    h = _rms_norm(x, get(f"{layers}/pre_attention_norm/scale", index))
    query = np.einsum(
        "btd,ndh->btnh", h, get(f"{layers}/attn/q_einsum/w", index)
    )
    key, value = np.einsum(
        "btd,ckdh->cbtkh", h, get(f"{layers}/attn/kv_einsum/w", index)
    )
    head_dim = query.shape[-1]
    query = _rope(query, positions) * head_dim**-0.5
    key = _rope(key, positions)
    # Query head n reads key/value head n // (heads per key/value head).
    group = query.shape[2] // key.shape[2]
    key = np.repeat(key, group, axis=2)
    value = np.repeat(value, group, axis=2)
    logits = np.einsum("bqnh,bsnh->bnqs", query, key)
    logits = np.where(attention_mask[:, None], logits, MASKED_LOGIT)
    encoded = np.einsum("bnqs,bsnh->bqnh", _softmax(logits), value)
    x = x + np.einsum(
        "bqnh,nhd->bqd", encoded, get(f"{layers}/attn/attn_vec_einsum/w", index)
    )
    h = _rms_norm(x, get(f"{layers}/pre_ffw_norm/scale", index))
    gating = get(f"{layers}/mlp/gating_einsum", index)
    h = _gelu(h @ gating[0]) * (h @ gating[1])
    return x + h @ get(f"{layers}/mlp/linear", index)


def numpy_transformer(
    params,
    token_ids,
    padding_mask,
    image_tokens,
    text_first_mask,
    bos_id,
    boi_id,
    num_vocab_repeats,
    progress=None,
):
    """Run JetFormer's transformer and heads in float64.

    Sequences are `[BOS, text, BOI, image]` on text-first rows and
    `[BOI, image, BOS, text]` otherwise, without their last element; the
    text is tiled `num_vocab_repeats` times with id offsets. Returns a dict
    with `hidden_states` `[B, L, E]`, `text_logits` `[B, T, V]` and
    `image_logits` `[B, N, K * (1 + 2d)]`. `progress(i)` is called after
    decoder layer `i`.
    """
    get = _Parameters(params)
    embedding = get("EmbedText/embedding")
    batch, text_length = token_ids.shape
    num_image_tokens = image_tokens.shape[1]
    vocabulary_size = embedding.shape[0] // num_vocab_repeats
    offsets = np.repeat(
        np.arange(num_vocab_repeats) * vocabulary_size, text_length
    )
    text_ids = np.tile(token_ids, (1, num_vocab_repeats)) + offsets
    text_mask = np.tile(np.asarray(padding_mask, bool), (1, num_vocab_repeats))
    text = embedding[text_ids]
    image = image_tokens @ get("EmbedImage/kernel") + get("EmbedImage/bias")
    bos = np.broadcast_to(embedding[bos_id], (batch, 1, embedding.shape[1]))
    boi = np.broadcast_to(embedding[boi_id], (batch, 1, embedding.shape[1]))
    valid = np.ones((batch, 1), bool)
    image_valid = np.ones((batch, num_image_tokens), bool)

    sequences, masks = [], []
    for row in range(batch):
        if text_first_mask[row]:
            parts = [bos, text, boi, image]
            part_masks = [valid, text_mask, valid, image_valid]
        else:
            parts = [boi, image, bos, text]
            part_masks = [valid, image_valid, valid, text_mask]
        sequences.append(np.concatenate([p[row] for p in parts])[:-1])
        masks.append(np.concatenate([m[row] for m in part_masks])[:-1])
    x = np.stack(sequences)
    input_mask = np.stack(masks)
    positions = np.cumsum(input_mask, axis=1) - 1
    length = x.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    attention_mask = causal[None] & input_mask[:, None, :]

    num_layers = params[f"{DECODER_LAYERS}/attn/q_einsum/w"].shape[0]
    for index in range(num_layers):
        x = _decoder_layer(x, get, index, attention_mask, positions)
        if progress is not None:
            progress(index)
    hidden_states = _rms_norm(x, get("decoder/final_norm/scale"))

    repeated_length = num_vocab_repeats * text_length
    text_hidden, image_hidden = [], []
    for row in range(batch):
        if text_first_mask[row]:
            text_hidden.append(hidden_states[row, :text_length])
            image_hidden.append(hidden_states[row, repeated_length + 1 :])
        else:
            image_hidden.append(hidden_states[row, :num_image_tokens])
            start = num_image_tokens + 1
            text_hidden.append(hidden_states[row, start : start + text_length])
    text_hidden, image_hidden = np.stack(text_hidden), np.stack(image_hidden)
    if "LogitsText/kernel" in params:
        text_logits = text_hidden @ get("LogitsText/kernel")
        if "LogitsText/bias" in params:
            text_logits = text_logits + get("LogitsText/bias")
    else:
        text_logits = text_hidden @ embedding.T
    image_logits = image_hidden @ get("LogitsImage/kernel")
    image_logits = image_logits + get("LogitsImage/bias")
    return {
        "hidden_states": hidden_states,
        "text_logits": text_logits,
        "image_logits": image_logits,
    }


def run_compiled(layer, function, *args):
    """Call `function(*args)`, compiled with `jax.jit` on the JAX backend.

    Eager JAX compiles each operation on first use. On a busy 2-core CPU
    this made one forward pass of the tiny test model take about 15 s,
    against about 4 s compiled. The compiled function reads `layer`'s
    weights through a `keras.StatelessScope`. Other backends call
    `function` directly.
    """
    import keras

    if keras.backend.backend() != "jax":
        return function(*args)
    import jax

    variables = layer.variables

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    values = [variable.value for variable in variables]
    return jax.jit(stateless)(values, *args)


def sample_inputs(backbone, seed=0):
    """Build a fixed input: row 0 text first, row 1 image first and padded."""
    rng = np.random.default_rng(seed)
    specials = [backbone.bos_id, backbone.boi_id, backbone.nolabel_id]
    # Plain text ids below every special id (at least id 0).
    id_limit = max(1, min(specials))
    return {
        "images": rng.uniform(-1.0, 1.0, (2, *backbone.image_shape)).astype(
            "float32"
        ),
        "token_ids": rng.integers(0, id_limit, (2, 4)).astype("int32"),
        "padding_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool),
        "text_first_mask": np.array([True, False]),
    }


def _assert_close(name, ours, expected, tolerance):
    ours = np.asarray(ours, "float64")
    expected = np.asarray(expected, "float64")
    if ours.shape != expected.shape:
        raise ConversionError(
            f"Check {name!r} failed: shape {ours.shape} differs from the "
            f"expected {expected.shape}."
        )
    difference = float(np.max(np.abs(ours - expected))) if ours.size else 0.0
    print(f"  {name}: max abs difference {difference:.3g}")
    try:
        np.testing.assert_allclose(
            ours, expected, rtol=tolerance, atol=tolerance
        )
    except AssertionError as error:
        raise ConversionError(
            f"Check {name!r} failed with rtol=atol={tolerance}:{error}"
        ) from error
    return difference


def _progress_bar(total, label):
    import keras

    print(f"  {label}")
    bar = keras.utils.Progbar(total)
    return lambda index: bar.update(index + 1)


def check_against_numpy(backbone, params, tolerance, show_progress=True):
    """Compare the backbone's outputs on `sample_inputs` with numpy.

    Raises `ConversionError` when an output differs by more than
    `tolerance` (relative and absolute). Returns the max abs difference per
    output.
    """
    from keras import ops

    inputs = sample_inputs(backbone)
    outputs = run_compiled(backbone, backbone, inputs)
    grid = numpy_patchify(inputs["images"], backbone.patch_size)
    num_couplings = params[CHANNEL_PROJECTIONS].shape[0]
    flow_progress = (
        _progress_bar(num_couplings, "numpy flow, per coupling")
        if show_progress
        else None
    )
    flow_grid, logdet = numpy_flow_forward(params, grid, flow_progress)
    image_tokens = flow_grid.reshape(grid.shape[0], -1, grid.shape[-1])
    num_layers = params[f"{DECODER_LAYERS}/attn/q_einsum/w"].shape[0]
    transformer_progress = (
        _progress_bar(num_layers, "numpy transformer, per decoder layer")
        if show_progress
        else None
    )
    expected = numpy_transformer(
        params,
        inputs["token_ids"],
        inputs["padding_mask"],
        image_tokens[..., : backbone.image_token_dim],
        inputs["text_first_mask"],
        backbone.bos_id,
        backbone.boi_id,
        backbone.num_vocab_repeats,
        transformer_progress,
    )
    expected["image_tokens"] = image_tokens
    expected["logdet"] = logdet
    differences = {}
    for name in (
        "image_tokens",
        "logdet",
        "hidden_states",
        "text_logits",
        "image_logits",
    ):
        differences[name] = _assert_close(
            name, ops.convert_to_numpy(outputs[name]), expected[name], tolerance
        )
    return differences


# --- Reference outputs -------------------------------------------------------

FLOW_KEYS = ("forward", "inverse")
DECODE_KEYS = ("text", "text_mask", "image_tokens")
DECODE_OUTPUTS = (
    "image_prelogits",
    "gmm_locs",
    "gmm_scales",
    "gmm_log_weights",
    "gmm_logprob",
)


def _check_flow_reference(backbone, reference, tolerance):
    from keras import ops

    checked = 0
    for direction in FLOW_KEYS:
        if f"{direction}_in" not in reference:
            continue
        inverse = direction == "inverse"
        outputs, logdet = run_compiled(
            backbone.flow,
            lambda x: backbone.flow(x, inverse=inverse),
            reference[f"{direction}_in"],
        )
        for name, value in (("out", outputs), ("logdet", logdet)):
            key = f"{direction}_{name}"
            if key in reference:
                _assert_close(
                    key, ops.convert_to_numpy(value), reference[key], tolerance
                )
                checked += 1
    return checked


def _check_decode_reference(backbone, reference, tolerance):
    """Compare a teacher-forced text-first pass with `full/*` arrays."""
    from keras import ops

    if not all(key in reference for key in DECODE_KEYS):
        return 0
    transformer = backbone.transformer
    head = transformer.image_head
    text_first = np.ones((reference["text"].shape[0],), bool)

    def teacher_forced_pass(token_ids, padding_mask, image_tokens, drop_prefix):
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
        logits = head(prelogits)
        mixture_logits, means, scales = head.mixture(logits)
        return {
            "image_prelogits": prelogits,
            "gmm_locs": means,
            "gmm_scales": scales,
            "gmm_log_weights": ops.log_softmax(mixture_logits, axis=-1),
            "gmm_logprob": head.log_prob(logits, image_tokens),
        }

    ours = run_compiled(
        transformer,
        teacher_forced_pass,
        reference["text"],
        reference["text_mask"],
        reference["image_tokens"],
        reference.get("drop_prefix"),
    )
    checked = 0
    for name in DECODE_OUTPUTS:
        key = f"full/{name}"
        if key in reference:
            _assert_close(
                key, ops.convert_to_numpy(ours[name]), reference[key], tolerance
            )
            checked += 1
    return checked


def check_reference_outputs(backbone, path, tolerance):
    """Compare the backbone with big_vision outputs stored in `path`.

    Recognized arrays: the flow's `forward_in`/`forward_out`/
    `forward_logdet` and `inverse_in`/`inverse_out`/`inverse_logdet`, and a
    teacher-forced text-first pass given by `text`, `text_mask`,
    `image_tokens` and optional `drop_prefix`, compared with
    `full/image_prelogits` and `full/gmm_*`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"Reference output file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            reference = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(
            f"Failed to read {path} as a numpy .npz file: {error}"
        ) from error
    checked = _check_flow_reference(backbone, reference, tolerance)
    checked += _check_decode_reference(backbone, reference, tolerance)
    if not checked:
        raise ConversionError(
            f"{path} contains no recognized reference outputs (for example "
            f"`forward_in` with `forward_out`). Found: {sorted(reference)}"
        )
    return checked


# --- Command line ------------------------------------------------------------


def build_parser():
    # The module docstring, which covers the supported formats and how to
    # export a tensorstore checkpoint, is the --help description.
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    parser.add_argument(
        "--params",
        required=True,
        help="Path of the .npz parameter file.",
    )

    parser.add_argument(
        "--subtree",
        default="auto",
        help=(
            "Name prefix that contains the model parameters in a "
            "training-state file, e.g. `params`, `params_ema` or "
            "`opt/target`. `auto` uses "
            "`params` or `opt/target` when present, else every name; an "
            "empty string uses every name. Default: %(default)s."
        ),
    )

    parser.add_argument(
        "--output-dir", required=True, help="Folder to write the preset into."
    )

    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "Write into a non-empty output folder. Preset files with the "
            "same names are replaced; other files are kept."
        ),
    )

    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="Image height and width, in pixels. Default: %(default)s."
    )

    parser.add_argument(
        "--patch-size",
        type=int,
        default=16,
        help="Side of the square patches, in pixels. Default: %(default)s.",
    )

    parser.add_argument(
        "--channels",
        type=int,
        default=3,
        help="Image channels. Default: %(default)s.",
    )

    parser.add_argument(
        "--num-vocab-repeats",
        type=int,
        default=None,
        help=(
            "Number of times the text is embedded with separate tables "
            "(16 in the published ImageNet 256px config, 1 in the "
            "image-text config). Default: the embedding rows divided by "
            "the largest special id plus one; 1 when no special id is given."
        ),
    )

    parser.add_argument(
        "--bos-id",
        type=int,
        default=None,
        help="Beginning-of-sentence id. Default: vocabulary size - 3.",
    )

    parser.add_argument(
        "--boi-id",
        type=int,
        default=None,
        help="Beginning-of-image id. Default: vocabulary size - 2.",
    )

    parser.add_argument(
        "--nolabel-id",
        type=int,
        default=None,
        help="Id of dropped text prefixes. Default: vocabulary size - 1.",
    )

    parser.add_argument(
        "--reference-outputs",
        action="append",
        default=[],
        metavar="FILE.npz",
        help=(
            "A .npz file of big_vision outputs to compare against (flow "
            "`forward_*`/`inverse_*` arrays, or a teacher-forced pass with "
            "`text`, `text_mask`, `image_tokens` and `full/*`). Repeatable."
        ),
    )

    # NOTE: the default was checked on the tiny test fixture only, whose
    # outputs match to about 1e-5. Deeper models may need a larger value.
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help=(
            "rtol and atol of every numerical check. The tiny test fixture "
            "matches to about 1e-5; deeper models accumulate more float32 "
            "rounding error. Default: %(default)s."
        ),
    )
    return parser


def _check_output_dir(path, overwrite):
    if path.exists() and not path.is_dir():
        raise ConversionError(
            f"--output-dir {path} exists and is not a folder."
        )
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output-dir {path} is not empty. Pass --overwrite to write "
            "into it anyway, or choose another folder."
        )


def convert(args):
    output_dir = pathlib.Path(args.output_dir)
    _check_output_dir(output_dir, args.overwrite)
    for path in args.reference_outputs:
        if not pathlib.Path(path).is_file():
            raise ConversionError(f"Reference output file not found: {path}")

    print(f"[1/5] Reading parameters from {args.params}")
    params = read_parameter_file(args.params, args.subtree)
    params = normalize_parameter_names(params)
    check_required_names(params)
    num_values = sum(int(np.prod(value.shape)) for value in params.values())
    print(f"  {len(params)} arrays, {num_values:,} values")

    special_ids = (args.bos_id, args.boi_id, args.nolabel_id)
    num_vocab_repeats = args.num_vocab_repeats
    if num_vocab_repeats is None:
        num_vocab_repeats, explanation = infer_num_vocab_repeats(
            params, special_ids
        )
        print(f"  {explanation}")

    print("[2/5] Building the backbone and loading weights")
    from keras_jetformer.conversion.big_vision import backbone_from_big_vision
    from keras_jetformer.conversion.big_vision import big_vision_weight_names

    image_shape = (args.image_size, args.image_size, args.channels)
    try:
        backbone = backbone_from_big_vision(
            params,
            image_shape,
            args.patch_size,
            num_vocab_repeats=num_vocab_repeats,
            bos_id=args.bos_id,
            boi_id=args.boi_id,
            nolabel_id=args.nolabel_id,
        )
    except (KeyError, ValueError) as error:
        raise ConversionError(
            f"Failed to build the backbone: {error}"
        ) from error
    used = set(big_vision_weight_names(backbone, params).values())
    # A flow with one coupling kind leaves the other kind's projections all
    # zero and unused.
    unused = sorted(
        name
        for name in set(params) - used
        if not (
            name in (CHANNEL_PROJECTIONS, SPATIAL_PROJECTIONS)
            and not np.any(params[name])
        )
    )
    if unused:
        raise ConversionError(
            f"These parameters are not used by the conversion: {unused}. "
            "The checkpoint uses a feature that this conversion does not "
            "support, so the converted model would compute something else."
        )
    print(
        f"  {backbone.count_params():,} weights; image {image_shape}, patch "
        f"{args.patch_size}, vocabulary {backbone.vocabulary_size} x "
        f"{backbone.num_vocab_repeats}, ids BOS {backbone.bos_id} / BOI "
        f"{backbone.boi_id} / NOLABEL {backbone.nolabel_id}"
    )

    print("[3/5] Comparing with a float64 numpy re-computation")
    check_against_numpy(backbone, params, args.tolerance)

    print("[4/5] Comparing with reference outputs")
    if not args.reference_outputs:
        print("  none given (--reference-outputs)")
    for path in args.reference_outputs:
        print(f"  {path}")
        check_reference_outputs(backbone, path, args.tolerance)

    print(f"[5/5] Saving the preset to {output_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    backbone.save_to_preset(os.fspath(output_dir))
    print("Done.")
    return backbone


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        convert(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
