"""The JetFormer backbone: a Jet flow and a decoder-only transformer.

Dimension legend: B batch, H, W, C image height, width and channels, p patch
size, N = (H / p) * (W / p) image tokens, D = p * p * C values per flow
token, d modelled dims per image token, T text length, E width, L sequence
length, V text classes, K mixture components.
"""

import contextlib

import keras
from keras import ops

from keras_hub.models import Backbone

from keras_jetformer.layers.jet_flow import JetFlow
from keras_jetformer.layers.jetformer_transformer import JetFormerTransformer
from keras_jetformer.layers.patching import grid_to_tokens
from keras_jetformer.layers.patching import patchify
from keras_jetformer.layers.patching import tokens_to_grid
from keras_jetformer.layers.patching import unpatchify
from keras_jetformer.models.input_checks import check_image_tensor
from keras_jetformer.models.input_checks import check_token_tensor


@contextlib.contextmanager
def preset_weights_errors(preset):
    """Turn an unreadable weights file into a `ValueError` naming the preset.

    h5py raises `OSError` for truncated or corrupted files.
    """
    try:
        yield
    except OSError as error:
        raise ValueError(
            f"The weights of preset {preset!r} could not be read: {error}. "
            "The file is corrupted or incomplete; save or download the "
            f"preset again. Received: preset={preset!r}"
        ) from error


