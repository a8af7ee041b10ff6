"""Tests for the grouped-query attention and the decoder block.

The expected outputs come from a plain numpy version of the block in
float64: RMSNorm, grouped-query attention with rotary embeddings, then a
gated-GELU MLP, each with a residual connection.
"""

import math

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

from keras_hub.src.tests.test_case import TestCase

from keras_jetformer.layers.jetformer_attention import JetFormerAttention
from keras_jetformer.layers.jetformer_decoder_block import (
    JetFormerDecoderBlock,
)

BATCH_SIZE = 2
SEQUENCE_LENGTH = 6
HIDDEN_DIM = 16
HEAD_DIM = 8
NUM_QUERY_HEADS = 4
BLOCK_KWARGS = {
    "hidden_dim": HIDDEN_DIM,
    "intermediate_dim": 32,
    "num_query_heads": NUM_QUERY_HEADS,
    "num_key_value_heads": 1,
    "head_dim": HEAD_DIM,
}
HEAD_CASES = (
    {"testcase_name": "multi_query", "num_key_value_heads": 1},
    {"testcase_name": "grouped_query", "num_key_value_heads": 2},
)


def perturb_weights(layer, seed=0):
    """Overwrite every trainable weight with random values.

    Kernels get `0.3 * N(0, 1)`, so that attention is neither uniform nor
    one-hot. RMSNorm scales get `1 + 0.3 * N(0, 1)`.
    """
    rng = np.random.default_rng(seed)
    for weight in layer.trainable_weights:
        values = 0.3 * rng.standard_normal(weight.shape)
        if "norm" in weight.path:
            values += 1.0
        weight.assign(values.astype(weight.dtype))


def random_inputs(seed=1, shape=(BATCH_SIZE, SEQUENCE_LENGTH, HIDDEN_DIM)):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def causal_mask(batch_size=BATCH_SIZE, length=SEQUENCE_LENGTH):
    mask = np.tril(np.ones((length, length), bool))
    return np.broadcast_to(mask, (batch_size, length, length)).copy()


def sequence_positions(batch_size=BATCH_SIZE, length=SEQUENCE_LENGTH):
    return np.broadcast_to(np.arange(length), (batch_size, length)).copy()


def random_causal_mask(seed=2):
    """Return a causal mask with random holes that keeps the diagonal."""
    rng = np.random.default_rng(seed)
    keep = rng.uniform(size=(BATCH_SIZE, SEQUENCE_LENGTH, SEQUENCE_LENGTH))
    mask = causal_mask() & (keep < 0.6)
    mask |= np.eye(SEQUENCE_LENGTH, dtype=bool)
    return mask


