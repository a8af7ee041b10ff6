"""Preprocessing of images, prompts and responses for `JetFormerCausalLM`."""

import keras
import numpy as np
from keras_hub.layers import MultiSegmentPacker
from keras_hub.models import CausalLMPreprocessor
from keras_hub.src.utils.tensor_utils import convert_preprocessing_outputs_python
from keras_hub.src.utils.tensor_utils import convert_to_numpy
from keras_hub.src.utils.tensor_utils import preprocessing_function
from keras_hub.src.utils.tensor_utils import strip_to_ragged
from keras_hub.src.utils.tensor_utils import strip_to_ragged_python

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone
from keras_jetformer.models.jetformer_image_converter import (
    JetFormerImageConverter,
)
from keras_jetformer.models.jetformer_tokenizer import JetFormerTokenizer

try:
    import tensorflow as tf
except ImportError:
    tf = None

# Value the packer writes into padding slots, so that the padding mask can be
# read back from the packed ids before the slots get the real pad id.
_PADDING_SENTINEL = -1


def _is_tf_tensor(x):
    return tf is not None and tf.is_tensor(x)


def _to_array(x):
    """Convert anything but a TensorFlow tensor to numpy."""
    if _is_tf_tensor(x):
        return x
    return convert_to_numpy(x)


def _where(condition, x, y):
    if _is_tf_tensor(condition):
        return tf.where(condition, x, y)
    return np.where(condition, x, y)


def _ones_like_bool(x):
    if _is_tf_tensor(x):
        return tf.ones_like(x, dtype="bool")
    return np.ones_like(x, dtype="bool")


def _before_first(token_ids, token_id):
    """True at positions before the first `token_id` of each sequence."""
    matches = token_ids == token_id
    if _is_tf_tensor(token_ids):
        return tf.math.cumsum(tf.cast(matches, "int32"), axis=-1) == 0
    return np.cumsum(matches, axis=-1) == 0


