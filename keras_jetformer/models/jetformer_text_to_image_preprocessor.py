"""Preprocessing of images and captions for JetFormer tasks."""

import warnings

import keras
import numpy as np
import tensorflow as tf
from keras_hub.layers import StartEndPacker
from keras_hub.models import TextToImagePreprocessor
from keras_hub.src.utils.tensor_utils import preprocessing_function

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone
from keras_jetformer.models.jetformer_image_converter import (
    JetFormerImageConverter,
)
from keras_jetformer.models.jetformer_tokenizer import JetFormerTokenizer


def _check_prompts(prompts):
    """Raise for prompts that are not strings, or an empty list of them."""
    # keras-hub converts an empty list to an empty float tensor.
    shape = getattr(prompts, "shape", None)
    if (isinstance(prompts, list) and len(prompts) == 0) or (
        shape is not None and tuple(shape) == (0,)
    ):
        raise ValueError(
            "`prompts` must contain at least one prompt. Received: prompts=[]"
        )
    expected = (
        "`prompts` must be a string, a list of strings or a string tensor."
    )
    if not isinstance(prompts, (str, list, tf.Tensor)):
        raise TypeError(f"{expected} Received: prompts={prompts!r}")
    if isinstance(prompts, tf.Tensor) and prompts.dtype != tf.string:
        raise TypeError(
            f"{expected} Received: prompts.dtype={prompts.dtype.name}"
        )


def _check_batch_sizes(images, prompts):
    """Raise if the static batch sizes of images and prompts differ."""
    images_shape = tuple(images.shape)
    prompts_shape = tuple(prompts.shape)
    if len(images_shape) != 4 or len(prompts_shape) != 1:
        return  # Unbatched, or a rank error that the model reports.
    if None not in (images_shape[0], prompts_shape[0]) and (
        images_shape[0] != prompts_shape[0]
    ):
        raise ValueError(
            "`images` and `prompts` must have the same batch size. "
            f"Received: images.shape={images_shape}, "
            f"prompts.shape={prompts_shape}"
        )


def _warn_if_truncated(tokens, sequence_length):
    """Warn when eager prompts have more tokens than fit before the end token.

    Inside `tf.data` pipelines the prompts are truncated without a warning,
    because a graph cannot warn per example.
    """
    if not tf.executing_eagerly():
        return
    if isinstance(tokens, tf.RaggedTensor):
        lengths = tokens.row_lengths().numpy()
    elif isinstance(tokens, list):
        # The tokenizer returns nested lists for eager inputs.
        rows = tokens if tokens and isinstance(tokens[0], list) else [tokens]
        lengths = np.array([len(row) for row in rows])
    else:
        lengths = np.array([tokens.shape[-1] or 0])
    limit = sequence_length - 1
    if lengths.size and lengths.max() > limit:
        warnings.warn(
            f"{int(np.sum(lengths > limit))} prompt(s) have more than "
            f"`sequence_length - 1` = {limit} tokens (the longest has "
            f"{int(lengths.max())}) and were truncated to fit the end token. "
            "Raise `sequence_length` of the preprocessor to keep whole "
            "prompts.",
            stacklevel=4,
        )


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerTextToImagePreprocessor(TextToImagePreprocessor):
    """Turn `{"images", "prompts"}` into JetFormer model inputs.

    Prompts are tokenized, an end token is appended, and the ids are padded
    or truncated to `sequence_length`. Truncation of eager inputs (not
    inside `tf.data`) gives a warning. Images go through the image
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
        sequence_length = sequence_length or self.sequence_length
        tokens = self.tokenizer(prompts)
        _warn_if_truncated(tokens, sequence_length)
        token_ids, padding_mask = self.packer(
            tokens, sequence_length=sequence_length
        )
        if self.attend_to_padding:
            # Preprocessing runs on TensorFlow tensors whatever the backend;
            # `keras.ops` on the torch backend cannot take them.
            padding_mask = tf.ones_like(padding_mask, dtype=tf.bool)
        return token_ids, padding_mask

    @preprocessing_function
    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if not isinstance(x, dict) or "prompts" not in x:
            raise ValueError(
                "JetFormerTextToImagePreprocessor expects a dict with "
                "`\"prompts\"` and `\"images\"`. "
                f"Received: x={type(x).__name__}"
            )
        _check_prompts(x["prompts"])
        if x.get("images") is not None:
            _check_batch_sizes(x["images"], x["prompts"])
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
        _check_prompts(x)
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
