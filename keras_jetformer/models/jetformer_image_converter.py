"""Image preprocessing for JetFormer."""

import keras
from keras_hub.layers import ImageConverter

from keras_jetformer.models.input_checks import check_pixel_values
from keras_jetformer.models.jetformer_backbone import JetFormerBackbone

DEFAULT_SCALE = 1.0 / 127.5
DEFAULT_OFFSET = -1.0


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerImageConverter(ImageConverter):
    """Resize images and scale pixel values from [0, 255] to [-1, 1].

    JetFormer models the density of 8-bit images on the [-1, 1] scale, so
    inputs are expected as values in [0, 255] (uint8 or float); the default
    `scale` and `offset` map them with `x / 127.5 - 1`. With `image_size`
    set, images are resized (and center cropped to the aspect ratio) first.

    With the default `scale` and `offset`, concrete inputs (numpy arrays,
    eager tensors) are checked before conversion: NaN or infinite values and
    values outside [0, 255] raise a `ValueError`, and float images with
    fractional values all in [0, 1] (probably scaled to [0, 1] already) give
    a warning. Symbolic inputs inside `tf.data` pipelines are not checked.

    Args:
        image_size: `(int, int)` tuple or `None`. Output `(height, width)`.
            `None` keeps the input size. Defaults to `None`.
        scale: float. Defaults to `1 / 127.5`.
        offset: float. Defaults to `-1.0`.
        **kwargs: see `keras_hub.layers.ImageConverter`.
    """

    backbone_cls = JetFormerBackbone

    def __init__(
        self,
        image_size=None,
        scale=DEFAULT_SCALE,
        offset=DEFAULT_OFFSET,
        **kwargs,
    ):
        super().__init__(
            image_size=image_size, scale=scale, offset=offset, **kwargs
        )

    def __call__(self, inputs, *args, **kwargs):
        if self.scale == DEFAULT_SCALE and self.offset == DEFAULT_OFFSET:
            check_pixel_values(inputs)
        return super().__call__(inputs, *args, **kwargs)
