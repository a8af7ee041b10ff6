"""JetFormer image-to-text task: captioning, caption scoring and features.

Dimension legend: B batch, C candidate texts, H, W, Ch image height, width
and channels, N image tokens, D flow values per token, d modelled dims per
token, T text length, E width, S cache length, V text classes.

Every sequence of this task is laid out image first:

    slot:  0     1 .. N    N + 1   N + 2 .. N + 1 + T
           BOI   image     BOS     text

The hidden state at BOS predicts text token 0 and the one at text token
`t - 1` predicts text token `t`, so the key/value cache slot of the input
that predicts text token `t` is `N + 1 + t`. Text is right-padded, so the
rotary position of every valid token equals its slot.
"""

import contextlib

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.samplers import GreedySampler
from keras_hub.samplers import Sampler
from keras_hub.src.samplers.serialization import get as get_sampler
from keras_hub.src.utils.tensor_utils import any_equal

from keras_jetformer.models.input_checks import check_model_images
from keras_jetformer.models.jetformer_backbone import JetFormerBackbone
from keras_jetformer.models.jetformer_causal_lm_preprocessor import (
    JetFormerCausalLMPreprocessor,
)
from keras_jetformer.models.jetformer_training import TRAINING_ARGS_DOC
from keras_jetformer.models.jetformer_training import TRAINING_CONFIG_DEFAULTS
from keras_jetformer.models.jetformer_training import JetFormerTrainingMixin
from keras_jetformer.training.objective import text_log_probs

# Logit given to the model's own special ids (BOS, BOI, NOLABEL) when
# sampling text. It is finite so that a softmax over it cannot give NaN.
MASKED_TEXT_LOGIT = -1e9


def _inference_scope():
    """Turn off gradient tracking on PyTorch; do nothing on other backends."""
    if keras.config.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


# Keyword arguments passed on to `keras_hub.models.Task` and `keras.Model`.
MODEL_ARGUMENTS = {"name", "trainable", "dtype", "compile"}

SAMPLER_NAMES = ("beam", "contrastive", "greedy", "random", "top_k", "top_p")


def _get_sampler(sampler):
    """Return the sampler for a name or instance, or raise `ValueError`."""
    try:
        instance = get_sampler(sampler)
    except (KeyError, ValueError):
        instance = None
    # keras-hub returns an unknown name unchanged instead of raising.
    if not isinstance(instance, Sampler):
        raise ValueError(
            "`sampler` must be a `keras_hub.samplers.Sampler` or one of "
            f"{SAMPLER_NAMES}. Received: sampler={sampler!r}"
        )
    return instance


