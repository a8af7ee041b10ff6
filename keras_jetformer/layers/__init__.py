"""Layers of JetFormer: the Jet flow, the decoder and the mixture head."""

from keras_jetformer.layers.activations import gelu_approximate
from keras_jetformer.layers.gaussian_mixture import GaussianMixtureHead
from keras_jetformer.layers.gaussian_mixture import mixture_log_prob
from keras_jetformer.layers.gaussian_mixture import mixture_parameters
from keras_jetformer.layers.gaussian_mixture import squareplus
from keras_jetformer.layers.jet_coupling import JetCoupling
from keras_jetformer.layers.jet_flow import JetFlow
from keras_jetformer.layers.jetformer_attention import JetFormerAttention
from keras_jetformer.layers.jetformer_decoder_block import JetFormerDecoderBlock
from keras_jetformer.layers.jetformer_transformer import JetFormerTransformer
from keras_jetformer.layers.patching import grid_to_tokens
from keras_jetformer.layers.patching import patchify
from keras_jetformer.layers.patching import tokens_to_grid
from keras_jetformer.layers.patching import unpatchify
from keras_jetformer.layers.rematerialization import rematerialized_call
