"""Checks of user inputs shared by the JetFormer backbone, tasks and
preprocessors.

Static checks (`check_image_tensor`, `check_token_tensor`) read only
shapes and dtypes, so they also run on symbolic tensors inside compiled
training steps. Value checks (`check_pixel_values`, `check_model_images`,
`check_token_ids`) read the values, so they run only on concrete arrays at
the eager entry points. Inside `tf.data` pipelines and compiled steps they
are skipped.
"""

import warnings

import keras
import numpy as np

try:
    import tensorflow as tf
except ImportError:
    tf = None

# Slack of the [-1, 1] range check for values that were scaled in float32.
UNIT_RANGE_TOLERANCE = 1e-4


def _is_integer_dtype(dtype):
    dtype = keras.backend.standardize_dtype(dtype)
    return dtype == "bool" or "int" in dtype


def concrete_array(x):
    """Return `x` as a numpy array, or `None` if it has no values yet.

    Symbolic inputs (Keras tensors, `tf.function` and `tf.data` graph
    tensors, JAX tracers) have no values and give `None`.
    """
    if isinstance(x, keras.KerasTensor):
        return None
    if tf is not None and isinstance(x, (tf.Tensor, tf.RaggedTensor)):
        if isinstance(x, tf.RaggedTensor) or not tf.executing_eagerly():
            return None
        try:
            return x.numpy()
        except (AttributeError, NotImplementedError):  # A graph tensor.
            return None
    if isinstance(x, (np.ndarray, list, tuple, int, float)):
        return np.asarray(x)
    try:
        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # A tracer or another symbolic tensor.
        return None


