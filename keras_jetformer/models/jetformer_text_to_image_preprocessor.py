"""Preprocessing of images and captions for JetFormer tasks."""

import keras
from keras_hub.layers import StartEndPacker
from keras_hub.models import TextToImagePreprocessor
from keras_hub.src.utils.tensor_utils import preprocessing_function

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone
from keras_jetformer.models.jetformer_image_converter import (
    JetFormerImageConverter,
)
from keras_jetformer.models.jetformer_tokenizer import JetFormerTokenizer


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerTextToImagePreprocessor(TextToImagePreprocessor):
    """Turn `{"images", "prompts"}` into JetFormer model inputs.

    Prompts are tokenized, an end token is appended, and the ids are padded
    or truncated to `sequence_length`. Images go through the image
    converter (scaling [0, 255] to [-1, 1]). The output is a dict with
    `"images"`, `"token_ids"` and `"padding_mask"`; every valid text position
    (including the end token) is also scored in the text NLL.

    Works inside `tf.data` pipelines (batched or not) and on eager inputs.

    Args:
        tokenizer: a `JetFormerTokenizer`.
        image_converter: a `JetFormerImageConverter` or `None` (images pass
            through unchanged and must already be in [-1, 1]).
        sequence_length: int. Length of the padded text. Defaults to `16`.
        attend_to_padding: bool. If `True`, pad with end tokens that are
            attended to and scored, as the reference image-text recipe does
            with `ignore_pad=False`; if `False`, padding is masked out and
            not scored. Defaults to `False`.

    Example:

    ```python
    preprocessor = keras_jetformer.models.JetFormerTextToImagePreprocessor(
        tokenizer, JetFormerImageConverter(), sequence_length=8
    )
    preprocessor({"images": np.zeros((2, 16, 16, 1)), "prompts": ["a", "b"]})
    ```
    """

    backbone_cls = JetFormerBackbone
    tokenizer_cls = JetFormerTokenizer
    image_converter_cls = JetFormerImageConverter

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        sequence_length=16,
        attend_to_padding=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(sequence_length, int) or sequence_length < 1:
            raise ValueError(
                "`sequence_length` must be a positive integer. "
                f"Received: sequence_length={sequence_length!r}"
            )
        self.tokenizer = tokenizer
        self.image_converter = image_converter
        self.sequence_length = sequence_length
        self.attend_to_padding = attend_to_padding
        self.packer = None

    def build(self, input_shape):
        end_id = self.tokenizer.end_token_id
        pad_id = end_id if self.attend_to_padding else self.tokenizer.pad_token_id
        self.packer = StartEndPacker(
            sequence_length=self.sequence_length,
            end_value=end_id,
            pad_value=pad_id,
            return_padding_mask=True,
        )
        self.built = True

    def _pack_prompts(self, prompts, sequence_length=None):
        token_ids, padding_mask = self.packer(
            self.tokenizer(prompts),
            sequence_length=sequence_length or self.sequence_length,
        )
        if self.attend_to_padding:
            padding_mask = keras.ops.ones_like(padding_mask, dtype="bool")
        return token_ids, padding_mask

    @preprocessing_function
    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if not isinstance(x, dict) or "prompts" not in x:
            raise ValueError(
                "JetFormerTextToImagePreprocessor expects a dict with "
                "`\"prompts\"` and `\"images\"`. "
                f"Received: x={type(x).__name__}"
            )
        token_ids, padding_mask = self._pack_prompts(
            x["prompts"], sequence_length
        )
        outputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        if x.get("images") is not None:
            images = x["images"]
            if self.image_converter is not None:
                images = self.image_converter(images)
            outputs["images"] = images
        return keras.utils.pack_x_y_sample_weight(outputs, y, sample_weight)

    @preprocessing_function
    def generate_preprocess(self, x, sequence_length=None):
        """Tokenize prompts for `generate()`: `{"token_ids", "padding_mask"}`."""
        if not self.built:
            self.build(None)
        if isinstance(x, dict):
            x = x["prompts"]
        token_ids, padding_mask = self._pack_prompts(x, sequence_length)
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "attend_to_padding": self.attend_to_padding,
            }
        )
        return config