def _empty_prompts_like(responses):
    """Empty strings shaped like `responses`."""
    if isinstance(responses, (str, bytes)):
        return ""
    if _is_tf_tensor(responses):
        return tf.fill(tf.shape(responses), "")
    return [""] * len(responses)


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerCausalLMPreprocessor(CausalLMPreprocessor):
    """Turn images, prompts and responses into `JetFormerCausalLM` inputs.

    For training, the input is a dict with `"images"` (values in [0, 255]),
    `"responses"` and optionally `"prompts"`. The text of each example is
    `prompt + response + end token`, truncated (the response first) and
    padded to `sequence_length`. The output is an `(x, y, sample_weight)`
    tuple. `x` is a dict with `"images"` (in [-1, 1] after the image
    converter), `"token_ids"`, `"padding_mask"` and `"loss_mask"`. The loss
    mask is True on the response and end tokens only, so that the prompt
    conditions the model but is not scored. Unless given, `y` is
    `"token_ids"` and `sample_weight` is `"loss_mask"`. The JetFormer
    objective reads
    `x["loss_mask"]` and ignores `y` and `sample_weight`. There is no start
    token: the model inserts BOS before the text itself, so the logits at
    position `t` predict `token_ids[t]`.

    `generate_preprocess` packs `{"images", "prompts"}` for `generate()`
    (the prompt tokens only, without an end token), and
    `generate_postprocess` turns generated ids back into strings, cut at
    the first end token.

    Works inside `tf.data` pipelines (batched or not) and on eager inputs.

    Args:
        tokenizer: a `JetFormerTokenizer`.
        image_converter: a `JetFormerImageConverter` or `None` (images pass
            through unchanged and must already be in [-1, 1]).
        sequence_length: int. Length of the padded text. Defaults to `16`.
        attend_to_padding: bool. If `True`, pad with end tokens that are
            attended to and scored (the reference image-text recipe with
            `ignore_pad=False`); if `False`, padding is masked out and not
            scored. Generation inputs are never padded with end tokens.
            Defaults to `False`.

    Example:

    ```python
    preprocessor = keras_jetformer.models.JetFormerCausalLMPreprocessor(
        tokenizer, JetFormerImageConverter(), sequence_length=8
    )
    x, y, sample_weight = preprocessor(
        {
            "images": np.zeros((2, 16, 16, 1), "uint8"),
            "prompts": ["caption", ""],
            "responses": ["a seven", "a two"],
        }
    )
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
        if (
            isinstance(sequence_length, bool)
            or not isinstance(sequence_length, int)
            or sequence_length < 1
        ):
            raise ValueError(
                "`sequence_length` must be a positive integer. "
                f"Received: sequence_length={sequence_length!r}"
            )
        if not isinstance(attend_to_padding, bool):
            raise TypeError(
                "`attend_to_padding` must be a bool. "
                f"Received: attend_to_padding={attend_to_padding!r}"
            )
        # JetFormer inserts BOS itself and always ends the text with the end
        # token, so neither is configurable here.
        kwargs.pop("add_start_token", None)
        kwargs.pop("add_end_token", None)
        super().__init__(
            tokenizer=tokenizer,
            sequence_length=sequence_length,
            add_start_token=False,
            add_end_token=True,
            **kwargs,
        )
        self.image_converter = image_converter
        self.attend_to_padding = attend_to_padding

    def build(self, input_shape):
        # Built lazily so that the tokenizer's assets are loaded when a saved
        # model is restored.
        self.packer = MultiSegmentPacker(
            sequence_length=self.sequence_length,
            start_value=[],
            end_value=self.tokenizer.end_token_id,
            sep_value=[],
            pad_value=_PADDING_SENTINEL,
            # Keep the prompt whole and truncate the response first.
            truncate="waterfall",
        )
        self.built = True

    def _pack(self, segments, sequence_length, add_end_value):
        """Pack token segments into `(token_ids, padding_mask, segment_ids)`.

        `padding_mask` is True on the packed tokens, whatever the value of
        `attend_to_padding`.
        """
        token_ids, segment_ids = self.packer(
            segments,
            sequence_length=sequence_length or self.sequence_length,
            add_start_value=False,
            add_end_value=add_end_value,
        )
        token_ids = _to_array(token_ids)
        segment_ids = _to_array(segment_ids)
        padding_mask = token_ids != _PADDING_SENTINEL
        return token_ids, padding_mask, segment_ids

    def _convert_images(self, images):
        if self.image_converter is None:
            return images
        return self.image_converter(images)

    def _call_python(self, x, y=None, sample_weight=None, sequence_length=None):
        if not isinstance(x, dict) or "responses" not in x or "images" not in x:
            keys = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                "JetFormerCausalLMPreprocessor expects a dict with "
                '`"images"`, `"responses"` and optionally `"prompts"`. '
                f"Received: x={keys}"
            )
        if not self.built:
            self.build(None)

        responses = x["responses"]
        prompts = x.get("prompts")
        if prompts is None:
            prompts = _empty_prompts_like(responses)
        token_ids, padding_mask, segment_ids = self._pack(
            (self.tokenizer(prompts), self.tokenizer(responses)),
            sequence_length,
            add_end_value=True,
        )
        # The end token belongs to the response segment.
        loss_mask = (segment_ids == 1) & padding_mask
        if self.attend_to_padding:
            pad_id = self.tokenizer.end_token_id
            loss_mask = loss_mask | ~padding_mask
            padding_mask = _ones_like_bool(padding_mask)
        else:
            pad_id = self.tokenizer.pad_token_id
        token_ids = _where(token_ids == _PADDING_SENTINEL, pad_id, token_ids)

        outputs = {
            "images": self._convert_images(x["images"]),
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "loss_mask": loss_mask,
        }
        outputs = convert_preprocessing_outputs_python(outputs)
        # As in keras-hub, the targets are the token ids and the weights the
        # loss mask. Logits at position `t` predict token `t` because the
        # model inserts BOS, so the targets are not shifted.
        if y is None:
            y = outputs["token_ids"]
        if sample_weight is None:
            sample_weight = outputs["loss_mask"]
        return keras.utils.pack_x_y_sample_weight(outputs, y, sample_weight)

    def _generate_preprocess_python(self, x, sequence_length=None):
        if not isinstance(x, dict) or "prompts" not in x or "images" not in x:
            keys = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                "`generate()` with a preprocessor expects a dict with "
                f'`"images"` and `"prompts"`. Received: inputs={keys}'
            )
        if not self.built:
            self.build(None)
        token_ids, padding_mask, _ = self._pack(
            (self.tokenizer(x["prompts"]),),
            sequence_length,
            add_end_value=False,
        )
        token_ids = _where(
            padding_mask, token_ids, self.tokenizer.pad_token_id
        )
        outputs = {
            "images": self._convert_images(x["images"]),
            "token_ids": token_ids,
            "padding_mask": padding_mask,
        }
        return convert_preprocessing_outputs_python(outputs)

    def _generate_postprocess_python(self, x):
        if not self.built:
            self.build(None)
        token_ids = convert_to_numpy(x["token_ids"]).astype("int32")
        padding_mask = convert_to_numpy(x["padding_mask"]).astype("bool")
        keep = padding_mask & _before_first(
            token_ids, self.tokenizer.end_token_id
        )
        token_ids = strip_to_ragged_python(
            token_ids, keep, self.tokenizer.special_token_ids
        )
        return self.tokenizer.detokenize(token_ids)

    @preprocessing_function
    def _generate_postprocess_tf(self, x):
        if not self.built:
            self.build(None)
        token_ids = tf.cast(x["token_ids"], "int32")
        padding_mask = tf.cast(x["padding_mask"], "bool")
        keep = padding_mask & _before_first(
            token_ids, self.tokenizer.end_token_id
        )
        token_ids = strip_to_ragged(
            token_ids, keep, self.tokenizer.special_token_ids
        )
        return self.tokenizer.detokenize(token_ids)

    def get_config(self):
        config = super().get_config()
        config.pop("add_start_token", None)
        config.pop("add_end_token", None)
        config["attend_to_padding"] = self.attend_to_padding
        return config