def check_image_tensor(images, image_shape, name="images"):
    """Check the rank, size and dtype of model images `[B, H, W, C]`.

    Reads only static shapes and the dtype, so it works on symbolic
    tensors. Dimensions that are unknown (`None`) are not checked.

    Raises:
        ValueError: wrong rank, or a height, width or channel count that
            differs from `image_shape`.
        TypeError: integer or bool images, which are raw pixels that have
            not been scaled to [-1, 1].
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            f"`{name}` must be a batch of images `[batch, height, width, "
            f"channels]` of shape (batch, *{tuple(image_shape)}). "
            f"Received: {name}.shape={shape}"
        )
    for axis, (actual, expected) in enumerate(
        zip(shape[1:], image_shape), start=1
    ):
        if actual is not None and actual != expected:
            raise ValueError(
                f"`{name}` must have the model's image shape "
                f"(height, width, channels) = {tuple(image_shape)}. Resize "
                "the images, or build a model for this size. "
                f"Received: {name}.shape={shape}"
            )
    dtype = getattr(images, "dtype", None)
    if dtype is not None and _is_integer_dtype(dtype):
        raise TypeError(
            f"The model takes `{name}` as floats in [-1, 1]. Convert raw "
            "pixels with `JetFormerImageConverter` (`x / 127.5 - 1`), or "
            "attach a preprocessor with an image converter to the task. "
            f"Received: {name}.dtype={keras.backend.standardize_dtype(dtype)}"
        )


def check_token_tensor(tokens, token_shape, name="image_tokens"):
    """Check that flow tokens have shape `[B, N, D]` with `(N, D)` given."""
    shape = tuple(tokens.shape)
    if len(shape) != 3 or any(
        actual is not None and actual != expected
        for actual, expected in zip(shape[1:], token_shape)
    ):
        raise ValueError(
            f"`{name}` must have shape (batch, *{tuple(token_shape)}): "
            "(batch, image tokens, values per token). "
            f"Received: {name}.shape={shape}"
        )


def _describe(array):
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return f"shape={array.shape}, dtype={array.dtype}, no finite values"
    return (
        f"shape={array.shape}, dtype={array.dtype}, "
        f"min={finite.min():g}, max={finite.max():g}"
    )


def _check_finite(array, name):
    if np.issubdtype(array.dtype, np.floating) and not np.all(
        np.isfinite(array)
    ):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(
            f"`{name}` contains {count} NaN or infinite values; every pixel "
            f"must be finite. Received: {name} with {_describe(array)}"
        )


def check_pixel_values(images, name="images"):
    """Check raw images before scaling: finite values in [0, 255].

    uint8 images and float images in [0, 255] are both accepted. Float
    images whose values all lie in [0, 1] and are not whole numbers were
    probably scaled to [0, 1] already; they give a warning, because they
    would come out nearly black. Symbolic inputs are not checked.

    Raises:
        ValueError: wrong rank, NaN or infinite values, or values outside
            [0, 255] (for example images already scaled to [-1, 1]).
    """
    array = concrete_array(images)
    if array is None:
        return
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"`{name}` must be numeric pixel values in [0, 255]. "
            f"Received: {name}.dtype={array.dtype}"
        )
    if array.ndim not in (3, 4):
        raise ValueError(
            f"`{name}` must be one image `[height, width, channels]` or a "
            f"batch `[batch, height, width, channels]`. "
            f"Received: {name}.shape={array.shape}"
        )
    _check_finite(array, name)
    if array.size == 0:
        return
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise ValueError(
            f"`{name}` must be pixel values in [0, 255] (uint8, or floats "
            "on that scale). Images already in [-1, 1] must skip the image "
            "converter: pass preprocessed inputs to a task built with "
            f"`preprocessor=None`. Received: {name} with {_describe(array)}"
        )
    if (
        np.issubdtype(array.dtype, np.floating)
        and high <= 1.0
        and np.any(array != np.round(array))
    ):
        warnings.warn(
            f"`{name}` has float values in [0, 1], but the image converter "
            "expects pixel values in [0, 255], so these images will be "
            "nearly black. Multiply them by 255 if they were scaled to "
            f"[0, 1]. Received: {name} with {_describe(array)}",
            stacklevel=3,
        )


def check_model_images(images, image_shape, name="images"):
    """Check concrete model images: shape `[B, *image_shape]`, finite
    floats in [-1, 1]. Returns them as a float32 numpy array."""
    array = concrete_array(images)
    check_image_tensor(array, image_shape, name=name)
    _check_finite(array, name)
    array = array.astype("float32")
    if array.size and (
        array.min() < -1.0 - UNIT_RANGE_TOLERANCE
        or array.max() > 1.0 + UNIT_RANGE_TOLERANCE
    ):
        raise ValueError(
            f"`{name}` must be in [-1, 1] here (the image converter maps "
            "pixel values in [0, 255] there). Attach a preprocessor with "
            "an image converter to pass raw pixels. "
            f"Received: {name} with {_describe(array)}"
        )
    return array


def check_token_ids(token_ids, padding_mask, vocabulary_size, batch_size=None):
    """Check concrete `token_ids` and `padding_mask` `[B, T]`.

    Raises `ValueError` for wrong ranks, shapes that differ, ids outside
    `[0, vocabulary_size)` and a batch size other than `batch_size` (when
    given).
    """
    if padding_mask is None:
        raise ValueError(
            "Tokenized prompts need a `padding_mask` beside `token_ids`. "
            "Received: padding_mask=None"
        )
    token_ids = concrete_array(token_ids)
    padding_mask = concrete_array(padding_mask)
    if token_ids is None or padding_mask is None:
        return
    if token_ids.ndim != 2 or token_ids.shape != padding_mask.shape:
        raise ValueError(
            "`token_ids` and `padding_mask` must both have shape "
            "[batch, sequence_length]. Received: "
            f"token_ids.shape={token_ids.shape}, "
            f"padding_mask.shape={padding_mask.shape}"
        )
    if token_ids.size and (
        token_ids.min() < 0 or token_ids.max() >= vocabulary_size
    ):
        raise ValueError(
            f"`token_ids` must be in [0, vocabulary_size={vocabulary_size}). "
            f"Received: token_ids with min={token_ids.min()}, "
            f"max={token_ids.max()}"
        )
    if batch_size is not None and token_ids.shape[0] != batch_size:
        raise ValueError(
            f"Images and prompts must have the same batch size ({batch_size} "
            "images). Received: "
            f"token_ids.shape={token_ids.shape}"
        )