def rotate_numpy(x, positions, max_wavelength=10000.0):
    """Apply rotary embeddings to `x` `[B, T, heads, H]` at `positions`.

    The first half of each head is rotated against the second half:
    `[x1 cos - x2 sin, x2 cos + x1 sin]` with angles
    `position * max_wavelength ** (-2 i / H)`.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inverse_frequencies = max_wavelength ** (
        -2.0 * np.arange(half) / head_dim
    )
    angles = positions[..., None].astype("float64") * inverse_frequencies
    cos = np.cos(angles)[:, :, None, :]
    sin = np.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attention_numpy(x, attention_mask, positions, weights):
    """Return `(outputs, keys, values)` of grouped-query attention.

    `weights` contains the kernels `query [N, D, H]`, `key [K, D, H]`,
    `value [K, D, H]` and `output [N, H, D]`. `keys` are rotated.
    """
    x = x.astype("float64")
    query = np.einsum("btd,ndh->btnh", x, weights["query"])
    key = np.einsum("bsd,kdh->bskh", x, weights["key"])
    value = np.einsum("bsd,kdh->bskh", x, weights["value"])
    query = rotate_numpy(query, positions)
    key = rotate_numpy(key, positions)
    head_dim = query.shape[-1]
    query = query * head_dim**-0.5

    num_query_heads, num_key_value_heads = query.shape[2], key.shape[2]
    groups = num_query_heads // num_key_value_heads
    encoded = np.zeros_like(query)
    for head in range(num_query_heads):
        # Query heads `k * G` to `k * G + G - 1` share key/value head `k`.
        key_value_head = head // groups
        logits = np.einsum(
            "bth,bsh->bts", query[:, :, head], key[:, :, key_value_head]
        )
        logits = np.where(attention_mask, logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        encoded[:, :, head] = np.einsum(
            "bts,bsh->bth", probs, value[:, :, key_value_head]
        )
    outputs = np.einsum("btnh,nhd->btd", encoded, weights["output"])
    return outputs, key, value


def rms_norm_numpy(x, scale, epsilon=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + epsilon) * scale


def gelu_tanh_numpy(x):
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1.0 + np.tanh(inner))


def attention_weights(attention):
    return {
        "query": ops.convert_to_numpy(attention.query_dense.kernel),
        "key": ops.convert_to_numpy(attention.key_dense.kernel),
        "value": ops.convert_to_numpy(attention.value_dense.kernel),
        "output": ops.convert_to_numpy(attention.output_dense.kernel),
    }


def block_numpy(block, x, attention_mask, positions):
    """Run the numpy version of `block` with the block's weights."""

    def kernel(layer):
        return ops.convert_to_numpy(layer.kernel).astype("float64")

    def scale(layer):
        return ops.convert_to_numpy(layer.scale).astype("float64")

    x = x.astype("float64")
    h = rms_norm_numpy(x, scale(block.pre_attention_norm))
    attention_outputs, _, _ = attention_numpy(
        h, attention_mask, positions, attention_weights(block.attention)
    )
    x = x + attention_outputs
    h = rms_norm_numpy(x, scale(block.pre_ffw_norm))
    h = gelu_tanh_numpy(h @ kernel(block.ffw_gating)) * (h @ kernel(block.ffw_up))
    return x + h @ kernel(block.ffw_down)


def build_attention(num_key_value_heads=1):
    attention = JetFormerAttention(
        num_query_heads=NUM_QUERY_HEADS,
        num_key_value_heads=num_key_value_heads,
        head_dim=HEAD_DIM,
    )
    attention.build((None, None, HIDDEN_DIM))
    perturb_weights(attention)
    return attention


def build_block(num_key_value_heads=1):
    block = JetFormerDecoderBlock(
        **{**BLOCK_KWARGS, "num_key_value_heads": num_key_value_heads}
    )
    block.build((None, None, HIDDEN_DIM))
    perturb_weights(block)
    return block


def empty_cache(num_key_value_heads=1, length=SEQUENCE_LENGTH):
    shape = (BATCH_SIZE, 2, length, num_key_value_heads, HEAD_DIM)
    return ops.zeros(shape)


