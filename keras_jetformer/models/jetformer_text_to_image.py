"""JetFormer text-to-image task: training and image generation."""

import contextlib
import itertools
import math

import keras
import numpy as np
from keras import ops
from keras_hub.models import TextToImage

from keras_jetformer.generation.image_generation import generate_image_tokens
from keras_jetformer.generation.image_sampling import GUIDANCE_METHODS
from keras_jetformer.models.input_checks import check_model_images
from keras_jetformer.models.input_checks import check_token_ids
from keras_jetformer.models.jetformer_backbone import JetFormerBackbone
from keras_jetformer.models.jetformer_text_to_image_preprocessor import (
    JetFormerTextToImagePreprocessor,
)
from keras_jetformer.models.jetformer_training import TRAINING_ARGS_DOC
from keras_jetformer.models.jetformer_training import TRAINING_CONFIG_DEFAULTS
from keras_jetformer.models.jetformer_training import JetFormerTrainingMixin
from keras_jetformer.training.objective import PIXEL_HALF_RANGE
from keras_jetformer.training.objective import bits_per_dim

try:
    import tensorflow as tf
except ImportError:
    tf = None


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerTextToImage(JetFormerTrainingMixin, TextToImage):
    # Assigned, not a docstring literal, because it includes the shared
    # `TRAINING_ARGS_DOC`.
    __doc__ = """JetFormer task that generates images from text and trains with `fit`.

    `fit` trains with the JetFormer objective (see `JetFormerTrainingMixin`):
    the noise curriculum over `training_steps`, dequantization noise, latent
    input noise, prefix dropout for classifier-free guidance and the
    bits-per-dimension loss. Inputs are dicts with `"images"` in [0, 255]
    and `"prompts"` when a preprocessor is attached, or preprocessed dicts
    (`"images"` in [-1, 1], `"token_ids"`, `"padding_mask"`, optionally
    `"loss_mask"`) without one.

    `generate()` decodes image tokens autoregressively with a key/value
    cache, draws the factored-out dimensions from N(0, 1), runs the flow
    backwards and returns uint8 images.

    Args:
        backbone: a `JetFormerBackbone`.
        preprocessor: a `JetFormerTextToImagePreprocessor` or `None`.
    """ + TRAINING_ARGS_DOC + """

    Example:

    ```python
    text_to_image = keras_jetformer.models.JetFormerTextToImage(
        backbone, preprocessor, training_steps=1000
    )
    text_to_image.fit(dataset, epochs=1)
    images = text_to_image.generate(
        ["a handwritten seven", "a handwritten two"],
        guidance_scale=3.0,
        temperature=0.9,
        seed=0,
    )
    ```
    """

    backbone_cls = JetFormerBackbone
    preprocessor_cls = JetFormerTextToImagePreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        training_config = {
            name: kwargs.pop(name)
            for name in list(kwargs)
            if name in TRAINING_CONFIG_DEFAULTS
        }
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self._configure_training(**training_config)

        # === Functional Model ===
        # `predict()` scores the text-first layout, `[BOS, text, BOI, image]`.
        inputs = {
            name: backbone.input[name]
            for name in ("images", "token_ids", "padding_mask")
        }
        text_first_mask = keras.ops.ones_like(
            inputs["token_ids"][:, 0], dtype="bool"
        )
        outputs = backbone({**inputs, "text_first_mask": text_first_mask})
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Training state and generation ===
        self._create_training_state()
        self.generation_seed_generator = keras.random.SeedGenerator(
            name="generation_seed_generator"
        )

    @property
    def latent_shape(self):
        backbone = self.backbone
        return (None, backbone.num_image_tokens, backbone.token_dim)

    # --- Generation ----------------------------------------------------------

    def generate_step(
        self,
        token_ids,
        padding_mask,
        guidance_scale,
        temperature,
        mixture_temperature,
        guidance_method="closed_form",
    ):
        """Generate images `[B, H, W, C]` in [-1, 1] for tokenized prompts.

        `guidance_scale=None` runs without classifier-free guidance.
        """
        backbone = self.backbone
        seed_state = self.generation_seed_generator.state
        read_only = [
            variable
            for variable in self.variables
            if variable is not seed_state
        ]
        modelled = generate_image_tokens(
            backbone.transformer,
            token_ids,
            padding_mask,
            self.generation_seed_generator,
            guidance_scale=guidance_scale,
            temperature=temperature,
            mixture_temperature=mixture_temperature,
            guidance_method=guidance_method,
            read_only_variables=read_only,
        )
        factored_shape = (
            ops.shape(modelled)[0],
            backbone.num_image_tokens,
            backbone.token_dim - backbone.image_token_dim,
        )
        factored = keras.random.normal(
            factored_shape, seed=self.generation_seed_generator
        )
        tokens = ops.concatenate(
            [ops.cast(modelled, "float32"), factored], axis=-1
        )
        images = backbone.decode_images(tokens)
        return ops.clip(images, -1.0, 1.0)

    def make_generate_function(self, guided=False, guidance_method="closed_form"):
        """Return the compiled generation function for these settings.

        Compiled functions are cached per `(guided, guidance_method)`, so
        repeated calls with the same shapes do not retrace.
        """
        if not isinstance(getattr(self, "generate_function", None), dict):
            self.generate_function = {}
        key = (guided, guidance_method)
        if key in self.generate_function:
            return self.generate_function[key]

        def step(token_ids, padding_mask, guidance_scale, temperature, mixture):
            return self.generate_step(
                token_ids,
                padding_mask,
                guidance_scale if guided else None,
                temperature,
                mixture,
                guidance_method=guidance_method,
            )

        backend = keras.config.backend()
        function = step
        if backend == "torch":
            import torch

            def function(*args):
                with torch.no_grad():
                    return step(*args)

        elif backend == "tensorflow" and not self.run_eagerly:
            function = tf.function(step, jit_compile=self.jit_compile)
        elif backend == "jax" and not self.run_eagerly:
            function = self._jax_generate_function(step)
        self.generate_function[key] = function
        return function

    def _jax_generate_function(self, step):
        import jax

        @jax.jit
        def compiled(state, *args):
            trainable_values, non_trainable_values = state
            mapping = itertools.chain(
                zip(self.trainable_variables, trainable_values),
                zip(self.non_trainable_variables, non_trainable_values),
            )
            with keras.StatelessScope(state_mapping=mapping) as scope:
                outputs = step(*args)
            new_values = []
            for variable, value in zip(
                self.non_trainable_variables, non_trainable_values
            ):
                new_value = scope.get_current_value(variable)
                new_values.append(value if new_value is None else new_value)
            return outputs, new_values

        def function(*args):
            state = (
                [variable.value for variable in self.trainable_variables],
                [variable.value for variable in self.non_trainable_variables],
            )
            outputs, new_values = compiled(state, *args)
            # Keep the advanced seed state so the next call draws anew.
            seed_state = self.generation_seed_generator.state
            for variable, value in zip(self.non_trainable_variables, new_values):
                if variable is seed_state:
                    variable.assign(value)
            return outputs

        return function

    def _tokenize_prompts(self, prompts):
        if self.preprocessor is not None:
            return self.preprocessor.generate_preprocess(prompts)
        if isinstance(prompts, dict) and "token_ids" in prompts:
            check_token_ids(
                prompts["token_ids"],
                prompts.get("padding_mask"),
                self.backbone.vocabulary_size,
            )
            return prompts
        raise ValueError(
            "Without a preprocessor, `generate()` needs tokenized prompts: a "
            "dict with `\"token_ids\"` and `\"padding_mask\"`. "
            f"Received: inputs={type(prompts).__name__}"
        )

    def generate(
        self,
        inputs,
        guidance_scale=0.0,
        temperature=1.0,
        mixture_temperature=1.0,
        seed=None,
        guidance_method="closed_form",
        batch_size=None,
        verbose="auto",
    ):
        """Generate uint8 images `[B, H, W, C]` for text prompts.

        Args:
            inputs: a prompt string, a list of prompts, a dict with
                `"prompts"`, or (without a preprocessor) a dict with
                `"token_ids"` and `"padding_mask"`.
            guidance_scale: float. Classifier-free guidance weight `w` in
                `(1 + w) log p_cond - w log p_uncond`; `0` turns guidance off.
                Defaults to `0.0`.
            temperature: float. Multiplier of the mixture components'
                standard deviations (the reference's `temperature`).
                Defaults to `1.0`.
            mixture_temperature: float. Divisor of the mixture logits (the
                reference's `temperature_probs` is its inverse). Defaults to
                `1.0`.
            seed: int. Makes the generation reproducible. Defaults to `None`
                (each call draws new samples).
            guidance_method: `"closed_form"` (exact where the guided density
                is Gaussian) or `"rejection"` (the reference's sampler).
            batch_size: int. Prompts generated per call of the compiled
                function. Defaults to all at once.
            verbose: `"auto"`, 0 or 1. Show a progress bar over batches.

        Returns:
            uint8 numpy array `[B, H, W, C]`, or `[H, W, C]` for one string.
        """
        if not guidance_scale >= 0:
            raise ValueError(
                "`guidance_scale` must be non-negative. "
                f"Received: guidance_scale={guidance_scale}"
            )
        for name, value in (
            ("temperature", temperature),
            ("mixture_temperature", mixture_temperature),
        ):
            if not value > 0:
                raise ValueError(
                    f"`{name}` must be positive. Received: {name}={value}"
                )
        if guidance_method not in GUIDANCE_METHODS:
            raise ValueError(
                f"`guidance_method` must be one of {GUIDANCE_METHODS}. "
                f"Received: guidance_method={guidance_method!r}"
            )
        single = isinstance(inputs, str)
        if single:
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            raise ValueError("`inputs` must contain at least one prompt.")
        tokenized = self._tokenize_prompts(inputs)
        token_ids = ops.convert_to_numpy(tokenized["token_ids"])
        padding_mask = ops.convert_to_numpy(tokenized["padding_mask"])
        if token_ids.ndim == 1:
            token_ids, padding_mask = token_ids[None], padding_mask[None]
        if seed is not None:
            self.generation_seed_generator.state.assign(
                np.array([seed, 0], dtype="uint32").astype(
                    self.generation_seed_generator.state.dtype
                )
            )
        guided = guidance_scale > 0
        function = self.make_generate_function(guided, guidance_method)
        total = token_ids.shape[0]
        batch_size = batch_size or total
        progress = None
        if verbose == 1 or (verbose == "auto" and total > batch_size):
            progress = keras.utils.Progbar(total, unit_name="image")
        outputs = []
        for start in range(0, total, batch_size):
            images = function(
                ops.convert_to_tensor(token_ids[start : start + batch_size]),
                ops.convert_to_tensor(padding_mask[start : start + batch_size]),
                ops.convert_to_tensor(float(guidance_scale)),
                ops.convert_to_tensor(float(temperature)),
                ops.convert_to_tensor(float(mixture_temperature)),
            )
            outputs.append(ops.convert_to_numpy(images))
            if progress is not None:
                progress.add(outputs[-1].shape[0])
        images = np.concatenate(outputs, axis=0)
        images = np.round((images + 1.0) * 127.5).clip(0, 255).astype("uint8")
        return images[0] if single else images

    # --- Likelihood ------------------------------------------------------------

    def image_bits_per_dim(self, images, prompts=None, num_samples=1, seed=None):
        """Negative log-likelihood of images in bits per dimension.

        The exact JetFormer likelihood in evaluation mode, as
        `jetformer_objective` computes it on text-first rows: uniform
        dequantization noise in `[0, 1 / 127.5)` is the only noise, and the
        result is averaged over `num_samples` draws of it. Lower is better;
        the numbers compare with published bits/dim on 8-bit images.

        Args:
            images: `[B, H, W, C]` images, uint8 or floats in [0, 255] when
                the preprocessor has an image converter (otherwise floats
                in [-1, 1]).
            prompts: `B` prompt strings, a dict with `"prompts"`, or
                (without a preprocessor) a dict with `"token_ids"` and
                `"padding_mask"`. `None` scores the images unconditionally:
                the text is replaced by NOLABEL tokens, as a dropped prefix
                is in classifier-free guidance training. That needs a
                preprocessor, whose `sequence_length` sets the number of
                NOLABEL tokens. Defaults to `None`.
            num_samples: int. Dequantization draws to average over.
                Defaults to `1`.
            seed: int. Seed of `numpy.random.default_rng`, which draws
                `uniform(0, 1 / 127.5, images.shape)` once per sample.
                Defaults to `None` (fresh draws).

        Returns:
            float32 numpy array `[B]`.
        """
        if (
            isinstance(num_samples, bool)
            or not isinstance(num_samples, int)
            or num_samples < 1
        ):
            raise ValueError(
                "`num_samples` must be a positive integer. "
                f"Received: num_samples={num_samples!r}"
            )
        if self.preprocessor is not None and (
            self.preprocessor.image_converter is not None
        ):
            images = self.preprocessor.image_converter(images)
        images = check_model_images(images, self.backbone.image_shape)
        batch_size = images.shape[0]
        unconditional = prompts is None
        if unconditional:
            if self.preprocessor is None:
                raise ValueError(
                    "Unconditional bits/dim needs a preprocessor, whose "
                    "`sequence_length` sets the length of the NOLABEL "
                    "prefix; pass `prompts` instead. "
                    "Received: prompts=None, preprocessor=None"
                )
            text_length = self.preprocessor.sequence_length
            token_ids = np.zeros((batch_size, text_length), "int32")
            padding_mask = np.ones((batch_size, text_length), "bool")
        else:
            tokenized = self._tokenize_prompts(
                [prompts] if isinstance(prompts, str) else prompts
            )
            token_ids = ops.convert_to_numpy(tokenized["token_ids"])
            padding_mask = ops.convert_to_numpy(tokenized["padding_mask"])
            if token_ids.ndim != 2 or token_ids.shape[0] != batch_size:
                raise ValueError(
                    "`prompts` must give one prompt per image. Received: "
                    f"token_ids.shape={token_ids.shape} for "
                    f"images.shape={images.shape}"
                )
            check_token_ids(
                token_ids, padding_mask, self.backbone.vocabulary_size
            )

        backbone = self.backbone
        transformer = backbone.transformer
        num_subpixels = math.prod(backbone.image_shape)

        def nll_image(images, token_ids, padding_mask, dequantization_noise):
            # The evaluation-mode image NLL of `jetformer_objective`.
            image_tokens, logdet = backbone.encode_images(
                images + dequantization_noise
            )
            modelled_tokens, factored_tokens = backbone.split_image_tokens(
                image_tokens
            )
            text_first_mask = ops.ones((ops.shape(images)[0],), dtype="bool")
            embeddings, input_mask = transformer.embed_sequence(
                token_ids,
                padding_mask,
                modelled_tokens,
                text_first_mask,
                drop_prefix=text_first_mask if unconditional else None,
            )
            hidden_states = transformer.run_transformer(
                embeddings,
                transformer.causal_attention_mask(input_mask),
                transformer.positions_from_mask(input_mask),
            )
            _, image_hidden_states = transformer.split_hidden_states(
                hidden_states, text_first_mask, ops.shape(token_ids)[1]
            )
            gmm_log_prob = transformer.image_head.log_prob(
                transformer.image_head(image_hidden_states), modelled_tokens
            )
            nll, _, _ = bits_per_dim(
                gmm_log_prob, factored_tokens, logdet, num_subpixels
            )
            return nll

        # Compiled once per call, reused for every draw.
        backend = keras.config.backend()
        function = nll_image
        context = contextlib.nullcontext()
        if backend == "torch":
            import torch

            context = torch.no_grad()
        elif backend == "tensorflow" and not self.run_eagerly:
            function = tf.function(nll_image)
        elif backend == "jax" and not self.run_eagerly:
            function = self._jax_generate_function(nll_image)

        rng = np.random.default_rng(seed)
        total = np.zeros((batch_size,), "float64")
        with context:
            for _ in range(num_samples):
                noise = rng.uniform(0.0, 1.0 / PIXEL_HALF_RANGE, images.shape)
                nll = function(
                    images, token_ids, padding_mask, noise.astype("float32")
                )
                total += ops.convert_to_numpy(nll)
        return (total / num_samples).astype("float32")

    # --- Serialization ---------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(self.training_config)
        return config
