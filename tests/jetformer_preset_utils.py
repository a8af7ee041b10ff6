"""A tiny randomly initialised preset, written with `save_to_preset`.

The preset, example-script and documentation tests load it where users
would load a built-in preset. It takes 32x32x1 images, the size of
`keras_jetformer.data.digits_dataset`, so the real digits fit it, and its
tokenizer knows the digit captions ("a handwritten seven").
"""

import keras

from keras_jetformer.data import DIGIT_NAMES
from keras_jetformer.data import class_prompt

# 64 image tokens of 4x4 patches, as in `examples/train_mnist.py`, with
# every width and depth cut down so that it compiles in seconds.
TINY_PRESET_BACKBONE_CONFIG = {
    "image_shape": (32, 32, 1),
    "patch_size": 4,
    "image_token_dim": 8,
    "num_layers": 2,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "num_mixtures": 4,
    "flow_num_couplings": 2,
    "flow_hidden_dim": 16,
    "flow_num_layers": 1,
    "flow_num_heads": 2,
    "seed": 1,
}
TINY_PRESET_SEQUENCE_LENGTH = 8
DIGIT_CAPTIONS = tuple(class_prompt(label) for label in range(10))


def tiny_tokenizer():
    """A word-level tokenizer of the canonical digit captions."""
    from keras_jetformer.models import JetFormerTokenizer
    from keras_jetformer.models import compute_jetformer_tokenizer_proto

    sentences = [*DIGIT_CAPTIONS, *DIGIT_NAMES]
    return JetFormerTokenizer(proto=compute_jetformer_tokenizer_proto(sentences))


def tiny_text_to_image(seed=0):
    """A randomly initialised `JetFormerTextToImage` with a preprocessor."""
    from keras_jetformer.models import JetFormerBackbone
    from keras_jetformer.models import JetFormerImageConverter
    from keras_jetformer.models import JetFormerTextToImage
    from keras_jetformer.models import JetFormerTextToImagePreprocessor

    keras.utils.set_random_seed(seed)
    tokenizer = tiny_tokenizer()
    backbone = JetFormerBackbone(
        vocabulary_size=tokenizer.model_vocabulary_size(),
        **TINY_PRESET_BACKBONE_CONFIG,
    )
    preprocessor = JetFormerTextToImagePreprocessor(
        tokenizer,
        JetFormerImageConverter(),
        sequence_length=TINY_PRESET_SEQUENCE_LENGTH,
    )
    return JetFormerTextToImage(backbone, preprocessor, text_prefix_prob=0.5)


def save_tiny_preset(directory, seed=0):
    """Write a tiny random text-to-image preset to `directory`; return it."""
    tiny_text_to_image(seed).save_to_preset(str(directory))
    return str(directory)