class JetFormerAttentionTest(TestCase):
    @parameterized.named_parameters(*HEAD_CASES)
    def test_matches_numpy_reference(self, num_key_value_heads):
        attention = build_attention(num_key_value_heads)
        x = random_inputs()
        mask = random_causal_mask()
        # The second example starts at position 3, so the rotary angles
        # differ from the token indices.
        positions = sequence_positions()
        positions[1] += 3

        outputs = attention(x, attention_mask=mask, positions=positions)

        expected, _, _ = attention_numpy(
            x, mask, positions, attention_weights(attention)
        )
        self.assertEqual(
            tuple(outputs.shape), (BATCH_SIZE, SEQUENCE_LENGTH, HIDDEN_DIM)
        )
        self.assertAllClose(outputs, expected, atol=1e-5, rtol=1e-5)

    def test_cache_stores_rotated_keys_and_values(self):
        attention = build_attention()
        x = random_inputs()
        positions = sequence_positions()

        _, cache = attention(
            x,
            attention_mask=causal_mask(),
            positions=positions,
            cache=empty_cache(),
            cache_update_index=0,
        )

        _, keys, values = attention_numpy(
            x, causal_mask(), positions, attention_weights(attention)
        )
        self.assertAllClose(cache[:, 0], keys, atol=1e-5, rtol=1e-5)
        self.assertAllClose(cache[:, 1], values, atol=1e-5, rtol=1e-5)

    def test_shifted_positions_give_same_outputs(self):
        # Rotary embeddings depend only on the distance between positions.
        attention = build_attention()
        x = random_inputs()
        positions = sequence_positions()

        outputs = attention(x, attention_mask=causal_mask(), positions=positions)
        shifted = attention(
            x, attention_mask=causal_mask(), positions=positions + 7
        )
        reversed_positions = attention(
            x, attention_mask=causal_mask(), positions=positions[:, ::-1].copy()
        )

        self.assertAllClose(shifted, outputs, atol=1e-5, rtol=1e-5)
        difference = ops.convert_to_numpy(reversed_positions - outputs)
        self.assertGreater(np.max(np.abs(difference)), 1e-3)

    def test_config_round_trip(self):
        attention = JetFormerAttention(
            num_query_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rope_max_wavelength=500,
        )

        config = attention.get_config()
        restored = JetFormerAttention.from_config(config)

        self.assertEqual(restored.get_config(), config)

    def test_rejects_invalid_heads(self):
        with self.assertRaisesRegex(ValueError, "multiple of"):
            JetFormerAttention(
                num_query_heads=4, num_key_value_heads=3, head_dim=8
            )
        with self.assertRaisesRegex(ValueError, "even `head_dim`"):
            JetFormerAttention(
                num_query_heads=4, num_key_value_heads=1, head_dim=7
            )


