"""Tests for `tools/checkpoint_conversion/convert_big_vision_checkpoint.py`.

The command line runs once, in a subprocess, on the tiny parity fixture.
The other tests import the tool's functions: its input checks, and its
numpy re-computation on a random model with both coupling kinds, a fused
`qkv_einsum`, unscanned decoder layers and two vocabulary repeats.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from keras import ops

from keras_jetformer.conversion.big_vision import backbone_from_big_vision
from keras_jetformer.models import JetFormerBackbone

REPOSITORY = pathlib.Path(__file__).parents[2]
TOOL_PATH = (
    REPOSITORY
    / "tools"
    / "checkpoint_conversion"
    / "convert_big_vision_checkpoint.py"
)
FIXTURE_DIR = REPOSITORY / "tests" / "fixtures" / "parity_tiny"
FIXTURE_CONFIG = {
    "image_shape": (16, 16, 3),
    "patch_size": 4,
    "bos_id": 32,
    "boi_id": 33,
    "nolabel_id": 34,
}
FIXTURE_ARGS = [
    "--params",
    str(FIXTURE_DIR / "params.npz"),
    "--image-size",
    "16",
    "--patch-size",
    "4",
    "--channels",
    "3",
    "--bos-id",
    "32",
    "--boi-id",
    "33",
    "--nolabel-id",
    "34",
]


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_big_vision_checkpoint", TOOL_PATH
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def fixture_params():
    with np.load(FIXTURE_DIR / "params.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def conversion(tmp_path_factory):
    """Run the command line once; return `(completed_process, output_dir)`."""
    output_dir = tmp_path_factory.mktemp("conversion") / "jetformer_tiny"
    command = [
        sys.executable,
        str(TOOL_PATH),
        *FIXTURE_ARGS,
        "--reference-outputs",
        str(FIXTURE_DIR / "flow.npz"),
        "--reference-outputs",
        str(FIXTURE_DIR / "decode.npz"),
        "--output-dir",
        str(output_dir),
    ]
    # The subprocess inherits KERAS_BACKEND, so it runs on the tested backend.
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=dict(os.environ),
        timeout=600,
    )
    return result, output_dir


def _without_keys(params, *names):
    return {key: value for key, value in params.items() if key not in names}


# --- The command line on the fixture -----------------------------------------


def test_cli_converts_fixture(conversion):
    result, output_dir = conversion
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in result.stdout
    # Every reference array of both files was compared.
    for name in (
        "forward_out",
        "forward_logdet",
        "inverse_out",
        "inverse_logdet",
        "full/image_prelogits",
        "full/gmm_logprob",
    ):
        assert f"{name}: max abs difference" in result.stdout, name
    assert (output_dir / "config.json").is_file()
    assert (output_dir / "model.weights.h5").is_file()


def test_cli_preset_loads_with_same_outputs(conversion, tool, fixture_params):
    result, output_dir = conversion
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = JetFormerBackbone.from_preset(str(output_dir))
    kwargs = dict(FIXTURE_CONFIG)
    expected = backbone_from_big_vision(
        fixture_params,
        kwargs.pop("image_shape"),
        kwargs.pop("patch_size"),
        **kwargs,
    )
    loaded_paths = [weight.path for weight in loaded.weights]
    assert loaded_paths == [weight.path for weight in expected.weights]
    for ours, theirs in zip(loaded.weights, expected.weights):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(ours), ops.convert_to_numpy(theirs), ours.path
        )
    inputs = tool.sample_inputs(expected)
    loaded_outputs = tool.run_compiled(loaded, loaded, inputs)
    expected_outputs = tool.run_compiled(expected, expected, inputs)
    assert sorted(loaded_outputs) == sorted(expected_outputs)
    for name in expected_outputs:
        np.testing.assert_array_equal(
            ops.convert_to_numpy(loaded_outputs[name]),
            ops.convert_to_numpy(expected_outputs[name]),
            err_msg=name,
        )


# --- Input errors ------------------------------------------------------------


def _run_main(tool, capsys, arguments):
    code = tool.main(arguments)
    return code, capsys.readouterr().err


def test_cli_rejects_missing_file(tool, tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    code, error = _run_main(
        tool,
        capsys,
        ["--params", str(missing), "--output-dir", str(tmp_path / "out")],
    )
    assert code == 1
    assert f"Parameter file not found: {missing}" in error


def test_cli_rejects_missing_parameter(tool, tmp_path, capsys, fixture_params):
    path = tmp_path / "truncated.npz"
    np.savez(path, **_without_keys(fixture_params, "decoder/final_norm/scale"))
    arguments = FIXTURE_ARGS + ["--output-dir", str(tmp_path / "out")]
    arguments[1] = str(path)
    code, error = _run_main(tool, capsys, arguments)
    assert code == 1
    assert "lacks 1 required parameter" in error
    assert "decoder/final_norm/scale" in error
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unused_parameter(tool, tmp_path, capsys, fixture_params):
    # A `per_modality_final_norm` model has norms the conversion ignores.
    params = dict(fixture_params)
    params["ImageNorm/scale"] = np.zeros((64,), "float32")
    path = tmp_path / "extra.npz"
    np.savez(path, **params)
    arguments = FIXTURE_ARGS + ["--output-dir", str(tmp_path / "out")]
    arguments[1] = str(path)
    code, error = _run_main(tool, capsys, arguments)
    assert code == 1
    assert "not used by the conversion" in error
    assert "ImageNorm/scale" in error


def test_cli_rejects_non_empty_output_dir(tool, tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("user data")
    code, error = _run_main(
        tool, capsys, FIXTURE_ARGS + ["--output-dir", str(output_dir)]
    )
    assert code == 1
    assert "is not empty" in error
    assert "--overwrite" in error
    assert sorted(p.name for p in output_dir.iterdir()) == ["keep.txt"]


def test_cli_rejects_tensorstore_folder(tool, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.bv-000001000"
    checkpoint.mkdir()
    code, error = _run_main(
        tool,
        capsys,
        ["--params", str(checkpoint), "--output-dir", str(tmp_path / "out")],
    )
    assert code == 1
    assert "tensorstore or orbax" in error


def test_cli_rejects_missing_reference_file(tool, tmp_path, capsys):
    missing = tmp_path / "reference.npz"
    arguments = FIXTURE_ARGS + [
        "--reference-outputs",
        str(missing),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    code, error = _run_main(tool, capsys, arguments)
    assert code == 1
    assert f"Reference output file not found: {missing}" in error


# --- Reading and naming ------------------------------------------------------


def test_read_parameter_file_selects_params_subtree(tool, tmp_path):
    import ml_dtypes

    weights = np.array([[1.5, -2.0], [0.25, 3.0]], ml_dtypes.bfloat16)
    path = tmp_path / "state.npz"
    # numpy writes bfloat16 as 2-byte void values, as big_vision files do.
    np.savez(
        path,
        **{
            "params/EmbedImage/kernel": weights,
            "params_ema/EmbedImage/kernel": np.zeros((2, 2), "float32"),
            "opt/count": np.array(3),
        },
    )
    params = tool.read_parameter_file(path)
    assert sorted(params) == ["EmbedImage/kernel"]
    assert params["EmbedImage/kernel"].dtype == np.float32
    np.testing.assert_array_equal(
        params["EmbedImage/kernel"], weights.astype("float32")
    )
    ema = tool.read_parameter_file(path, subtree="params_ema")
    np.testing.assert_array_equal(ema["EmbedImage/kernel"], np.zeros((2, 2)))
    with pytest.raises(tool.ConversionError, match="pick one with --subtree"):
        tool.read_parameter_file(path, subtree="missing")


def test_infer_num_vocab_repeats(tool):
    imagenet = {"EmbedText/embedding": np.zeros((1003 * 16, 1))}
    repeats, _ = tool.infer_num_vocab_repeats(imagenet, (1000, 1001, 1002))
    assert repeats == 16
    repeats, _ = tool.infer_num_vocab_repeats(imagenet, (None, None, None))
    assert repeats == 1
    with pytest.raises(tool.ConversionError, match="--num-vocab-repeats"):
        tool.infer_num_vocab_repeats(imagenet, (1000, 1001, 1004))
    untied = dict(imagenet, **{"LogitsText/kernel": np.zeros((1, 16048))})
    assert tool.infer_num_vocab_repeats(untied, (1000, 1001, 1002))[0] == 1


# --- The numpy re-computation on a random model ------------------------------

# Random model: 8x8x3 images with 2x2 patches give a 4x4 grid of 12 values.
RANDOM_GRID = (4, 4)
RANDOM_TOKEN_DIM = 12
RANDOM_KINDS = ("channels", "spatial", "spatial")
RANDOM_PATTERNS = ("checkerboard", "hstripes-inv")


def _spatial_projection(pattern, grid_height, grid_width):
    """A 0/1 `[N, N]` spatial split projection in the big_vision layout.

    Column m < N / 2 selects a token of the conditioning half, column
    m >= N / 2 one of the transformed half.
    """
    n = grid_height * grid_width
    index = np.arange(n)
    if pattern.startswith("checkerboard"):
        first = (index + index // grid_width) % 2 == 0
    elif pattern.startswith("hstripes"):
        first = (index // grid_width) % 2 == 0
    else:
        raise ValueError(f"Unknown pattern {pattern!r}")
    first_half, second_half = np.flatnonzero(first), np.flatnonzero(~first)
    if pattern.endswith("-inv"):
        first_half, second_half = second_half, first_half
    projection = np.zeros((n, n), "float32")
    projection[first_half, np.arange(n // 2)] = 1.0
    projection[second_half, np.arange(n // 2, n)] = 1.0
    return projection


def _random_big_vision_params(seed=0):
    """Random big_vision parameters in the unscanned, fused-QKV layout."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (0.3 * rng.standard_normal(shape)).astype("float32")

    width, heads, head_dim, mlp, layers = 16, 2, 8, 32, 2
    token_dim, modelled_dim, mixtures = RANDOM_TOKEN_DIM, 4, 3
    vocabulary, repeats = 13, 2
    couplings, flow_width, flow_heads, flow_blocks = len(RANDOM_KINDS), 8, 2, 2
    num_tokens = RANDOM_GRID[0] * RANDOM_GRID[1]
    half = token_dim // 2

    params = {
        "EmbedImage/kernel": normal(modelled_dim, width),
        "EmbedImage/bias": normal(width),
        "EmbedText/embedding": normal(vocabulary * repeats, width),
        "LogitsImage/kernel": normal(width, mixtures * (1 + 2 * modelled_dim)),
        "LogitsImage/bias": normal(mixtures * (1 + 2 * modelled_dim)),
        "decoder/final_norm/scale": normal(width),
    }
    for layer in range(layers):
        prefix = f"decoder/layers/{layer}"
        attention = f"{prefix}/attn"
        params[f"{attention}/qkv_einsum/w"] = normal(3, heads, width, head_dim)
        params[f"{attention}/attn_vec_einsum/w"] = normal(
            heads, head_dim, width
        )
        params[f"{prefix}/mlp/gating_einsum"] = normal(2, width, mlp)
        params[f"{prefix}/mlp/linear"] = normal(mlp, width)
        params[f"{prefix}/pre_attention_norm/scale"] = normal(width)
        params[f"{prefix}/pre_ffw_norm/scale"] = normal(width)

    channel = np.zeros((couplings, token_dim, token_dim), "float32")
    spatial = np.zeros((couplings, num_tokens, num_tokens), "float32")
    patterns = iter(RANDOM_PATTERNS)
    for index, kind in enumerate(RANDOM_KINDS):
        if kind == "channels":
            permutation = rng.permutation(token_dim)
            channel[index, permutation, np.arange(token_dim)] = 1.0
        else:
            spatial[index] = _spatial_projection(next(patterns), *RANDOM_GRID)
    flow = "params_adaptor"
    dnn = f"{flow}/couplings/dnn"
    params[f"{flow}/channel_coupling_masks-FREEZE_ME"] = channel
    params[f"{flow}/spatial_coupling_masks-FREEZE_ME"] = spatial
    params[f"{dnn}/init_proj/kernel"] = normal(couplings, half, flow_width)
    params[f"{dnn}/init_proj/bias"] = normal(couplings, flow_width)
    params[f"{dnn}/final_proj/kernel"] = normal(
        couplings, flow_width, token_dim
    )
    params[f"{dnn}/final_proj/bias"] = normal(couplings, token_dim)
    params[f"{dnn}/posemb"] = normal(couplings, 1, num_tokens, flow_width)
    params[f"{dnn}/vit/encoder_norm/scale"] = 1.0 + normal(
        couplings, flow_width
    )
    params[f"{dnn}/vit/encoder_norm/bias"] = normal(couplings, flow_width)
    flow_head_dim = flow_width // flow_heads
    for block in range(flow_blocks):
        prefix = f"{dnn}/vit/encoderblock_{block}"
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            params[f"{prefix}/{norm}/scale"] = 1.0 + normal(
                couplings, flow_width
            )
            params[f"{prefix}/{norm}/bias"] = normal(couplings, flow_width)
        attention = f"{prefix}/MultiHeadDotProductAttention_0"
        for part in ("query", "key", "value"):
            params[f"{attention}/{part}/kernel"] = normal(
                couplings, flow_width, flow_heads, flow_head_dim
            )
            params[f"{attention}/{part}/bias"] = normal(
                couplings, flow_heads, flow_head_dim
            )
        params[f"{attention}/out/kernel"] = normal(
            couplings, flow_heads, flow_head_dim, flow_width
        )
        params[f"{attention}/out/bias"] = normal(couplings, flow_width)
        mlp_prefix = f"{prefix}/MlpBlock_0"
        params[f"{mlp_prefix}/Dense_0/kernel"] = normal(
            couplings, flow_width, 32
        )
        params[f"{mlp_prefix}/Dense_0/bias"] = normal(couplings, 32)
        params[f"{mlp_prefix}/Dense_1/kernel"] = normal(
            couplings, 32, flow_width
        )
        params[f"{mlp_prefix}/Dense_1/bias"] = normal(couplings, flow_width)
    return params


