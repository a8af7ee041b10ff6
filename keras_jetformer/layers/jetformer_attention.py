"""Multi-query attention with rotary positions and a key/value cache.

Dimension legend: B batch, T query length, S key length (the cache length
when decoding), D model width, N query heads, K key/value heads, G = N / K
query heads per key/value head, H head dim.
"""

import keras
from keras import ops

from keras_hub.layers import RotaryEmbedding

# Attention logit of masked keys. The finite value (rather than -inf) keeps a
# row whose keys are all masked from producing NaN.
MASKED_LOGIT = -2.3819763e38


def _fan_in_initializer(scale):
    # Keras counts every kernel axis but the last one as fan-in; `scale`
    # cancels the head axis so that the fan-in is the model width alone.
    return keras.initializers.VarianceScaling(
        scale=scale, mode="fan_in", distribution="truncated_normal"
    )


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerAttention(keras.layers.Layer):
    """Grouped-query (multi-query for one key/value head) causal attention.

    Rotary position embeddings are applied to queries and keys at explicit
    per-token positions, so that padding inside a sequence does not advance
    the position. Queries are scaled by `1 / sqrt(head_dim)`; logits and
    softmax are computed in float32.

    Args:
        num_query_heads: int. Number of query heads `N`.
        num_key_value_heads: int. Number of key/value heads `K`; `N` must be
            a multiple of `K`.
        head_dim: int. Size of every head `H`.
        rope_max_wavelength: float. Maximum wavelength of the rotary
            embedding. Defaults to `10000`.
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        rope_max_wavelength=10000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of "
                "`num_key_value_heads`. Received: "
                f"num_query_heads={num_query_heads}, "
                f"num_key_value_heads={num_key_value_heads}"
            )
        if head_dim % 2:
            raise ValueError(
                "Rotary embeddings need an even `head_dim`. "
                f"Received: head_dim={head_dim}"
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rope_max_wavelength = rope_max_wavelength

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.query_dense = keras.layers.EinsumDense(
            "btd,ndh->btnh",
            output_shape=(None, self.num_query_heads, self.head_dim),
            kernel_initializer=_fan_in_initializer(self.num_query_heads),
            dtype=self.dtype_policy,
            name="query",
        )
        self.query_dense.build(input_shape)
        self.key_dense = keras.layers.EinsumDense(
            "bsd,kdh->bskh",
            output_shape=(None, self.num_key_value_heads, self.head_dim),
            kernel_initializer=_fan_in_initializer(self.num_key_value_heads),
            dtype=self.dtype_policy,
            name="key",
        )
        self.key_dense.build(input_shape)
        self.value_dense = keras.layers.EinsumDense(
            "bsd,kdh->bskh",
            output_shape=(None, self.num_key_value_heads, self.head_dim),
            kernel_initializer=_fan_in_initializer(self.num_key_value_heads),
            dtype=self.dtype_policy,
            name="value",
        )
        self.value_dense.build(input_shape)
        self.output_dense = keras.layers.EinsumDense(
            "btnh,nhd->btd",
            output_shape=(None, hidden_dim),
            kernel_initializer=_fan_in_initializer(1.0),
            dtype=self.dtype_policy,
            name="attention_output",
        )
        self.output_dense.build(
            (None, None, self.num_query_heads, self.head_dim)
        )
        self.rotary_embedding = RotaryEmbedding(
            max_wavelength=self.rope_max_wavelength,
            dtype=self.dtype_policy,
            name="rotary_embedding",
        )
        self.built = True

    def call(
        self,
        x,
        attention_mask,
        positions,
        cache=None,
        cache_update_index=None,
    ):
        """Attend from `x` `[B, T, D]`.

        Args:
            x: `[B, T, D]` inputs.
            attention_mask: `[B, T, S]` bool, True where query `t` may attend
                to key `s`.
            positions: `[B, T]` int rotary positions of the queries (and of
                the keys computed from `x`).
            cache: optional `[B, 2, S, K, H]` keys and values; the new keys
                and values are written at `cache_update_index`.
            cache_update_index: int or scalar tensor, where to write.

        Returns:
            `outputs` `[B, T, D]`, or `(outputs, cache)` when `cache` is
            given.
        """
        query = self.query_dense(x)
        key = self.key_dense(x)
        value = self.value_dense(x)
        query = self.rotary_embedding(query, positions=positions)
        key = self.rotary_embedding(key, positions=positions)
        query = query * ops.cast(self.head_dim**-0.5, query.dtype)

        if cache is not None:
            start = [0, cache_update_index, 0, 0]
            key = ops.slice_update(cache[:, 0], start, key)
            value = ops.slice_update(cache[:, 1], start, value)
            cache = ops.stack([key, value], axis=1)

        batch_size = ops.shape(query)[0]
        query_length = ops.shape(query)[1]
        groups = self.num_query_heads // self.num_key_value_heads
        query = ops.reshape(
            query,
            (
                batch_size,
                query_length,
                self.num_key_value_heads,
                groups,
                self.head_dim,
            ),
        )
        logits = ops.einsum("btkgh,bskh->bkgts", query, key)
        logits = ops.cast(logits, "float32")
        mask = ops.expand_dims(ops.expand_dims(attention_mask, 1), 1)
        logits = ops.where(mask, logits, MASKED_LOGIT)
        probs = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
        encoded = ops.einsum("bkgts,bskh->btkgh", probs, value)
        encoded = ops.reshape(
            encoded,
            (batch_size, query_length, self.num_query_heads, self.head_dim),
        )
        outputs = self.output_dense(encoded)
        if cache is not None:
            return outputs, cache
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "rope_max_wavelength": self.rope_max_wavelength,
            }
        )
        return config
