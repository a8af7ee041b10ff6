"""Every public entry point rejects a bad input with a clear error.

One table: each case builds or calls something with one bad input and
names the exception type and a fragment of its message. Warnings (inputs
that are accepted but probably wrong) are in the table too, with the
warning class in place of the exception.
"""

import importlib.util
import json
import os
import pathlib
import shutil

import keras
import numpy as np
import pytest
from jetformer_preset_utils import TINY_PRESET_BACKBONE_CONFIG
from jetformer_preset_utils import save_tiny_preset
from jetformer_preset_utils import tiny_text_to_image
from jetformer_test_utils import tiny_backbone

from keras_jetformer import data
from keras_jetformer.layers import GaussianMixtureHead
from keras_jetformer.layers import JetCoupling
from keras_jetformer.layers import JetFlow
from keras_jetformer.models import JetFormerBackbone
from keras_jetformer.models import JetFormerCausalLM
from keras_jetformer.models import JetFormerCausalLMPreprocessor
from keras_jetformer.models import JetFormerImageConverter
from keras_jetformer.models import JetFormerTextToImage
from keras_jetformer.models import JetFormerTextToImagePreprocessor
from keras_jetformer.training import jetformer_optimizer

EXAMPLES_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples"
IMAGE_SHAPE = TINY_PRESET_BACKBONE_CONFIG["image_shape"]


class Models:
    """Models and preset directories shared by the cases, built once."""

    def __init__(self, directory):
        self.directory = directory
        self.text_to_image = tiny_text_to_image()
        self.backbone = self.text_to_image.backbone
        self.preprocessor = self.text_to_image.preprocessor
        self.bare_text_to_image = JetFormerTextToImage(self.backbone)
        self.causal_lm = JetFormerCausalLM(
            self.backbone,
            JetFormerCausalLMPreprocessor(
                self.preprocessor.tokenizer,
                JetFormerImageConverter(),
                sequence_length=8,
            ),
        )
        self.preset = save_tiny_preset(directory / "preset")

    def training_task(self):
        """A new task without a preprocessor for one `fit` case.

        On JAX, Keras frees the variables' values during `fit` and restores
        them at the end, so a `fit` that raises leaves its model unusable.
        """
        return JetFormerTextToImage(tiny_text_to_image(seed=1).backbone)

    def preset_copy(self, name, edit):
        """Copy the tiny preset to `name` and apply `edit` to the copy."""
        path = self.directory / name
        if not path.exists():
            shutil.copytree(self.preset, path)
            edit(path)
        return str(path)

    def preset_without_weights(self):
        return self.preset_copy(
            "no_weights", lambda path: os.remove(path / "model.weights.h5")
        )

    def preset_with_corrupted_weights(self):
        def corrupt(path):
            weights = path / "model.weights.h5"
            weights.write_bytes(weights.read_bytes()[:1000])

        return self.preset_copy("corrupted", corrupt)

    def preset_of_another_class(self):
        def relabel(path):
            config_path = path / "config.json"
            config = json.loads(config_path.read_text())
            config["class_name"] = "GemmaBackbone"
            config["registered_name"] = "keras_hub>GemmaBackbone"
            config_path.write_text(json.dumps(config))

        return self.preset_copy("gemma", relabel)

    def foreign_directory(self):
        path = self.directory / "foreign"
        path.mkdir(exist_ok=True)
        (path / "notes.txt").write_text("not a preset")
        return str(path)

    def empty_directory(self):
        path = self.directory / "empty"
        path.mkdir(exist_ok=True)
        return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("bad_inputs"))


def uint8_images(batch_size=2, shape=IMAGE_SHAPE):
    return np.zeros((batch_size, *shape), "uint8")


def float_images(value, batch_size=2, shape=IMAGE_SHAPE):
    return np.full((batch_size, *shape), value, "float32")


