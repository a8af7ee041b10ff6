"""Cached autoregressive decoding and guided sampling of image tokens."""

from keras_jetformer.generation.image_generation import generate_image_tokens
from keras_jetformer.generation.image_sampling import sample_guided_mixture
from keras_jetformer.generation.image_sampling import sample_mixture