def _check_batch_size(batch_size):
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            "`batch_size` must be a positive integer or None. "
            f"Received: batch_size={batch_size!r}"
        )


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerCausalLM(JetFormerTrainingMixin, CausalLM):
    # Assigned, not a docstring literal, because it includes the shared
    # `TRAINING_ARGS_DOC`.
    __doc__ = """JetFormer task that writes text about images and trains with `fit`.

    The image-first direction of JetFormer: every sequence is
    `[BOI, image, BOS, text]`, where the image tokens are the modelled
    dims of the Jet flow's output (no noise is added outside training).

    `fit` trains with the JetFormer objective (see `JetFormerTrainingMixin`)
    on the preprocessor's `"loss_mask"`, so that a prompt conditions the
    text but is not scored. `text_prefix_prob` defaults to `0.0` here, which
    trains captioning only; raise it to train image generation on the same
    backbone too.

    `generate()` prefills `[BOI, image, BOS, prompt]` into a key/value cache
    in one pass, then decodes one token per step with the sampler set in
    `compile()` (greedy by default) until every row has produced a stop
    token or `max_length` text tokens exist. `score()` returns the
    log-likelihood of candidate texts for each image, `classify()` uses it
    for zero-shot classification, and `encode_images()` returns features
    for linear probes.

    Calling the model (and `predict()`) returns the text logits `[B, T, V]`
    of the image-first layout. Unlike most keras-hub causal LMs, the logits
    at position `t` predict `token_ids[:, t]`, not the next token, because
    the model inserts BOS before the text.

    Inputs are dicts with `"images"` in [0, 255], `"responses"` and
    optionally `"prompts"` when a preprocessor is attached, or preprocessed
    dicts (`"images"` in [-1, 1], `"token_ids"`, `"padding_mask"` and
    optionally `"loss_mask"`) without one.

    Args:
        backbone: a `JetFormerBackbone`.
        preprocessor: a `JetFormerCausalLMPreprocessor` or `None`.
    """ + TRAINING_ARGS_DOC.replace(
        "understanding). Defaults to `1.0`.", "understanding). Defaults to `0.0`."
    ) + """

    Example:

    ```python
    causal_lm = keras_jetformer.models.JetFormerCausalLM(
        backbone, preprocessor, training_steps=1000
    )
    causal_lm.fit(
        {"images": images, "prompts": prompts, "responses": captions},
        batch_size=16,
    )
    causal_lm.compile(sampler="top_k")
    causal_lm.generate({"images": images[:2], "prompts": ["", ""]})
    causal_lm.classify(images[:2], ["zero", "one", "two"], "a handwritten {}")
    ```
    """

    backbone_cls = JetFormerBackbone
    preprocessor_cls = JetFormerCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        training_config = {
            name: kwargs.pop(name)
            for name in list(kwargs)
            if name in TRAINING_CONFIG_DEFAULTS
        }
        training_config.setdefault("text_prefix_prob", 0.0)
        # Keras ignores unknown keyword arguments, which would hide a
        # misspelled training argument.
        unknown = sorted(set(kwargs) - MODEL_ARGUMENTS)
        if unknown:
            received = ", ".join(f"{name}={kwargs[name]!r}" for name in unknown)
            raise TypeError(
                "Unknown arguments of `JetFormerCausalLM`. The training "
                f"arguments are {sorted(TRAINING_CONFIG_DEFAULTS)}. "
                f"Received: {received}"
            )

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self._configure_training(**training_config)

        # === Functional Model ===
        inputs = {
            name: backbone.input[name]
            for name in ("images", "token_ids", "padding_mask")
        }
        # The objective reads `loss_mask`; the forward pass does not need it.
        inputs["loss_mask"] = keras.Input(
            shape=(None,), dtype="bool", name="loss_mask", optional=True
        )
        image_first = ops.zeros_like(inputs["token_ids"][:, 0], dtype="bool")
        outputs = backbone(
            {
                "images": inputs["images"],
                "token_ids": inputs["token_ids"],
                "padding_mask": inputs["padding_mask"],
                "text_first_mask": image_first,
            }
        )
        super().__init__(
            inputs=inputs, outputs=outputs["text_logits"], **kwargs
        )

        # === Training state ===
        self._create_training_state()

    def compile(
        self,
        optimizer="auto",
        loss=None,
        *,
        metrics=None,
        weighted_metrics=None,
        sampler="greedy",
        **kwargs,
    ):
        """Configure training and the sampler of `generate()`.

        Training works as in `JetFormerTrainingMixin.compile`:
        `optimizer="auto"` builds the reference's optimizer, only kernels
        are weight-decayed, and `loss`, `metrics` and `weighted_metrics`
        must be left unset because the JetFormer objective provides them.

        Args:
            sampler: a sampler name (`"greedy"`, `"top_k"`, `"top_p"`,
                `"random"`, `"beam"`, `"contrastive"`) or a
                `keras_hub.samplers.Sampler`. A sampler with
                `temperature=0` decodes greedily. Defaults to `"greedy"`.
        """
        if weighted_metrics not in (None, "auto"):
            raise ValueError(
                "JetFormer tasks train with their own objective and "
                "metrics, so leave `weighted_metrics` unset. "
                f"Received: weighted_metrics={weighted_metrics!r}"
            )
        sampler = _get_sampler(sampler)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self.sampler = sampler
        self.generate_function = None
        self.inference_functions = {}

    # --- Cached forward passes ---------------------------------------------

    def _image_prefix(self, images):
        """Embed `[BOI, image]` for images in [-1, 1].

        Returns `(embeddings [B, N + 1, E], image_tokens [B, N, D])`.
        """
        backbone = self.backbone
        transformer = backbone.transformer
        image_tokens, _ = backbone.encode_images(images)
        modelled_tokens, _ = backbone.split_image_tokens(image_tokens)
        image_embeddings = transformer.image_embedding(modelled_tokens)
        boi = transformer.embed_special_token(
            transformer.boi_id, ops.shape(images)[0]
        )
        boi = ops.cast(boi, image_embeddings.dtype)
        return ops.concatenate([boi, image_embeddings], axis=1), image_tokens

    def _empty_cache(self, batch_size, cache_length):
        transformer = self.backbone.transformer
        block = transformer.decoder_blocks[0]
        shape = (
            batch_size,
            transformer.num_layers,
            2,
            cache_length,
            block.num_key_value_heads,
            block.head_dim,
        )
        return ops.zeros(shape, dtype=transformer.compute_dtype)

    def _run_with_cache(self, embeddings, cache, cache_update_index):
        """Run `embeddings` `[B, L, E]` into cache slots from the update index.

        Each input attends causally to every slot up to its own, so all
        those slots must hold valid keys. Returns `(hidden_states, cache)`.
        """
        batch_size = ops.shape(embeddings)[0]
        length = ops.shape(embeddings)[1]
        cache_length = ops.shape(cache)[3]
        query_slots = cache_update_index + ops.arange(length, dtype="int32")
        key_slots = ops.arange(cache_length, dtype="int32")
        attention_mask = key_slots[None, :] <= query_slots[:, None]
        attention_mask = ops.broadcast_to(
            attention_mask[None], (batch_size, length, cache_length)
        )
        positions = ops.broadcast_to(query_slots[None], (batch_size, length))
        return self.backbone.transformer.run_transformer(
            embeddings,
            attention_mask,
            positions,
            cache=cache,
            cache_update_index=cache_update_index,
        )

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Run text ids through the key/value cache.

        Args:
            token_ids: `[B, L]` int ids (text ids or the BOS id) written at
                cache slots `cache_update_index` onwards.
            cache: `[B, num_layers, 2, S, K, H]` keys and values of the
                slots before `cache_update_index`.
            cache_update_index: int or scalar tensor. Cache slot of the
                first id.

        Returns:
            `(logits [B, L, V], hidden_states [B, L, E], cache)`; the logits
            at each input predict the text token after it.
        """
        transformer = self.backbone.transformer
        embeddings = transformer.token_embedding(token_ids)
        embeddings = ops.cast(embeddings, transformer.compute_dtype)
        hidden_states, cache = self._run_with_cache(
            embeddings, cache, cache_update_index
        )
        return transformer.text_logits(hidden_states), hidden_states, cache

    def _build_cache(self, images, token_ids):
        """Prefill `[BOI, image, BOS, text]` into a new cache in one pass.

        Returns `(hidden_states [B, N + 2 + T, E], cache)` with cache length
        `N + 2 + T`. Padding slots of the text get garbage keys, which the
        decoding loop overwrites before any later token attends to them.
        """
        transformer = self.backbone.transformer
        prefix, _ = self._image_prefix(images)
        bos = transformer.embed_special_token(
            transformer.bos_id, ops.shape(token_ids)[0]
        )
        text = transformer.token_embedding(token_ids)
        embeddings = ops.concatenate(
            [prefix, ops.cast(bos, prefix.dtype), ops.cast(text, prefix.dtype)],
            axis=1,
        )
        cache = self._empty_cache(
            ops.shape(token_ids)[0], ops.shape(embeddings)[1]
        )
        return self._run_with_cache(embeddings, cache, 0)

    def _sampling_logits(self, logits):
        """Restrict logits `[B, V']` to the first text vocabulary.

        With `num_vocab_repeats > 1` only the first of the repeated
        vocabularies can be decoded, and the model's special ids are
        never sampled.
        """
        backbone = self.backbone
        logits = ops.cast(logits[..., : backbone.vocabulary_size], "float32")
        special = np.zeros((backbone.vocabulary_size,), "bool")
        special[[backbone.bos_id, backbone.boi_id, backbone.nolabel_id]] = True
        return ops.where(special[None], MASKED_TEXT_LOGIT, logits)

    # --- Generation ------------------------------------------------------------

    def generate_step(self, inputs, stop_token_ids=None):
        """Decode text for one batch of preprocessed inputs.

        Args:
            inputs: dict with `"images"` `[B, H, W, Ch]` in [-1, 1] (or one
                image `[H, W, Ch]`), `"token_ids"` `[B, T]` and
                `"padding_mask"` `[B, T]`. The mask must be True on a
                prefix of each row (the prompt); the sampler fills the rest.
            stop_token_ids: tuple of ids. Decoding stops once every row has
                produced one of them after its prompt. `None` decodes all
                `T` positions.

        Returns:
            dict with `"token_ids"` `[B, T]` and `"padding_mask"` `[B, T]`,
            True on the prompt and on generated tokens up to and including
            the first stop token.
        """
        token_ids = inputs["token_ids"]
        padding_mask = ops.cast(inputs["padding_mask"], "bool")
        images = inputs["images"]
        if len(ops.shape(images)) == 3:
            images = ops.expand_dims(images, axis=0)
        backbone = self.backbone
        bos_slot = backbone.num_image_tokens + 1

        hidden_states, cache = self._build_cache(images, token_ids)
        # Decoding starts at the shortest prompt; the sampler keeps the
        # prompt tokens of longer rows where `padding_mask` is True.
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))
        bos_id = backbone.transformer.bos_id

        def next(prompt, cache, index):
            # Feed the input that predicts token `index`: BOS for the first
            # token, otherwise token `index - 1`.
            batch_size = ops.shape(prompt)[0]
            start = ops.maximum(index - 1, 0)
            previous = ops.slice(prompt, [0, start], [batch_size, 1])
            previous = ops.where(index > 0, previous, bos_id)
            logits, hidden, cache = self.call_with_cache(
                previous, cache, bos_slot + index
            )
            return self._sampling_logits(logits[:, 0]), hidden[:, 0], cache

        sampler = self.sampler
        if getattr(sampler, "temperature", None) == 0:
            # Dividing logits by a zero temperature gives NaN probabilities;
            # the limit of every sampler at zero temperature is greedy.
            sampler = GreedySampler()
        token_ids = sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            # The hidden state of each text token, for contrastive search.
            hidden_states=hidden_states[:, bos_slot + 1 :],
            model=self,
        )

        if stop_token_ids is None:
            return {
                "token_ids": token_ids,
                "padding_mask": ops.ones_like(token_ids, dtype="bool"),
            }
        # Keep everything up to and including the first generated stop token.
        is_stop = ops.cast(
            any_equal(token_ids, stop_token_ids, ops.logical_not(padding_mask)),
            "int32",
        )
        stops_before = ops.cumsum(is_stop, axis=-1) - is_stop
        return {
            "token_ids": token_ids,
            "padding_mask": ops.equal(stops_before, 0),
        }

    # --- Scoring and representations ---------------------------------------

    def _inference_function(self, name, function):
        """Compile `function` of tensors once per task, like `generate()`.

        JAX runs it under `jax.jit` with the weights passed in as state,
        TensorFlow under `tf.function`, and PyTorch eagerly; callers use
        `_inference_scope()` to turn off gradient tracking.
        """
        if getattr(self, "inference_functions", None) is None:
            # A task built with `compile=False` has not made the cache yet.
            self.inference_functions = {}
        if name in self.inference_functions:
            return self.inference_functions[name]
        backend = keras.config.backend()
        compiled = function
        if backend == "tensorflow" and not self.run_eagerly:
            import tensorflow as tf

            compiled = tf.function(function)
        elif backend == "jax" and not self.run_eagerly:
            import jax

            @jax.jit
            def stateless(state, *args):
                trainable_values, non_trainable_values = state
                mapping = list(zip(self.trainable_variables, trainable_values))
                mapping += zip(self.non_trainable_variables, non_trainable_values)
                with keras.StatelessScope(state_mapping=mapping):
                    return function(*args)

            def compiled(*args):
                state = (
                    [variable.value for variable in self.trainable_variables],
                    [
                        variable.value
                        for variable in self.non_trainable_variables
                    ],
                )
                return stateless(state, *args)

        self.inference_functions[name] = compiled
        return compiled

    def _preprocess_images(self, images):
        """Map user images to a numpy `[B, H, W, Ch]` float32 in [-1, 1]."""
        if self.preprocessor is not None and (
            self.preprocessor.image_converter is not None
        ):
            images = self.preprocessor.image_converter(images)
        return check_model_images(images, self.backbone.image_shape)

    def _pack_candidates(self, texts):
        """Tokenize candidate texts; return `(token_ids, score_mask)` `[C, T]`.

        Each candidate is its tokens followed by the end token, padded to
        the longest candidate (never truncated); `score_mask` is True on
        the tokens and the end token.
        """
        if isinstance(texts, str) or not all(
            isinstance(text, str) for text in texts
        ):
            raise TypeError(
                "`texts` must be a list of strings. "
                f"Received: texts={texts!r}"
            )
        if len(texts) == 0:
            raise ValueError("`texts` must contain at least one string.")
        if self.preprocessor is None:
            raise ValueError(
                "Scoring texts needs a tokenizer: attach a "
                "`JetFormerCausalLMPreprocessor`. Received: preprocessor=None"
            )
        tokenizer = self.preprocessor.tokenizer
        sequences = [
            [int(token) for token in ops.convert_to_numpy(ids)]
            for ids in tokenizer(list(texts))
        ]
        length = max(len(sequence) for sequence in sequences) + 1
        token_ids = np.full((len(texts), length), tokenizer.pad_token_id, "int32")
        score_mask = np.zeros((len(texts), length), "bool")
        for row, sequence in enumerate(sequences):
            token_ids[row, : len(sequence)] = sequence
            token_ids[row, len(sequence)] = tokenizer.end_token_id
            score_mask[row, : len(sequence) + 1] = True
        return token_ids, score_mask

    def _image_prefix_cache(self, images):
        """Run `[BOI, image]` into a cache of length `N + 1`."""
        prefix, _ = self._image_prefix(images)
        cache = self._empty_cache(ops.shape(images)[0], ops.shape(prefix)[1])
        _, cache = self._run_with_cache(prefix, cache, 0)
        return cache

    def _score_candidates(self, cache, inputs, token_ids, score_mask):
        """Summed log-likelihoods `[b * c]` of `c` candidates for `b` images.

        `cache` contains each image's `[BOI, image]`; `inputs` `[c, T]` are
        BOS followed by all but the last of `token_ids` `[c, T]`. Rows are
        ordered image-major.
        """
        num_images = ops.shape(cache)[0]
        num_candidates, text_length = ops.shape(token_ids)
        cache = ops.repeat(cache, num_candidates, axis=0)
        text_slots = ops.zeros_like(cache[:, :, :, :text_length])
        cache = ops.concatenate([cache, text_slots], axis=3)
        logits, _, _ = self.call_with_cache(
            ops.tile(inputs, (num_images, 1)),
            cache,
            self.backbone.num_image_tokens + 1,
        )
        log_probs = text_log_probs(logits, ops.tile(token_ids, (num_images, 1)))
        score_mask = ops.cast(ops.tile(score_mask, (num_images, 1)), "float32")
        return ops.sum(log_probs * score_mask, axis=1)

    def _score_token_ids(self, images, token_ids, score_mask, batch_size):
        """Summed log-likelihoods `[B, C]` of packed candidates per image.

        Each image's `[BOI, image]` prefix is run once into a cache, which
        every candidate then continues from.
        """
        transformer = self.backbone.transformer
        num_candidates = token_ids.shape[0]
        # The inputs that predict the text: BOS, then all but the last token.
        bos = np.full((num_candidates, 1), transformer.bos_id, "int32")
        inputs = np.concatenate([bos, token_ids[:, :-1]], axis=1)
        batch_size = batch_size or len(images) * num_candidates
        images_per_call = max(1, batch_size // num_candidates)
        candidates_per_call = min(num_candidates, batch_size)
        prefill = self._inference_function(
            "image_prefix_cache", self._image_prefix_cache
        )
        score_candidates = self._inference_function(
            "score_candidates", self._score_candidates
        )

        scores = []
        for image_start in range(0, len(images), images_per_call):
            image_batch = images[image_start : image_start + images_per_call]
            num_images = image_batch.shape[0]
            cache = prefill(image_batch)
            row_scores = []
            for start in range(0, num_candidates, candidates_per_call):
                stop = min(start + candidates_per_call, num_candidates)
                totals = score_candidates(
                    cache,
                    inputs[start:stop],
                    token_ids[start:stop],
                    score_mask[start:stop],
                )
                totals = ops.convert_to_numpy(totals)
                row_scores.append(totals.reshape(num_images, stop - start))
            scores.append(np.concatenate(row_scores, axis=1))
        return np.concatenate(scores, axis=0)

    def score(self, images, texts, batch_size=None):
        """Log-likelihood of each candidate text for each image.

        The score of a text is `log p(text, end token | image)` in nats:
        the text is scored as a response to an empty prompt, summed over
        its tokens and the end token, without truncation.

        Args:
            images: `[B, H, W, Ch]` images, uint8 or floats in [0, 255] when
                the preprocessor has an image converter (otherwise floats in
                [-1, 1]).
            texts: list of `C` strings.
            batch_size: int. Maximum number of (image, text) pairs per
                forward pass. Defaults to all pairs at once.

        Returns:
            float32 numpy array `[B, C]`.
        """
        _check_batch_size(batch_size)
        token_ids, score_mask = self._pack_candidates(texts)
        with _inference_scope():
            images = self._preprocess_images(images)
            return self._score_token_ids(
                images, token_ids, score_mask, batch_size
            )

    def classify(self, images, class_names, template="{}", batch_size=None):
        """Zero-shot classification by the likelihood of class captions.

        Args:
            images: `[B, H, W, Ch]` images, as for `score()`.
            class_names: list of `C` class names.
            template: string. Caption pattern with one `{}` placeholder for
                the class name. Defaults to `"{}"`.
            batch_size: int. See `score()`.

        Returns:
            `(predicted_indices, scores)`: int numpy `[B]` and the float32
            numpy `[B, C]` log-likelihoods of the captions.
        """
        if not isinstance(template, str) or template.format("a") == (
            template.format("b")
        ):
            raise ValueError(
                "`template` must be a string with a `{}` placeholder for the "
                f"class name. Received: template={template!r}"
            )
        if isinstance(class_names, str):
            raise TypeError(
                "`class_names` must be a list of strings. "
                f"Received: class_names={class_names!r}"
            )
        captions = [template.format(name) for name in class_names]
        scores = self.score(images, captions, batch_size=batch_size)
        return np.argmax(scores, axis=1), scores

    def encode_images(self, images, batch_size=None):
        """Flow tokens and a pooled transformer feature of each image.

        Args:
            images: `[B, H, W, Ch]` images, as for `score()`.
            batch_size: int. Images per forward pass. Defaults to all.

        Returns:
            dict of numpy arrays: `"image_tokens"` `[B, N, D]`, the flow
            output, and `"pooled"` `[B, E]`, the mean of the final-norm
            hidden states over the `[BOI, image]` positions of an image-first
            sequence without text.
        """
        _check_batch_size(batch_size)
        encode = self._inference_function("encode_images", self._encode_images)
        outputs = {"image_tokens": [], "pooled": []}
        with _inference_scope():
            images = self._preprocess_images(images)
            batch_size = batch_size or len(images)
            for start in range(0, len(images), batch_size):
                image_tokens, pooled = encode(images[start : start + batch_size])
                outputs["image_tokens"].append(ops.convert_to_numpy(image_tokens))
                outputs["pooled"].append(ops.convert_to_numpy(pooled))
        return {
            name: np.concatenate(parts, axis=0)
            for name, parts in outputs.items()
        }

    def _encode_images(self, images):
        transformer = self.backbone.transformer
        prefix, image_tokens = self._image_prefix(images)
        valid = ops.ones(ops.shape(prefix)[:2], dtype="bool")
        hidden_states = transformer.run_transformer(
            prefix,
            transformer.causal_attention_mask(valid),
            transformer.positions_from_mask(valid),
        )
        pooled = ops.mean(ops.cast(hidden_states, "float32"), axis=1)
        return image_tokens, pooled

    # --- Serialization -----------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(self.training_config)
        return config