@pytest.fixture(scope="module")
def random_model(tool):
    """`(params, backbone)` for the random model, after name normalization."""
    params = tool.normalize_parameter_names(_random_big_vision_params())
    tool.check_required_names(params)
    backbone = backbone_from_big_vision(
        params,
        (8, 8, 3),
        2,
        num_vocab_repeats=2,
        bos_id=10,
        boi_id=11,
        nolabel_id=12,
    )
    return params, backbone


def test_normalize_stacks_layers_and_splits_qkv(random_model):
    params, _ = random_model
    assert params["decoder/layers/attn/q_einsum/w"].shape == (2, 2, 16, 8)
    assert params["decoder/layers/attn/kv_einsum/w"].shape == (2, 2, 2, 16, 8)
    assert params["decoder/layers/mlp/linear"].shape == (2, 32, 16)
    assert not any(name.startswith("decoder/layers/0/") for name in params)


def test_random_model_has_both_coupling_kinds(random_model):
    _, backbone = random_model
    assert backbone.flow_coupling_kinds == RANDOM_KINDS
    assert backbone.flow_spatial_patterns == RANDOM_PATTERNS
    assert backbone.num_vocab_repeats == 2
    assert backbone.num_key_value_heads == backbone.num_query_heads


def test_numpy_check_matches_random_model(tool, random_model):
    params, backbone = random_model
    differences = tool.check_against_numpy(
        backbone, params, tolerance=1e-5, show_progress=False
    )
    assert set(differences) == {
        "image_tokens",
        "logdet",
        "hidden_states",
        "text_logits",
        "image_logits",
    }


