"""A Gemma-style pre-norm transformer decoder block."""

import keras
from keras import ops

from keras_jetformer.layers.activations import gelu_approximate
from keras_jetformer.layers.jetformer_attention import JetFormerAttention


def _fan_in_initializer():
    return keras.initializers.VarianceScaling(
        scale=1.0, mode="fan_in", distribution="truncated_normal"
    )


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerDecoderBlock(keras.layers.Layer):
    """Pre-norm decoder block: RMSNorm, attention, RMSNorm, gated-GELU MLP.

    `x + dropout(attention(rms_norm(x)))`, then
    `h + dropout(mlp(rms_norm(h)))` with
    `mlp(h) = (gelu(h @ W_gate) * (h @ W_up)) @ W_down` (tanh GELU, no
    biases).

    Args:
        hidden_dim: int. Model width.
        intermediate_dim: int. MLP width.
        num_query_heads: int. Query heads.
        num_key_value_heads: int. Key/value heads (1 for multi-query).
        head_dim: int. Size of each attention head.
        layer_norm_epsilon: float. RMSNorm epsilon. Defaults to `1e-6`.
        dropout: float. Dropout on the attention and MLP outputs. Defaults
            to `0.0`.
        rope_max_wavelength: float. Defaults to `10000`.
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        rope_max_wavelength=10000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.rope_max_wavelength = rope_max_wavelength

        # === Layers ===
        self.pre_attention_norm = keras.layers.RMSNormalization(
            epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="pre_attention_norm",
        )
        self.attention = JetFormerAttention(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            rope_max_wavelength=rope_max_wavelength,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.pre_ffw_norm = keras.layers.RMSNormalization(
            epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="pre_ffw_norm",
        )
        self.ffw_gating = keras.layers.Dense(
            intermediate_dim,
            use_bias=False,
            kernel_initializer=_fan_in_initializer(),
            dtype=self.dtype_policy,
            name="ffw_gating",
        )
        self.ffw_up = keras.layers.Dense(
            intermediate_dim,
            use_bias=False,
            kernel_initializer=_fan_in_initializer(),
            dtype=self.dtype_policy,
            name="ffw_up",
        )
        self.ffw_down = keras.layers.Dense(
            hidden_dim,
            use_bias=False,
            kernel_initializer=_fan_in_initializer(),
            dtype=self.dtype_policy,
            name="ffw_down",
        )
        self.dropout_layer = keras.layers.Dropout(
            dropout, dtype=self.dtype_policy, name="dropout"
        )

    def build(self, input_shape):
        self.pre_attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.pre_ffw_norm.build(input_shape)
        self.ffw_gating.build(input_shape)
        self.ffw_up.build(input_shape)
        self.ffw_down.build((*input_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(
        self,
        x,
        attention_mask,
        positions,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        """Run the block on `x` `[B, T, D]`; see `JetFormerAttention.call`.

        Returns `outputs`, or `(outputs, cache)` when `cache` is given.
        """
        h = self.pre_attention_norm(x)
        attention_outputs = self.attention(
            h,
            attention_mask=attention_mask,
            positions=positions,
            cache=cache,
            cache_update_index=cache_update_index,
        )
        if cache is not None:
            attention_outputs, cache = attention_outputs
        x = x + self.dropout_layer(attention_outputs, training=training)

        # The MLP runs on the tokens flattened to `[B * T, D]`, because on
        # JAX (XLA:CPU, jaxlib 0.10.2) the weight gradients of `[B, T, D]`
        # matmuls compile to slow transposing copies. At bench-32 size the
        # MLP's gradient took 89 ms flat and 156 ms unflattened.
        h = ops.reshape(self.pre_ffw_norm(x), (-1, self.hidden_dim))
        h = gelu_approximate(self.ffw_gating(h)) * self.ffw_up(h)
        h = ops.reshape(self.ffw_down(h), ops.shape(x))
        x = x + self.dropout_layer(h, training=training)
        if cache is not None:
            return x, cache
        return x

    def compute_output_spec(self, x, attention_mask, positions, **kwargs):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "rope_max_wavelength": self.rope_max_wavelength,
            }
        )
        return config
