"""Activations used by the JetFormer layers."""

import keras


@keras.saving.register_keras_serializable(package="keras_jetformer")
def gelu_approximate(x):
    """GELU with the tanh approximation, as in the reference (flax `nn.gelu`).

    Registered so that layers taking an `activation` argument, such as
    `keras_hub.layers.TransformerEncoder`, serialize it by name.
    """
    return keras.activations.gelu(x, approximate=True)