def _require_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerBackbone(Backbone):
    """JetFormer: a normalizing flow and an autoregressive transformer.

    Images are cut into `patch_size` patches and mapped through a Jet flow
    (`JetFlow`) to soft tokens of `D = patch_size**2 * C` values. The first
    `image_token_dim` values of every token are modelled by the transformer
    with a Gaussian mixture; the other values are "factored out" under a
    standard normal prior. Text tokens are modelled with a categorical head.
    Each example is laid out text first (image generation) or image first
    (image understanding), chosen by `text_first_mask`.

    The transformer is Gemma-style: RMSNorm pre-norms, multi-query attention
    with rotary positions counted over valid tokens, and a gated-GELU MLP.

    Calling the backbone runs the flow on `images` as given (the training
    noise is added by `JetFormerTextToImage`) and returns a dict with
    `"image_tokens"` (the flow output `[B, N, D]`), `"logdet"` (`[B]`,
    nats), `"hidden_states"` (final-norm outputs `[B, L, E]`), `"text_logits"`
    (`[B, T, V]`) and `"image_logits"` (mixture head outputs `[B, N,
    K * (1 + 2d)]`).

    Args:
        image_shape: tuple of three ints. `(height, width, channels)`.
        patch_size: int. Size of the square patches that become tokens.
        image_token_dim: int. Number of values `d` of each image token that
            the transformer models; the rest are factored out.
        vocabulary_size: int. Number of text ids, including the BOS, BOI and
            NOLABEL ids.
        num_layers: int. Number of transformer decoder blocks.
        hidden_dim: int. Transformer width.
        intermediate_dim: int. Transformer MLP width.
        num_query_heads: int. Attention query heads.
        num_key_value_heads: int. Attention key/value heads (1 for
            multi-query attention).
        head_dim: int. Size of each attention head.
        num_mixtures: int. Components of the image Gaussian mixture.
        flow_num_couplings: int. Coupling layers in the flow.
        flow_hidden_dim: int. Width of the coupling ViTs.
        flow_num_layers: int. ViT blocks per coupling.
        flow_num_heads: int. Attention heads of the coupling ViTs.
        flow_intermediate_dim: int. MLP width of the coupling ViTs. Defaults
            to `4 * flow_hidden_dim`.
        flow_coupling_kinds: sequence of strings. Kinds cycled over the
            couplings, `"channels"` and/or `"spatial"`. Defaults to
            `("channels",)`.
        flow_spatial_patterns: sequence of strings. Patterns cycled over the
            spatial couplings. Defaults to
            `("checkerboard", "checkerboard-inv")`.
        flow_patch_size: int. The flow's own patch size on the token grid.
            Defaults to `1`.
        bos_id: int. Id of the beginning-of-sentence token. Defaults to
            `vocabulary_size - 3`.
        boi_id: int. Id of the beginning-of-image token. Defaults to
            `vocabulary_size - 2`.
        nolabel_id: int. Id that replaces a dropped text prefix
            (classifier-free guidance). Defaults to `vocabulary_size - 1`.
            NOTE: a preset's config stores all three ids, so
            `from_preset(..., vocabulary_size=N)` keeps the old ids; pass
            `bos_id`, `boi_id` and `nolabel_id` as well when changing the
            vocabulary size.
        num_vocab_repeats: int. The text is embedded this many times with
            separate tables and concatenated, which gives a one-token class
            label more weight. Defaults to `1`.
        tie_text_embeddings: bool. Whether the text logits reuse the text
            embedding table. Defaults to `True`.
        scale_tol: float. Lower bound of the mixture standard deviations.
            Defaults to `1e-6`.
        layer_norm_epsilon: float. Defaults to `1e-6`.
        dropout: float. Dropout rate of the transformer. Defaults to `0.0`.
        flow_dropout: float. Dropout rate of the coupling ViTs. Defaults to
            `0.0`.
        rope_max_wavelength: float. Defaults to `10000`.
        seed: int. Seed of the flow's random channel permutations. Defaults
            to `None`.
        remat: bool. Rematerialization: recompute the activations of every
            flow coupling and transformer block in the backward pass
            (`keras_jetformer.layers.rematerialized_call`) instead of
            storing them, which lowers the peak memory of training at the
            cost of about one more forward pass.
            Requires `dropout=0` and `flow_dropout=0`. Defaults to `False`.
        dtype: string or `keras.mixed_precision.DTypePolicy`. Dtype policy of
            the model's computations and weights.

    Example:

    ```python
    import numpy as np

    backbone = keras_jetformer.models.JetFormerBackbone(
        image_shape=(16, 16, 1),
        patch_size=4,
        image_token_dim=4,
        vocabulary_size=32,
        num_layers=2,
        hidden_dim=32,
        intermediate_dim=64,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_mixtures=3,
        flow_num_couplings=2,
        flow_hidden_dim=16,
        flow_num_layers=1,
        flow_num_heads=2,
    )
    outputs = backbone(
        {
            "images": np.zeros((2, 16, 16, 1), "float32"),
            "token_ids": np.ones((2, 5), "int32"),
            "padding_mask": np.ones((2, 5), "bool"),
            "text_first_mask": np.array([True, False]),
        }
    )
    outputs["image_logits"].shape  # (2, 16, 27)
    ```
    """

    def __init__(
        self,
        image_shape,
        patch_size,
        image_token_dim,
        vocabulary_size,
        num_layers,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        num_mixtures,
        flow_num_couplings,
        flow_hidden_dim,
        flow_num_layers,
        flow_num_heads,
        flow_intermediate_dim=None,
        flow_coupling_kinds=("channels",),
        flow_spatial_patterns=("checkerboard", "checkerboard-inv"),
        flow_patch_size=1,
        bos_id=None,
        boi_id=None,
        nolabel_id=None,
        num_vocab_repeats=1,
        tie_text_embeddings=True,
        scale_tol=1e-6,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        flow_dropout=0.0,
        rope_max_wavelength=10000,
        seed=None,
        remat=False,
        dtype=None,
        **kwargs,
    ):
        # === Argument checks ===
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(
                "`image_shape` must be `(height, width, channels)`. "
                f"Received: image_shape={image_shape}"
            )
        for name, value in (
            ("patch_size", patch_size),
            ("image_token_dim", image_token_dim),
            ("vocabulary_size", vocabulary_size),
            ("num_layers", num_layers),
            ("hidden_dim", hidden_dim),
            ("intermediate_dim", intermediate_dim),
            ("num_query_heads", num_query_heads),
            ("num_key_value_heads", num_key_value_heads),
            ("head_dim", head_dim),
            ("num_mixtures", num_mixtures),
            ("num_vocab_repeats", num_vocab_repeats),
        ):
            _require_positive_int(name, value)
        height, width, channels = image_shape
        if height % patch_size or width % patch_size:
            raise ValueError(
                "The image height and width must be divisible by "
                f"`patch_size`. Received: image_shape={image_shape}, "
                f"patch_size={patch_size}"
            )
        token_dim = patch_size * patch_size * channels
        # The model factors out at least one dim per token to the N(0, 1)
        # prior.
        if image_token_dim >= token_dim:
            raise ValueError(
                "`image_token_dim` must be smaller than the token dimension "
                f"`patch_size**2 * channels` = {token_dim}. "
                f"Received: image_token_dim={image_token_dim}"
            )
        bos_id = vocabulary_size - 3 if bos_id is None else bos_id
        boi_id = vocabulary_size - 2 if boi_id is None else boi_id
        nolabel_id = vocabulary_size - 1 if nolabel_id is None else nolabel_id
        for name, value in (
            ("bos_id", bos_id),
            ("boi_id", boi_id),
            ("nolabel_id", nolabel_id),
        ):
            if not 0 <= value < vocabulary_size:
                raise ValueError(
                    f"`{name}` must be a text id in [0, vocabulary_size="
                    f"{vocabulary_size}). Received: {name}={value}"
                )
        if remat and (dropout or flow_dropout):
            # The recomputation would draw new dropout masks, so the
            # gradients would not match the forward pass.
            raise ValueError(
                "`remat=True` requires `dropout=0` and `flow_dropout=0`. "
                f"Received: dropout={dropout}, flow_dropout={flow_dropout}"
            )
        if not tie_text_embeddings and num_vocab_repeats != 1:
            raise ValueError(
                "Untied text logits support one vocabulary repeat only. "
                f"Received: num_vocab_repeats={num_vocab_repeats}"
            )

        # === Layers ===
        self.flow = JetFlow(
            num_couplings=flow_num_couplings,
            coupling_kinds=flow_coupling_kinds,
            spatial_patterns=flow_spatial_patterns,
            patch_size=flow_patch_size,
            hidden_dim=flow_hidden_dim,
            num_layers=flow_num_layers,
            num_heads=flow_num_heads,
            intermediate_dim=flow_intermediate_dim,
            layer_norm_epsilon=layer_norm_epsilon,
            dropout=flow_dropout,
            seed=seed,
            remat=remat,
            dtype=dtype,
            name="flow",
        )
        grid_shape = (height // patch_size, width // patch_size)
        self.transformer = JetFormerTransformer(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            image_token_dim=image_token_dim,
            num_image_tokens=grid_shape[0] * grid_shape[1],
            num_mixtures=num_mixtures,
            bos_id=bos_id,
            boi_id=boi_id,
            nolabel_id=nolabel_id,
            num_vocab_repeats=num_vocab_repeats,
            tie_text_embeddings=tie_text_embeddings,
            scale_tol=scale_tol,
            layer_norm_epsilon=layer_norm_epsilon,
            dropout=dropout,
            rope_max_wavelength=rope_max_wavelength,
            remat=remat,
            dtype=dtype,
            name="transformer",
        )
        self.token_embedding = self.transformer.token_embedding

        # === Config needed by the step methods below ===
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.image_token_dim = image_token_dim
        self.grid_shape = grid_shape
        self.num_image_tokens = grid_shape[0] * grid_shape[1]
        self.token_dim = token_dim

        # === Functional model ===
        image_input = keras.Input(shape=image_shape, name="images")
        token_id_input = keras.Input(
            shape=(None,), dtype="int32", name="token_ids"
        )
        padding_mask_input = keras.Input(
            shape=(None,), dtype="bool", name="padding_mask"
        )
        text_first_input = keras.Input(
            shape=(), dtype="bool", name="text_first_mask"
        )
        image_tokens, logdet = self.encode_images(image_input)
        modelled_tokens, _ = self.split_image_tokens(image_tokens)
        transformer_outputs = self.transformer(
            {
                "token_ids": token_id_input,
                "padding_mask": padding_mask_input,
                "image_tokens": modelled_tokens,
                "text_first_mask": text_first_input,
            }
        )
        super().__init__(
            inputs={
                "images": image_input,
                "token_ids": token_id_input,
                "padding_mask": padding_mask_input,
                "text_first_mask": text_first_input,
            },
            outputs={
                "image_tokens": image_tokens,
                "logdet": logdet,
                **transformer_outputs,
            },
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.num_mixtures = num_mixtures
        self.flow_num_couplings = flow_num_couplings
        self.flow_hidden_dim = flow_hidden_dim
        self.flow_num_layers = flow_num_layers
        self.flow_num_heads = flow_num_heads
        self.flow_intermediate_dim = flow_intermediate_dim
        self.flow_coupling_kinds = tuple(self.flow.coupling_kinds)
        self.flow_spatial_patterns = tuple(self.flow.spatial_patterns)
        self.flow_patch_size = flow_patch_size
        self.bos_id = bos_id
        self.boi_id = boi_id
        self.nolabel_id = nolabel_id
        self.num_vocab_repeats = num_vocab_repeats
        self.tie_text_embeddings = tie_text_embeddings
        self.scale_tol = scale_tol
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.flow_dropout = flow_dropout
        self.rope_max_wavelength = rope_max_wavelength
        self.seed = seed
        self.remat = remat

    # --- Images <-> soft tokens --------------------------------------------

    def encode_images(self, images, training=None):
        """Map images `[B, H, W, C]` to flow tokens `[B, N, D]` and logdet.

        `images` are floats in `[-1, 1]`; the log-determinant `[B]` is in
        nats for that scale.
        """
        check_image_tensor(images, self.image_shape)
        grid = patchify(images, self.patch_size)
        grid, logdet = self.flow(grid, training=training)
        return grid_to_tokens(grid), logdet

    def decode_images(self, image_tokens):
        """Run the flow backwards: tokens `[B, N, D]` to images `[B, H, W, C]`.

        The images are not clipped.
        """
        check_token_tensor(
            image_tokens, (self.num_image_tokens, self.token_dim)
        )
        grid = tokens_to_grid(image_tokens, *self.grid_shape)
        grid, _ = self.flow.inverse_and_log_det(grid)
        return unpatchify(grid, self.patch_size)

    def split_image_tokens(self, image_tokens):
        """Split `[B, N, D]` into modelled `[B, N, d]` and factored dims."""
        d = self.image_token_dim
        return image_tokens[..., :d], image_tokens[..., d:]

    # --- Distribution ------------------------------------------------------

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """Return a `keras.distribution.LayoutMap` that shards the weights.

        Every large kernel and embedding of the transformer and of the flow
        is split along one axis over the model axis of `device_mesh`, and
        replicated over the data axis. The optimizer's moments take the
        layout of their variable, so weights and optimizer state are both
        sharded, as in FSDP. Norm scales, biases and the frozen coupling
        permutations are small and stay replicated. The split axis is the
        model width, the MLP width or the coupling ViT width, and each must
        be divisible by the size of the model axis. For the preset sizes
        this holds for model axes of 1, 2, 4, ... up to 512 devices.

        Args:
            device_mesh: `keras.distribution.DeviceMesh`. The mesh to shard
                over.
            model_parallel_dim_name: string. Mesh axis that the weights are
                split over. Defaults to `"model"`.
            data_parallel_dim_name: string. Mesh axis that the batch is split
                over. Defaults to `"batch"`.

        Returns:
            `keras.distribution.LayoutMap`, for
            `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=
            data_parallel_dim_name)`.

        Example:

        ```python
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            shape=(2, len(devices) // 2),
            axis_names=("batch", "model"),
            devices=devices,
        )
        layout_map = JetFormerBackbone.get_layout_map(mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        with distribution.scope():
            backbone = JetFormerBackbone.from_preset(
                "jetformer_350m_imagenet_256", load_weights=False
            )
        ```
        """
        if not isinstance(device_mesh, keras.distribution.DeviceMesh):
            raise ValueError(
                "`device_mesh` must be a `keras.distribution.DeviceMesh`. "
                f"Received: device_mesh={device_mesh!r}"
            )
        for name, value in (
            ("model_parallel_dim_name", model_parallel_dim_name),
            ("data_parallel_dim_name", data_parallel_dim_name),
        ):
            if value not in device_mesh.axis_names:
                raise ValueError(
                    f"`{name}` must be an axis of `device_mesh`, whose axes "
                    f"are {list(device_mesh.axis_names)}. "
                    f"Received: {name}={value!r}"
                )
        model = model_parallel_dim_name
        # Weight paths: see `backbone.weights`. Patterns must match whole
        # paths, and each path may match at most one pattern.
        decoder = r"(.*/)?transformer/decoder_block_\d+"
        vit = r"(.*/)?flow/coupling_\d+/transformer_layer_\d+"
        coupling = r"(.*/)?flow/coupling_\d+"
        layout_map = keras.distribution.LayoutMap(device_mesh)

        # Transformer: split the model width E, or the MLP width for the
        # MLP's output kernel. Embeddings are `[V, E]` and `[E, V]`, with V
        # the text classes, which is seldom divisible by the model axis.
        transformer = r"(.*/)?transformer"
        layout_map[f"{transformer}/token_embedding/embeddings"] = (None, model)
        layout_map[f"{transformer}/token_embedding/reverse_embeddings"] = (
            model,
            None,
        )
        # Query `[heads, E, head_dim]`; key and value `[kv_heads, E,
        # head_dim]` with a single key/value head in the presets.
        layout_map[f"{decoder}/attention/(query|key|value)/kernel"] = (
            None,
            model,
            None,
        )
        layout_map[f"{decoder}/attention/attention_output/kernel"] = (
            None,
            None,
            model,
        )
        layout_map[f"{decoder}/(ffw_gating|ffw_up)/kernel"] = (None, model)
        layout_map[f"{decoder}/ffw_down/kernel"] = (model, None)
        # Mixture head `[E, K * (1 + 2d)]`.
        layout_map[f"{transformer}/image_head/kernel"] = (model, None)

        # Flow couplings: split the coupling ViT width.
        layout_map[f"{coupling}/position_embedding"] = (None, None, model)
        layout_map[f"{coupling}/input_projection/kernel"] = (None, model)
        layout_map[f"{coupling}/output_projection/kernel"] = (model, None)
        layout_map[
            f"{vit}/self_attention_layer/(query|key|value)/kernel"
        ] = (model, None, None)
        layout_map[f"{vit}/self_attention_layer/attention_output/kernel"] = (
            None,
            None,
            model,
        )
        layout_map[f"{vit}/feedforward_intermediate_dense/kernel"] = (
            None,
            model,
        )
        layout_map[f"{vit}/feedforward_output_dense/kernel"] = (model, None)
        # The frozen split-and-merge permutations are read whole by every
        # device.
        layout_map[f"{coupling}/permutation"] = (None,)
        return layout_map

    # --- Presets -----------------------------------------------------------

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Instantiate a `JetFormerBackbone` from a preset.

        Works as `keras_hub.models.Backbone.from_preset`, with clearer
        errors: an unknown preset name raises a `ValueError` that lists the
        built-in JetFormer presets, and `load_weights=True` on an
        architecture preset, which ships without weights, raises a
        `ValueError` that asks for `load_weights=False`. Keyword arguments
        replace entries of the preset's config, e.g. `dtype="bfloat16"` or
        `num_layers=2`.

        Args:
            preset: string. A built-in preset name (see
                `JetFormerBackbone.presets`), a Kaggle or Hugging Face handle,
                or the path of a preset directory.
            load_weights: bool. Load the preset's weights; with `False` the
                weights are randomly initialised. Defaults to `True`.

        Example:

        ```python
        backbone = keras_jetformer.models.JetFormerBackbone.from_preset(
            "jetformer_350m_imagenet_256",
            load_weights=False,
            num_layers=1,
            flow_num_couplings=1,
            num_mixtures=4,
        )
        ```
        """
        # Imported here because `jetformer_presets` imports this module.
        from keras_jetformer.models.jetformer_presets import check_preset

        check_preset(preset, load_weights)
        with preset_weights_errors(preset):
            return super().from_preset(
                preset, load_weights=load_weights, **kwargs
            )

    def save_to_preset(self, preset_dir, max_shard_size=10, overwrite=False):
        """Save the backbone to a preset directory.

        Args:
            preset_dir: string. The local preset directory.
            max_shard_size: int or float. Maximum size in GB of each weights
                file; `None` writes one file. Defaults to `10`.
            overwrite: bool. Write into `preset_dir` even if it contains
                files other than an earlier preset. Defaults to `False`, which
                raises a `ValueError` for such a directory.
        """
        from keras_jetformer.models.jetformer_presets import (
            check_save_directory,
        )

        check_save_directory(preset_dir, overwrite)
        super().save_to_preset(preset_dir, max_shard_size=max_shard_size)

    # --- Serialization -----------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": self.image_shape,
                "patch_size": self.patch_size,
                "image_token_dim": self.image_token_dim,
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "num_mixtures": self.num_mixtures,
                "flow_num_couplings": self.flow_num_couplings,
                "flow_hidden_dim": self.flow_hidden_dim,
                "flow_num_layers": self.flow_num_layers,
                "flow_num_heads": self.flow_num_heads,
                "flow_intermediate_dim": self.flow_intermediate_dim,
                "flow_coupling_kinds": self.flow_coupling_kinds,
                "flow_spatial_patterns": self.flow_spatial_patterns,
                "flow_patch_size": self.flow_patch_size,
                "bos_id": self.bos_id,
                "boi_id": self.boi_id,
                "nolabel_id": self.nolabel_id,
                "num_vocab_repeats": self.num_vocab_repeats,
                "tie_text_embeddings": self.tie_text_embeddings,
                "scale_tol": self.scale_tol,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "flow_dropout": self.flow_dropout,
                "rope_max_wavelength": self.rope_max_wavelength,
                "seed": self.seed,
                "remat": self.remat,
            }
        )
        return config