class JetFormerDecoderBlockTest(TestCase):
    @parameterized.named_parameters(*HEAD_CASES)
    def test_matches_numpy_reference(self, num_key_value_heads):
        block = build_block(num_key_value_heads)
        x = random_inputs()
        mask = random_causal_mask()
        positions = sequence_positions()
        positions[1] += 3

        outputs = block(x, attention_mask=mask, positions=positions)

        expected = block_numpy(block, x, mask, positions)
        self.assertAllClose(outputs, expected, atol=1e-5, rtol=1e-5)

    def test_future_tokens_do_not_change_outputs(self):
        block = build_block()
        x = random_inputs()
        changed_index = 3
        x_changed = x.copy()
        x_changed[:, changed_index] += 5.0

        outputs = ops.convert_to_numpy(
            block(x, attention_mask=causal_mask(), positions=sequence_positions())
        )
        changed_outputs = ops.convert_to_numpy(
            block(
                x_changed,
                attention_mask=causal_mask(),
                positions=sequence_positions(),
            )
        )

        # Queries before the changed token cannot attend to it.
        self.assertAllClose(
            changed_outputs[:, :changed_index],
            outputs[:, :changed_index],
            atol=1e-6,
            rtol=0,
        )
        # The changed token and the queries after it can.
        differences = np.abs(changed_outputs - outputs).max(axis=-1)
        self.assertTrue(
            np.all(differences[:, changed_index:] > 1e-3),
            msg=f"Max output change per token: {differences}",
        )

    def test_masked_key_does_not_change_other_outputs(self):
        block = build_block()
        x = random_inputs()
        masked_index = 2
        # Queries attend causally, but only query 2 may attend to key 2.
        mask = causal_mask()
        mask[:, :, masked_index] = False
        mask[:, masked_index, masked_index] = True
        x_changed = x.copy()
        x_changed[:, masked_index] = random_inputs(seed=9)[:, masked_index]

        outputs = ops.convert_to_numpy(
            block(x, attention_mask=mask, positions=sequence_positions())
        )
        changed_outputs = ops.convert_to_numpy(
            block(x_changed, attention_mask=mask, positions=sequence_positions())
        )

        others = [i for i in range(SEQUENCE_LENGTH) if i != masked_index]
        self.assertAllClose(
            changed_outputs[:, others], outputs[:, others], atol=1e-6, rtol=0
        )
        change = np.abs(changed_outputs - outputs)[:, masked_index].max()
        self.assertGreater(change, 1e-3)

    @parameterized.named_parameters(*HEAD_CASES)
    def test_cached_decoding_matches_full_pass(self, num_key_value_heads):
        block = build_block(num_key_value_heads)
        x = random_inputs()
        mask = causal_mask()
        positions = sequence_positions()
        full_outputs = block(x, attention_mask=mask, positions=positions)

        cache = empty_cache(num_key_value_heads)
        step_outputs = []
        for index in range(SEQUENCE_LENGTH):
            outputs, cache = block(
                x[:, index : index + 1],
                attention_mask=mask[:, index : index + 1],
                positions=positions[:, index : index + 1],
                cache=cache,
                cache_update_index=index,
            )
            step_outputs.append(ops.convert_to_numpy(outputs))

        self.assertAllClose(
            np.concatenate(step_outputs, axis=1),
            full_outputs,
            atol=1e-5,
            rtol=1e-5,
        )

    def test_prefill_then_decode_matches_full_pass(self):
        block = build_block()
        x = random_inputs()
        mask = causal_mask()
        positions = sequence_positions()
        prefill_length = 3
        full_outputs = block(x, attention_mask=mask, positions=positions)

        prefill_outputs, cache = block(
            x[:, :prefill_length],
            attention_mask=mask[:, :prefill_length],
            positions=positions[:, :prefill_length],
            cache=empty_cache(),
            cache_update_index=0,
        )
        step_outputs = [ops.convert_to_numpy(prefill_outputs)]
        for index in range(prefill_length, SEQUENCE_LENGTH):
            outputs, cache = block(
                x[:, index : index + 1],
                attention_mask=mask[:, index : index + 1],
                positions=positions[:, index : index + 1],
                cache=cache,
                # A scalar tensor, as in a compiled generation loop.
                cache_update_index=ops.convert_to_tensor(index, "int32"),
            )
            step_outputs.append(ops.convert_to_numpy(outputs))

        self.assertAllClose(
            np.concatenate(step_outputs, axis=1),
            full_outputs,
            atol=1e-5,
            rtol=1e-5,
        )

    def test_cache_keeps_shape(self):
        block = build_block()
        cache = empty_cache(length=10)

        outputs, new_cache = block(
            random_inputs()[:, :1],
            attention_mask=np.ones((BATCH_SIZE, 1, 10), bool),
            positions=np.zeros((BATCH_SIZE, 1), "int32"),
            cache=cache,
            cache_update_index=4,
        )

        self.assertEqual(tuple(outputs.shape), (BATCH_SIZE, 1, HIDDEN_DIM))
        self.assertEqual(tuple(new_cache.shape), tuple(cache.shape))

    def test_config_round_trip(self):
        block = JetFormerDecoderBlock(
            **BLOCK_KWARGS,
            layer_norm_epsilon=1e-5,
            dropout=0.1,
            rope_max_wavelength=500,
        )

        config = block.get_config()
        restored = JetFormerDecoderBlock.from_config(config)

        self.assertEqual(restored.get_config(), config)
        for key, value in BLOCK_KWARGS.items():
            self.assertEqual(config[key], value)

    def test_serialization(self):
        block = JetFormerDecoderBlock(**BLOCK_KWARGS)

        self.run_serialization_test(block)

    def test_symbolic_call_output_spec(self):
        block = JetFormerDecoderBlock(**BLOCK_KWARGS)
        x = keras.KerasTensor((None, SEQUENCE_LENGTH, HIDDEN_DIM))
        mask = keras.KerasTensor(
            (None, SEQUENCE_LENGTH, SEQUENCE_LENGTH), dtype="bool"
        )
        positions = keras.KerasTensor((None, SEQUENCE_LENGTH), dtype="int32")

        outputs = block(x, attention_mask=mask, positions=positions)

        self.assertEqual(outputs.shape, (None, SEQUENCE_LENGTH, HIDDEN_DIM))
