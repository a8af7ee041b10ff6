"""Image preprocessing for JetFormer."""

import keras
from keras_hub.layers import ImageConverter

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerImageConverter(ImageConverter):
    """Resize images and scale pixel values from [0, 255] to [-1, 1].

    JetFormer models the density of 8-bit images on the [-1, 1] scale, so
    inputs are expected as values in [0, 255] (uint8 or float); the default
    `scale` and `offset` map them with `x / 127.5 - 1`. With `image_size`
    set, images are resized (and center cropped to the aspect ratio) first.

    Args:
        image_size: `(int, int)` tuple or `None`. Output `(height, width)`.
            `None` keeps the input size. Defaults to `None`.
        scale: float. Defaults to `1 / 127.5`.
        offset: float. Defaults to `-1.0`.
        **kwargs: see `keras_hub.layers.ImageConverter`.
    """

    backbone_cls = JetFormerBackbone

    def __init__(self, image_size=None, scale=1.0 / 127.5, offset=-1.0, **kwargs):
        super().__init__(
            image_size=image_size, scale=scale, offset=offset, **kwargs
        )
