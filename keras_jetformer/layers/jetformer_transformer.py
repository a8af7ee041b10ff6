"""JetFormer's decoder-only transformer over text and soft image tokens.

Dimension legend: B batch, T text length, R vocabulary repeats, N image
tokens, d modelled dims per image token, E width, L = R * T + N + 1 sequence
length, V = R * vocabulary_size text classes, K mixture components, S cache
length, H head dim.

Sequence layouts, per example (the last element is dropped because nothing
comes after it to predict):
    text first:  [BOS, text (R * T), BOI, image (N)]   (generation)
    image first: [BOI, image (N), BOS, text (R * T)]   (understanding)
Padding inside the text keeps its slot but is masked from attention and does
not advance the rotary position.
"""

import keras
from keras import ops

from keras_hub.layers import ReversibleEmbedding

from keras_jetformer.layers.gaussian_mixture import GaussianMixtureHead
from keras_jetformer.layers.jetformer_decoder_block import JetFormerDecoderBlock
from keras_jetformer.layers.rematerialization import rematerialized_call


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerTransformer(keras.layers.Layer):
    """Embeddings, decoder blocks and output heads of JetFormer.

    Calling the layer on a dict with `"token_ids"` `[B, T]`,
    `"padding_mask"` `[B, T]`, `"image_tokens"` `[B, N, d]` and
    `"text_first_mask"` `[B]` returns a dict with `"hidden_states"`
    (final-norm outputs `[B, L, E]`), `"text_logits"` `[B, T, V]` and
    `"image_logits"` `[B, N, K * (1 + 2d)]`. The step methods (`embed_sequence`,
    `run_transformer`, `split_hidden_states`, ...) are what training and
    cached generation use.

    See `JetFormerBackbone` for the arguments. With `remat=True` the
    decoder blocks of `run_transformer` (without a cache) recompute their
    activations in the backward pass (`rematerialized_call`) instead of
    storing them.
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        image_token_dim,
        num_image_tokens,
        num_mixtures,
        bos_id,
        boi_id,
        nolabel_id,
        num_vocab_repeats=1,
        tie_text_embeddings=True,
        scale_tol=1e-6,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        rope_max_wavelength=10000,
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.image_token_dim = image_token_dim
        self.num_image_tokens = num_image_tokens
        self.num_mixtures = num_mixtures
        self.bos_id = bos_id
        self.boi_id = boi_id
        self.nolabel_id = nolabel_id
        self.num_vocab_repeats = num_vocab_repeats
        self.tie_text_embeddings = tie_text_embeddings
        self.scale_tol = scale_tol
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.rope_max_wavelength = rope_max_wavelength
        self.remat = remat

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size * num_vocab_repeats,
            output_dim=hidden_dim,
            tie_weights=tie_text_embeddings,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        self.image_embedding = keras.layers.Dense(
            hidden_dim, dtype=self.dtype_policy, name="image_embedding"
        )
        self.decoder_blocks = [
            JetFormerDecoderBlock(
                hidden_dim=hidden_dim,
                intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                layer_norm_epsilon=layer_norm_epsilon,
                dropout=dropout,
                rope_max_wavelength=rope_max_wavelength,
                dtype=self.dtype_policy,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.RMSNormalization(
            epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="final_norm",
        )
        self.image_head = GaussianMixtureHead(
            num_mixtures=num_mixtures,
            token_dim=image_token_dim,
            scale_tol=scale_tol,
            dtype=self.dtype_policy,
            name="image_head",
        )

    def build(self, input_shape=None):
        hidden_shape = (None, None, self.hidden_dim)
        self.token_embedding.build((None, None))
        self.image_embedding.build((None, None, self.image_token_dim))
        for block in self.decoder_blocks:
            block.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        self.image_head.build(hidden_shape)
        self.text_logits_bias = None
        if not self.tie_text_embeddings:
            # An untied output layer is a dense layer with a bias.
            self.text_logits_bias = self.add_weight(
                name="text_logits_bias",
                shape=(self.vocabulary_size * self.num_vocab_repeats,),
                initializer="zeros",
            )
        self.built = True

    # --- Sequence construction -------------------------------------------

    def embed_special_token(self, token_id, batch_size):
        """Embed one special id for every example: `[B, 1, E]`."""
        ids = ops.full((batch_size, 1), token_id, dtype="int32")
        return self.token_embedding(ids)

    def repeat_text(self, token_ids, padding_mask):
        """Tile text `R` times with per-repeat id offsets: `[B, R * T]`."""
        repeats = self.num_vocab_repeats
        if repeats == 1:
            return token_ids, padding_mask
        text_length = ops.shape(token_ids)[1]
        offsets = ops.repeat(
            ops.arange(repeats, dtype="int32") * self.vocabulary_size,
            text_length,
        )
        token_ids = ops.tile(token_ids, (1, repeats)) + offsets[None]
        padding_mask = ops.tile(padding_mask, (1, repeats))
        return token_ids, padding_mask

    def embed_sequence(
        self,
        token_ids,
        padding_mask,
        image_tokens,
        text_first_mask,
        drop_prefix=None,
        drop_last=True,
    ):
        """Build the embedded sequence and its validity mask.

        Args:
            token_ids: `[B, T]` int text ids.
            padding_mask: `[B, T]` bool, False on text padding.
            image_tokens: `[B, N', d]` modelled image tokens (`N'` may be 0
                when prefilling a generation prompt).
            text_first_mask: `[B]` bool, True for `[BOS, text, BOI, image]`.
            drop_prefix: optional `[B]` bool. On text-first rows the text is
                replaced by NOLABEL embeddings and counted as fully valid
                (the unconditional stream of classifier-free guidance); on
                image-first rows the image is replaced.
            drop_last: bool. Drop the last element, which has nothing to
                predict (training); keep it when prefilling a cache.

        Returns:
            `(embeddings [B, L, E], input_mask [B, L] bool)`.
        """
        token_ids = ops.cast(token_ids, "int32")
        batch_size = ops.shape(token_ids)[0]
        padding_mask = ops.cast(padding_mask, "bool")
        text_first_mask = ops.cast(text_first_mask, "bool")
        repeated_ids, text_mask = self.repeat_text(token_ids, padding_mask)
        text_embeddings = self.token_embedding(repeated_ids)
        image_embeddings = self.image_embedding(image_tokens)
        text_embeddings = ops.cast(text_embeddings, image_embeddings.dtype)

        if drop_prefix is not None:
            drop_prefix = ops.cast(drop_prefix, "bool")
            nolabel_ids = ops.full_like(token_ids, self.nolabel_id)
            nolabel_ids, _ = self.repeat_text(nolabel_ids, padding_mask)
            nolabel_embeddings = ops.cast(
                self.token_embedding(nolabel_ids), image_embeddings.dtype
            )
            drop_text = ops.logical_and(text_first_mask, drop_prefix)
            drop_image = ops.logical_and(
                ops.logical_not(text_first_mask), drop_prefix
            )
            text_embeddings = ops.where(
                drop_text[:, None, None], nolabel_embeddings, text_embeddings
            )
            text_mask = ops.logical_or(text_mask, drop_text[:, None])
            nolabel = ops.cast(
                self.embed_special_token(self.nolabel_id, batch_size),
                image_embeddings.dtype,
            )
            image_embeddings = ops.where(
                drop_image[:, None, None], nolabel, image_embeddings
            )

        bos = ops.cast(
            self.embed_special_token(self.bos_id, batch_size),
            image_embeddings.dtype,
        )
        boi = ops.cast(
            self.embed_special_token(self.boi_id, batch_size),
            image_embeddings.dtype,
        )
        special_mask = ops.ones((batch_size, 1), dtype="bool")
        image_mask = ops.ones(ops.shape(image_embeddings)[:2], dtype="bool")

        text_first = ops.concatenate(
            [bos, text_embeddings, boi, image_embeddings], axis=1
        )
        text_first_valid = ops.concatenate(
            [special_mask, text_mask, special_mask, image_mask], axis=1
        )
        image_first = ops.concatenate(
            [boi, image_embeddings, bos, text_embeddings], axis=1
        )
        image_first_valid = ops.concatenate(
            [special_mask, image_mask, special_mask, text_mask], axis=1
        )
        if drop_last:
            text_first, image_first = text_first[:, :-1], image_first[:, :-1]
            text_first_valid = text_first_valid[:, :-1]
            image_first_valid = image_first_valid[:, :-1]
        embeddings = ops.where(
            text_first_mask[:, None, None], text_first, image_first
        )
        input_mask = ops.where(
            text_first_mask[:, None], text_first_valid, image_first_valid
        )
        return embeddings, input_mask

    @staticmethod
    def causal_attention_mask(input_mask):
        """Causal mask `[B, L, L]` that also hides invalid keys."""
        length = ops.shape(input_mask)[1]
        positions = ops.arange(length)
        causal = positions[:, None] >= positions[None, :]
        return ops.logical_and(causal[None], input_mask[:, None, :])

    @staticmethod
    def positions_from_mask(input_mask):
        """Rotary positions `[B, L]` that count valid tokens only."""
        return ops.cumsum(ops.cast(input_mask, "int32"), axis=1) - 1

    # --- Transformer -------------------------------------------------------

    def run_transformer(
        self,
        embeddings,
        attention_mask,
        positions,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        """Run the decoder blocks and the final norm.

        With `cache` (`[B, num_layers, 2, S, K, H]`) the new keys and values
        are written at `cache_update_index` and `(hidden_states, cache)` is
        returned; otherwise `hidden_states` `[B, L, E]`.
        """
        x = embeddings
        caches = []
        for index, block in enumerate(self.decoder_blocks):
            if cache is None:
                if self.remat:
                    x = self._rematerialized_block(
                        block, x, attention_mask, positions, training
                    )
                else:
                    x = block(
                        x,
                        attention_mask=attention_mask,
                        positions=positions,
                        training=training,
                    )
            else:
                x, block_cache = block(
                    x,
                    attention_mask=attention_mask,
                    positions=positions,
                    cache=cache[:, index],
                    cache_update_index=cache_update_index,
                    training=training,
                )
                caches.append(block_cache)
        hidden_states = self.final_norm(x)
        if cache is None:
            return hidden_states
        return hidden_states, ops.stack(caches, axis=1)

    def split_hidden_states(self, hidden_states, text_first_mask, text_length):
        """Pick the hidden states that predict text and image tokens.

        Returns `(text_hidden_states [B, T, E], image_hidden_states
        [B, N, E])`: the hidden state at BOS predicts text token 0 and the
        one at BOI predicts image token 0.
        """
        num_image_tokens = self.num_image_tokens
        repeated_length = self.num_vocab_repeats * text_length
        text_first_text = hidden_states[:, :text_length]
        text_first_image = hidden_states[:, repeated_length + 1 :]
        image_first_image = hidden_states[:, :num_image_tokens]
        image_first_text = hidden_states[
            :, num_image_tokens + 1 : num_image_tokens + 1 + text_length
        ]
        text_first_mask = ops.cast(text_first_mask, "bool")[:, None, None]
        text_hidden_states = ops.where(
            text_first_mask, text_first_text, image_first_text
        )
        image_hidden_states = ops.where(
            text_first_mask, text_first_image, image_first_image
        )
        return text_hidden_states, image_hidden_states

    def text_logits(self, text_hidden_states):
        """Text logits `[..., V]` (tied or untied output embedding)."""
        logits = self.token_embedding(text_hidden_states, reverse=True)
        if self.text_logits_bias is not None:
            logits = logits + ops.cast(self.text_logits_bias, logits.dtype)
        return logits

    # --- Layer API -----------------------------------------------------------

    def call(self, inputs, drop_prefix=None, training=None):
        token_ids = inputs["token_ids"]
        text_first_mask = inputs["text_first_mask"]
        embeddings, input_mask = self.embed_sequence(
            token_ids,
            inputs["padding_mask"],
            inputs["image_tokens"],
            text_first_mask,
            drop_prefix=drop_prefix,
        )
        hidden_states = self.run_transformer(
            embeddings,
            self.causal_attention_mask(input_mask),
            self.positions_from_mask(input_mask),
            training=training,
        )
        text_hidden_states, image_hidden_states = self.split_hidden_states(
            hidden_states, text_first_mask, token_ids.shape[1]
        )
        return {
            "hidden_states": hidden_states,
            "text_logits": self.text_logits(text_hidden_states),
            "image_logits": self.image_head(image_hidden_states),
        }

    def compute_output_spec(self, inputs, drop_prefix=None, training=None):
        batch_size, text_length = inputs["token_ids"].shape[:2]
        num_image_tokens = self.num_image_tokens
        sequence_length = None
        if text_length is not None:
            sequence_length = (
                self.num_vocab_repeats * text_length + num_image_tokens + 1
            )
        return {
            "hidden_states": keras.KerasTensor(
                (batch_size, sequence_length, self.hidden_dim),
                dtype=self.compute_dtype,
            ),
            "text_logits": keras.KerasTensor(
                (
                    batch_size,
                    text_length,
                    self.vocabulary_size * self.num_vocab_repeats,
                ),
                dtype=self.compute_dtype,
            ),
            "image_logits": keras.KerasTensor(
                (batch_size, num_image_tokens, self.image_head.num_outputs),
                dtype=self.compute_dtype,
            ),
        }

    def _rematerialized_block(
        self, block, x, attention_mask, positions, training
    ):
        """Run one rematerialized decoder block."""

        def run_block(x, attention_mask, positions):
            return block(
                x,
                attention_mask=attention_mask,
                positions=positions,
                training=training,
            )

        return rematerialized_call(
            block, run_block, x, attention_mask, positions
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "image_token_dim": self.image_token_dim,
                "num_image_tokens": self.num_image_tokens,
                "num_mixtures": self.num_mixtures,
                "bos_id": self.bos_id,
                "boi_id": self.boi_id,
                "nolabel_id": self.nolabel_id,
                "num_vocab_repeats": self.num_vocab_repeats,
                "tie_text_embeddings": self.tie_text_embeddings,
                "scale_tol": self.scale_tol,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "rope_max_wavelength": self.rope_max_wavelength,
                "remat": self.remat,
            }
        )
        return config
