"""Backbone, tasks and preprocessing of JetFormer, in keras-hub style."""

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone
from keras_jetformer.models.jetformer_causal_lm import JetFormerCausalLM
from keras_jetformer.models.jetformer_causal_lm_preprocessor import (
    JetFormerCausalLMPreprocessor,
)
from keras_jetformer.models.jetformer_image_converter import (
    JetFormerImageConverter,
)
from keras_jetformer.models.jetformer_text_to_image import JetFormerTextToImage
from keras_jetformer.models.jetformer_text_to_image_preprocessor import (
    JetFormerTextToImagePreprocessor,
)
from keras_jetformer.models.jetformer_tokenizer import JetFormerTokenizer
from keras_jetformer.models.jetformer_tokenizer import (
    compute_jetformer_tokenizer_proto,
)

# Registers the built-in presets with keras-hub.
from keras_jetformer.models import jetformer_presets