def tokenized(token_ids, sequence_length=8, batch_size=2):
    return {
        "token_ids": np.full((batch_size, sequence_length), token_ids, "int32"),
        "padding_mask": np.ones((batch_size, sequence_length), "bool"),
    }


def parse_example_args(script, argv):
    spec = importlib.util.spec_from_file_location(
        script, EXAMPLES_DIR / f"{script}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


def tf_dataset(inputs):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(inputs).batch(2)


def fit_once(task, inputs):
    task.compile(optimizer="adam")
    if isinstance(inputs, dict):
        task.fit(inputs, epochs=1, batch_size=2, verbose=0)
    else:
        task.fit(inputs, epochs=1, verbose=0)


# (case id, call taking the `Models`, exception or warning class, message
# fragment). The fragment is matched with `re.search` after `re.escape`.
CASES = [
    # --- Layers ----------------------------------------------------------
    (
        "flow_odd_token_dim",
        lambda m: JetFlow(
            num_couplings=1, hidden_dim=4, num_layers=1, num_heads=1
        )(np.zeros((1, 2, 2, 3), "float32")),
        ValueError,
        "must be even",
    ),
    (
        "flow_zero_couplings",
        lambda m: JetFlow(
            num_couplings=0, hidden_dim=4, num_layers=1, num_heads=1
        ),
        ValueError,
        "Received: num_couplings=0",
    ),
    (
        "coupling_unknown_kind",
        lambda m: JetCoupling(
            kind="diagonal", hidden_dim=4, num_layers=1, num_heads=1
        ),
        ValueError,
        "Received: kind='diagonal'",
    ),
    (
        "mixture_head_zero_mixtures",
        lambda m: GaussianMixtureHead(num_mixtures=0, token_dim=2),
        ValueError,
        "Received: num_mixtures=0",
    ),
    # --- Backbone arguments ----------------------------------------------
    (
        "backbone_image_shape_rank",
        lambda m: tiny_backbone(image_shape=(8, 8)),
        ValueError,
        "Received: image_shape=(8, 8)",
    ),
    (
        "backbone_size_not_divisible",
        lambda m: tiny_backbone(image_shape=(9, 8, 1)),
        ValueError,
        "divisible by `patch_size`",
    ),
    (
        "backbone_zero_mixtures",
        lambda m: tiny_backbone(num_mixtures=0),
        ValueError,
        "Received: num_mixtures=0",
    ),
    (
        "backbone_latent_dim_equals_token_dim",
        lambda m: tiny_backbone(image_token_dim=4),
        ValueError,
        "Received: image_token_dim=4",
    ),
    (
        "backbone_latent_dim_above_token_dim",
        lambda m: tiny_backbone(image_token_dim=5),
        ValueError,
        "smaller than the token dimension",
    ),
    (
        "backbone_odd_token_dim",
        lambda m: tiny_backbone(
            image_shape=(3, 3, 3), patch_size=1, image_token_dim=1
        ),
        ValueError,
        "must be even",
    ),
    (
        "backbone_special_id_outside_vocabulary",
        lambda m: tiny_backbone(bos_id=13),
        ValueError,
        "Received: bos_id=13",
    ),
    (
        "backbone_float_num_layers",
        lambda m: tiny_backbone(num_layers=2.0),
        ValueError,
        "Received: num_layers=2.0",
    ),
    # --- Backbone calls ----------------------------------------------------
    (
        "encode_images_unbatched",
        lambda m: m.backbone.encode_images(float_images(0.0)[0]),
        ValueError,
        "Received: images.shape=(32, 32, 1)",
    ),
    (
        "encode_images_wrong_size",
        lambda m: m.backbone.encode_images(float_images(0.0, shape=(16, 16, 1))),
        ValueError,
        "the model's image shape",
    ),
    (
        "encode_images_wrong_channels",
        lambda m: m.backbone.encode_images(float_images(0.0, shape=(32, 32, 3))),
        ValueError,
        "Received: images.shape=(2, 32, 32, 3)",
    ),
    (
        "encode_images_uint8",
        lambda m: m.backbone.encode_images(uint8_images()),
        TypeError,
        "Received: images.dtype=uint8",
    ),
    (
        "decode_images_wrong_token_shape",
        lambda m: m.backbone.decode_images(np.zeros((2, 64, 15), "float32")),
        ValueError,
        "Received: image_tokens.shape=(2, 64, 15)",
    ),
    # --- Image converter ---------------------------------------------------
    (
        "converter_nan_pixels",
        lambda m: JetFormerImageConverter()(float_images(np.nan)),
        ValueError,
        "NaN or infinite",
    ),
    (
        "converter_infinite_pixels",
        lambda m: JetFormerImageConverter()(float_images(np.inf)),
        ValueError,
        "NaN or infinite",
    ),
    (
        "converter_unit_range_images",
        lambda m: JetFormerImageConverter()(float_images(-0.5)),
        ValueError,
        "pixel values in [0, 255]",
    ),
    (
        "converter_pixels_above_255",
        lambda m: JetFormerImageConverter()(float_images(300.0)),
        ValueError,
        "max=300",
    ),
    (
        "converter_rank_2",
        lambda m: JetFormerImageConverter()(np.zeros((32, 32), "uint8")),
        ValueError,
        "Received: images.shape=(32, 32)",
    ),
    (
        "converter_zero_one_floats",
        lambda m: JetFormerImageConverter()(float_images(0.5)),
        UserWarning,
        "float values in [0, 1]",
    ),
    # --- Preprocessors -----------------------------------------------------
    (
        "preprocessor_batch_size_mismatch",
        lambda m: m.preprocessor(
            {"images": uint8_images(2), "prompts": ["a", "b", "c"]}
        ),
        ValueError,
        "same batch size",
    ),
    (
        "preprocessor_empty_prompts",
        lambda m: m.preprocessor({"images": uint8_images(0), "prompts": []}),
        ValueError,
        "at least one prompt",
    ),
    (
        "preprocessor_integer_prompts",
        lambda m: m.preprocessor.generate_preprocess([1, 2]),
        TypeError,
        "must be a string, a list of strings",
    ),
    (
        "preprocessor_missing_prompts",
        lambda m: m.preprocessor({"images": uint8_images()}),
        ValueError,
        "expects a dict with",
    ),
    (
        "preprocessor_zero_sequence_length",
        lambda m: JetFormerTextToImagePreprocessor(
            m.preprocessor.tokenizer, sequence_length=0
        ),
        ValueError,
        "Received: sequence_length=0",
    ),
    (
        "preprocessor_prompt_too_long",
        lambda m: m.preprocessor.generate_preprocess(
            ["a handwritten seven and a handwritten two and a nine"]
        ),
        UserWarning,
        "were truncated",
    ),
    (
        "causal_lm_preprocessor_zero_sequence_length",
        lambda m: JetFormerCausalLMPreprocessor(
            m.preprocessor.tokenizer, sequence_length=0
        ),
        ValueError,
        "Received: sequence_length=0",
    ),
    # --- Task arguments ------------------------------------------------------
    (
        "task_zero_training_steps",
        lambda m: JetFormerTextToImage(m.backbone, training_steps=0),
        ValueError,
        "Received: training_steps=0",
    ),
    (
        "task_text_prefix_prob_above_one",
        lambda m: JetFormerTextToImage(m.backbone, text_prefix_prob=1.5),
        ValueError,
        "Received: text_prefix_prob=1.5",
    ),
    (
        "task_negative_noise_scale",
        lambda m: JetFormerTextToImage(m.backbone, noise_scale=-1.0),
        ValueError,
        "Received: noise_scale=-1.0",
    ),
    (
        "causal_lm_misspelled_argument",
        lambda m: JetFormerCausalLM(m.backbone, text_prefix_probability=0.5),
        TypeError,
        "text_prefix_probability=0.5",
    ),
    (
        "compile_with_loss",
        lambda m: m.bare_text_to_image.compile(loss="mse"),
        ValueError,
        "Received: loss='mse'",
    ),
    (
        "optimizer_negative_learning_rate",
        lambda m: jetformer_optimizer(learning_rate=-1.0),
        ValueError,
        "Received: learning_rate=-1.0",
    ),
    # --- Training inputs ---------------------------------------------------
    (
        "fit_uint8_array_without_converter",
        lambda m: fit_once(
            m.training_task(),
            {"images": uint8_images(), **tokenized(1)},
        ),
        TypeError,
        "Received: images.dtype=uint8",
    ),
    (
        "fit_uint8_dataset_without_converter",
        lambda m: fit_once(
            m.training_task(),
            tf_dataset({"images": uint8_images(), **tokenized(1)}),
        ),
        TypeError,
        "floats in [-1, 1]",
    ),
    (
        "fit_pixel_floats_without_converter",
        lambda m: fit_once(
            m.training_task(),
            {"images": float_images(255.0), **tokenized(1)},
        ),
        ValueError,
        "must be in [-1, 1]",
    ),
    (
        "fit_dataset_images_of_wrong_size",
        lambda m: fit_once(
            m.training_task(),
            tf_dataset(
                {"images": float_images(0.0, shape=(16, 16, 1)), **tokenized(1)}
            ),
        ),
        ValueError,
        "16, 16, 1",
    ),
    # --- Image generation --------------------------------------------------
    (
        "generate_empty_prompt_list",
        lambda m: m.text_to_image.generate([]),
        ValueError,
        "at least one prompt",
    ),
    (
        "generate_prompts_none",
        lambda m: m.text_to_image.generate(None),
        TypeError,
        "Received: prompts=None",
    ),
    (
        "generate_negative_guidance_scale",
        lambda m: m.text_to_image.generate(["a"], guidance_scale=-1.0),
        ValueError,
        "Received: guidance_scale=-1.0",
    ),
    (
        "generate_zero_temperature",
        lambda m: m.text_to_image.generate(["a"], temperature=0.0),
        ValueError,
        "Received: temperature=0.0",
    ),
    (
        "generate_negative_mixture_temperature",
        lambda m: m.text_to_image.generate(["a"], mixture_temperature=-1.0),
        ValueError,
        "Received: mixture_temperature=-1.0",
    ),
    (
        "generate_unknown_guidance_method",
        lambda m: m.text_to_image.generate(["a"], guidance_method="exact"),
        ValueError,
        "Received: guidance_method='exact'",
    ),
    (
        "generate_token_ids_outside_vocabulary",
        lambda m: m.bare_text_to_image.generate(tokenized(99)),
        ValueError,
        "max=99",
    ),
    (
        "generate_negative_token_ids",
        lambda m: m.bare_text_to_image.generate(tokenized(-1)),
        ValueError,
        "min=-1",
    ),
    (
        "generate_token_ids_without_padding_mask",
        lambda m: m.bare_text_to_image.generate(
            {"token_ids": tokenized(1)["token_ids"]}
        ),
        ValueError,
        "Received: padding_mask=None",
    ),
    (
        "generate_strings_without_preprocessor",
        lambda m: m.bare_text_to_image.generate(["a"]),
        ValueError,
        "needs tokenized prompts",
    ),
    # --- Likelihood and scoring -------------------------------------------
    (
        "bits_per_dim_wrong_size",
        lambda m: m.text_to_image.image_bits_per_dim(
            uint8_images(shape=(16, 16, 1)), ["a", "b"]
        ),
        ValueError,
        "the model's image shape",
    ),
    (
        "bits_per_dim_wrong_channels",
        lambda m: m.text_to_image.image_bits_per_dim(
            uint8_images(shape=(32, 32, 3)), ["a", "b"]
        ),
        ValueError,
        "Received: images.shape=(2, 32, 32, 3)",
    ),
    (
        "bits_per_dim_nan_pixels",
        lambda m: m.text_to_image.image_bits_per_dim(
            float_images(np.nan), ["a", "b"]
        ),
        ValueError,
        "NaN or infinite",
    ),
    (
        "bits_per_dim_more_prompts_than_images",
        lambda m: m.text_to_image.image_bits_per_dim(
            uint8_images(), ["a", "b", "c"]
        ),
        ValueError,
        "one prompt per image",
    ),
    (
        "bits_per_dim_zero_samples",
        lambda m: m.text_to_image.image_bits_per_dim(
            uint8_images(), ["a", "b"], num_samples=0
        ),
        ValueError,
        "Received: num_samples=0",
    ),
    (
        "bits_per_dim_uint8_without_converter",
        lambda m: m.bare_text_to_image.image_bits_per_dim(
            uint8_images(), tokenized(1)
        ),
        TypeError,
        "Received: images.dtype=uint8",
    ),
    (
        "bits_per_dim_pixels_without_converter",
        lambda m: m.bare_text_to_image.image_bits_per_dim(
            float_images(255.0), tokenized(1)
        ),
        ValueError,
        "must be in [-1, 1]",
    ),
    (
        "score_wrong_size",
        lambda m: m.causal_lm.score(uint8_images(shape=(8, 8, 1)), ["a"]),
        ValueError,
        "the model's image shape",
    ),
    (
        "score_texts_string",
        lambda m: m.causal_lm.score(uint8_images(), "a handwritten seven"),
        TypeError,
        "must be a list of strings",
    ),
    (
        "score_empty_texts",
        lambda m: m.causal_lm.score(uint8_images(), []),
        ValueError,
        "at least one string",
    ),
    (
        "classify_template_without_placeholder",
        lambda m: m.causal_lm.classify(uint8_images(), ["a"], template="x"),
        ValueError,
        "Received: template='x'",
    ),
    (
        "encode_images_zero_batch_size",
        lambda m: m.causal_lm.encode_images(uint8_images(), batch_size=0),
        ValueError,
        "Received: batch_size=0",
    ),
    # --- Presets -------------------------------------------------------------
    (
        "backbone_preset_unknown_name",
        lambda m: JetFormerBackbone.from_preset("jetformer_tiny"),
        ValueError,
        "jetformer_350m_imagenet_256",
    ),
    (
        "task_preset_unknown_name",
        lambda m: JetFormerTextToImage.from_preset("jetformer_tiny"),
        ValueError,
        "Built-in JetFormer presets",
    ),
    (
        "architecture_preset_with_weights",
        lambda m: JetFormerBackbone.from_preset("jetformer_350m_imagenet_256"),
        ValueError,
        "load_weights=False",
    ),
    (
        "preset_directory_without_config",
        lambda m: JetFormerBackbone.from_preset(m.empty_directory()),
        ValueError,
        "has no config.json",
    ),
    (
        "preset_directory_without_weights",
        lambda m: JetFormerBackbone.from_preset(m.preset_without_weights()),
        ValueError,
        "has no weights file",
    ),
    (
        "task_preset_directory_without_weights",
        lambda m: JetFormerTextToImage.from_preset(m.preset_without_weights()),
        ValueError,
        "has no weights file",
    ),
    (
        "preset_corrupted_weights",
        lambda m: JetFormerBackbone.from_preset(
            m.preset_with_corrupted_weights()
        ),
        ValueError,
        "could not be read",
    ),
    (
        "task_preset_corrupted_weights",
        lambda m: JetFormerTextToImage.from_preset(
            m.preset_with_corrupted_weights()
        ),
        ValueError,
        "could not be read",
    ),
    (
        "preset_of_another_model_class",
        lambda m: JetFormerBackbone.from_preset(m.preset_of_another_class()),
        ValueError,
        "is a GemmaBackbone",
    ),
    (
        "backbone_save_into_foreign_directory",
        lambda m: m.backbone.save_to_preset(m.foreign_directory()),
        ValueError,
        "overwrite=True",
    ),
    (
        "task_save_into_foreign_directory",
        lambda m: m.text_to_image.save_to_preset(m.foreign_directory()),
        ValueError,
        "notes.txt",
    ),
    # --- Data loaders --------------------------------------------------------
    (
        "load_digits_unknown_split",
        lambda m: data.load_digits(split="validation"),
        ValueError,
        "Received: split='validation'",
    ),
    (
        "digits_dataset_zero_batch_size",
        lambda m: data.digits_dataset(batch_size=0),
        ValueError,
        "batch_size",
    ),
    (
        "digits_caption_label_out_of_range",
        lambda m: data.caption_for_label(10),
        ValueError,
        "10",
    ),
    (
        "tfds_dataset_zero_image_size",
        lambda m: data.tfds_dataset("mnist", image_size=0),
        ValueError,
        "Received: image_size=0",
    ),
    # --- Example scripts' command lines ------------------------------------
    (
        "train_mnist_zero_steps",
        lambda m: parse_example_args("train_mnist", ["--steps", "0"]),
        SystemExit,
        "--steps must be at least 1",
    ),
    (
        "train_mnist_negative_guidance",
        lambda m: parse_example_args(
            "train_mnist", ["--guidance-scale", "-1"]
        ),
        SystemExit,
        "--guidance-scale must be non-negative",
    ),
    (
        "generate_images_zero_images",
        lambda m: parse_example_args(
            "generate_images",
            ["--preset", "p", "--prompt", "a", "--out", "o.png",
             "--num-images", "0"],
        ),
        SystemExit,
        "--num-images must be at least 1",
    ),
]


def check_case(models, call, expected, fragment, capsys):
    if issubclass(expected, Warning):
        with pytest.warns(expected, match=_escaped(fragment)):
            call(models)
    elif expected is SystemExit:
        with pytest.raises(SystemExit):
            call(models)
        assert fragment in capsys.readouterr().err
    else:
        with pytest.raises(expected, match=_escaped(fragment)):
            call(models)


def _escaped(fragment):
    import re

    return re.escape(fragment)


@pytest.mark.parametrize(
    "call, expected, fragment",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input(models, call, expected, fragment, capsys):
    check_case(models, call, expected, fragment, capsys)


def test_case_ids_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


def test_save_into_foreign_directory_with_overwrite(models, tmp_path):
    directory = tmp_path / "foreign"
    directory.mkdir()
    (directory / "notes.txt").write_text("kept")
    models.backbone.save_to_preset(str(directory), overwrite=True)
    assert (directory / "config.json").exists()
    assert (directory / "notes.txt").read_text() == "kept"


def test_save_over_earlier_preset(models, tmp_path):
    directory = tmp_path / "preset"
    models.backbone.save_to_preset(str(directory))
    models.backbone.save_to_preset(str(directory))
    restored = JetFormerBackbone.from_preset(str(directory))
    assert restored.count_params() == models.backbone.count_params()


def test_uint8_and_float_pixels_agree():
    converter = JetFormerImageConverter()
    pixels = np.arange(256, dtype="uint8").reshape(1, 16, 16, 1)
    from_uint8 = keras.ops.convert_to_numpy(converter(pixels))
    from_float = keras.ops.convert_to_numpy(converter(pixels.astype("float32")))
    np.testing.assert_allclose(from_uint8, from_float)
    np.testing.assert_allclose(from_uint8.min(), -1.0)
    np.testing.assert_allclose(from_uint8.max(), 1.0)


def test_all_black_float_images_give_no_warning(recwarn):
    JetFormerImageConverter()(np.zeros((1, 4, 4, 1), "float32"))
    assert not [w for w in recwarn if "[0, 1]" in str(w.message)]

