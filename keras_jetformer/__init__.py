"""keras_jetformer: JetFormer for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_jetformer import data
from keras_jetformer import generation
from keras_jetformer import layers
from keras_jetformer import models
from keras_jetformer import training
from keras_jetformer.version import __version__