@pytest.mark.parametrize(
    "weight, failing_output",
    [
        (lambda b: b.flow.couplings[1].output_projection.bias, "image_tokens"),
        (
            lambda b: b.transformer.decoder_blocks[1].ffw_down.kernel,
            "hidden_states",
        ),
    ],
    ids=["flow", "transformer"],
)
def test_numpy_check_detects_changed_weight(
    tool, random_model, weight, failing_output
):
    params, backbone = random_model
    variable = weight(backbone)
    original = ops.convert_to_numpy(variable)
    variable.assign(original + 0.01)
    try:
        with pytest.raises(tool.ConversionError, match=failing_output):
            tool.check_against_numpy(
                backbone, params, tolerance=1e-5, show_progress=False
            )
    finally:
        variable.assign(original)


def test_numpy_check_detects_permuted_channels(tool, random_model):
    # Loading a channel projection transposed (the inverse permutation)
    # must show up: the check reads the projection from the parameters.
    params, backbone = random_model
    name = "params_adaptor/channel_coupling_masks-FREEZE_ME"
    wrong = dict(params)
    wrong[name] = np.transpose(params[name], (0, 2, 1))
    with pytest.raises(tool.ConversionError, match="image_tokens"):
        tool.check_against_numpy(
            backbone, wrong, tolerance=1e-5, show_progress=False
        )
