"""The training recipe shared by the JetFormer tasks."""

import keras
from keras import ops

from keras_jetformer.models.input_checks import check_image_tensor
from keras_jetformer.models.input_checks import check_model_images
from keras_jetformer.models.input_checks import concrete_array
from keras_jetformer.models.jetformer_backbone import preset_weights_errors
from keras_jetformer.models.jetformer_presets import check_preset
from keras_jetformer.models.jetformer_presets import check_save_directory
from keras_jetformer.training.callbacks import NonFiniteLossGuard
from keras_jetformer.training.objective import draw_training_noise
from keras_jetformer.training.objective import jetformer_objective
from keras_jetformer.training.objective import noise_curriculum
from keras_jetformer.training.optimizer import exclude_from_weight_decay
from keras_jetformer.training.optimizer import jetformer_optimizer
from keras_jetformer.training.train_step import ObjectiveTrainer
from keras_jetformer.training.train_step import replica_seed_generator

TRAINING_CONFIG_DEFAULTS = {
    "training_steps": None,
    "text_prefix_prob": 1.0,
    "noise_scale": 64.0,
    "noise_min": 0.0,
    "input_noise_std": 0.3,
    "label_drop_rate": 0.1,
    "text_loss_weight": 1.0,
    "loss_on_prefix": False,
    "rgb_noise_on_image_prefix": True,
    "stop_flow_gradient_on_prefix": True,
    "seed": None,
}

# The per-example selection each tracked metric averages over.
METRIC_ROWS = {
    "nll_image": "image_rows",
    "logdet": "logdet_rows",
    "nll_text": "text_rows",
}

TRAINING_ARGS_DOC = """
        training_steps: int. Optimizer steps of the planned training run: the
            length of the RGB noise curriculum and of the default
            learning-rate schedule. `None` skips the curriculum (the noise
            stays at `noise_min`) and keeps the learning rate constant.
            Defaults to `None`.
        text_prefix_prob: float. Probability that an example is laid out
            text first (trains generation) rather than image first (trains
            understanding). Defaults to `1.0`.
        noise_scale: float. RGB noise standard deviation at the start of the
            curriculum, in 8-bit pixel units. Defaults to `64.0`.
        noise_min: float. RGB noise standard deviation at the end of the
            curriculum. Defaults to `0.0`.
        input_noise_std: float. Upper bound of the per-example Gaussian noise
            added to the modelled image tokens of text-first examples.
            Defaults to `0.3`.
        label_drop_rate: float. Probability of replacing a text prefix by
            NOLABEL tokens, which trains classifier-free guidance. Defaults
            to `0.1`.
        text_loss_weight: float. Weight of the text NLL in the loss. Defaults
            to `1.0`.
        loss_on_prefix: bool. Also score the prefix modality. Defaults to
            `False`.
        rgb_noise_on_image_prefix: bool. Apply the RGB noise to image-first
            examples too. Defaults to `True`.
        stop_flow_gradient_on_prefix: bool. Stop the gradient into the flow
            on image-first examples. Defaults to `True`.
        seed: int. Seed of the training noise. Defaults to `None`."""


@keras.saving.register_keras_serializable(package="keras_jetformer")
class LastValue(keras.metrics.Metric):
    """Metric that reports the most recent value it was given."""

    def __init__(self, name="last_value", **kwargs):
        super().__init__(name=name, **kwargs)
        # Under `tf.distribute`, the replicas' copies would be summed on
        # read; all replicas hold the same value, so read the first.
        self.value = self.add_variable(
            shape=(),
            initializer="zeros",
            aggregation="only_first_replica",
            name="value",
        )

    def update_state(self, value):
        self.value.assign(ops.cast(value, self.dtype))

    def result(self):
        return ops.convert_to_tensor(self.value)


class JetFormerTrainingMixin(ObjectiveTrainer):
    """Training with the JetFormer objective for a JetFormer task.

    The host class calls `_configure_training(**config)` before and
    `_create_training_state()` after `keras.Model.__init__`, and exposes
    `training_config` through `get_config`. Each step draws fresh noise
    from the task's seed generator and evaluates the noise curriculum at the
    optimizer's iteration count, so both advance on every backend and are
    saved with the model and its optimizer.
    """

    def _configure_training(self, **config):
        """Validate and store the training arguments."""
        unknown = set(config) - set(TRAINING_CONFIG_DEFAULTS)
        if unknown:
            raise TypeError(f"Unknown training arguments: {sorted(unknown)}")
        config = {**TRAINING_CONFIG_DEFAULTS, **config}
        training_steps = config["training_steps"]
        if training_steps is not None and (
            isinstance(training_steps, bool)
            or not isinstance(training_steps, int)
            or training_steps < 1
        ):
            raise ValueError(
                "`training_steps` must be a positive integer or None. "
                f"Received: training_steps={training_steps!r}"
            )
        for name in ("text_prefix_prob", "label_drop_rate"):
            if not 0.0 <= config[name] <= 1.0:
                raise ValueError(
                    f"`{name}` must be in [0, 1]. Received: {name}={config[name]}"
                )
        for name in ("noise_scale", "noise_min", "input_noise_std"):
            if config[name] < 0:
                raise ValueError(
                    f"`{name}` must be non-negative. "
                    f"Received: {name}={config[name]}"
                )
        self.training_config = config

    def _create_training_state(self):
        """Create the seed generator and metric trackers of training."""
        config = self.training_config
        self.seed_generator = keras.random.SeedGenerator(
            config["seed"], name="training_seed_generator"
        )

        # Metrics that can have data under this recipe.
        names = ["loss"]
        if config["text_prefix_prob"] > 0 or config["loss_on_prefix"]:
            names += ["nll_image", "logdet"]
        if config["text_prefix_prob"] < 1 or config["loss_on_prefix"]:
            names += ["nll_text"]
        self.objective_trackers = {
            name: keras.metrics.Mean(name=name) for name in names
        }
        self.noise_scale_tracker = LastValue(name="noise_scale")

    @property
    def metrics(self):
        if not hasattr(self, "objective_trackers"):
            return []
        return [*self.objective_trackers.values(), self.noise_scale_tracker]

    def compile(
        self,
        optimizer="auto",
        loss=None,
        *,
        metrics=None,
        **kwargs,
    ):
        """Configure training; `optimizer="auto"` builds the reference's.

        The automatic optimizer is `training.jetformer_optimizer` over
        `training_steps`. Only kernels are weight-decayed, whichever
        optimizer is given. The loss is the JetFormer objective, so `loss`
        and `metrics` must be left unset.
        """
        if loss not in (None, "auto") or metrics not in (None, "auto"):
            raise ValueError(
                "JetFormer tasks train with their own objective and metrics; "
                "leave `loss` and `metrics` unset. "
                f"Received: loss={loss!r}, metrics={metrics!r}"
            )
        if optimizer == "auto":
            optimizer = jetformer_optimizer(
                total_steps=self.training_config["training_steps"]
            )
        optimizer = keras.optimizers.get(optimizer)
        if getattr(optimizer, "weight_decay", None):
            exclude_from_weight_decay(optimizer, self)
        keras.Model.compile(self, optimizer=optimizer, **kwargs)
        # Build the optimizer now rather than inside the first compiled step:
        # tensorflow traces a `tf.function` a second time when its first
        # trace created variables.
        if self.built and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        self.generate_function = None

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Instantiate the task from a preset, with clearer errors.

        Works as `keras_hub.models.Task.from_preset`; unknown preset names,
        directories without a JetFormer `config.json`, missing weights and
        unreadable weights files raise a `ValueError` that names the preset.
        """
        check_preset(preset, load_weights)
        with preset_weights_errors(preset):
            return super().from_preset(
                preset, load_weights=load_weights, **kwargs
            )

    def save_to_preset(self, preset_dir, max_shard_size=10, overwrite=False):
        """Save the task, its backbone and preprocessor to a preset directory.

        Args:
            preset_dir: string. The local preset directory.
            max_shard_size: int or float. Maximum size in GB of each weights
                file; `None` writes one file. Defaults to `10`.
            overwrite: bool. Write into `preset_dir` even if it contains
                files other than an earlier preset. Defaults to `False`, which
                raises a `ValueError` for such a directory.
        """
        check_save_directory(preset_dir, overwrite)
        super().save_to_preset(preset_dir, max_shard_size=max_shard_size)

    def _check_array_inputs(self, x):
        """Check the images of in-memory inputs before Keras casts them.

        Keras casts numpy inputs to the model's float32 inputs, so raw
        uint8 pixels given without a preprocessor would silently train
        as values in [0, 255]. Datasets are checked by the shape and dtype
        checks inside the step instead.
        """
        if self.preprocessor is not None or not isinstance(x, dict):
            return
        if "images" in x and concrete_array(x["images"]) is not None:
            check_model_images(x["images"], self.backbone.image_shape)

    def fit(self, x=None, *args, callbacks=None, **kwargs):
        """Train with `keras.Model.fit`, guarded against a non-finite loss.

        A `training.NonFiniteLossGuard` is appended to `callbacks` unless
        one is there already; pass your own to change how often it checks.
        """
        self._check_array_inputs(x)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, NonFiniteLossGuard) for c in callbacks):
            # Appended last, so that it reads the step count that
            # `BackupAndRestore` restored.
            callbacks.append(NonFiniteLossGuard())
        return super().fit(x, *args, callbacks=callbacks, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._check_array_inputs(x)
        return super().evaluate(x, *args, **kwargs)

    def _saved_seed_generators(self):
        generators = [self.seed_generator]
        if hasattr(self, "generation_seed_generator"):
            generators.append(self.generation_seed_generator)
        return generators

    def save_own_variables(self, store):
        """Save the task's variables and its seed generators' states.

        Keras does not save `SeedGenerator` states; saving them lets a
        resumed run draw the same noise as an uninterrupted one.
        """
        super().save_own_variables(store)
        offset = len(self._trainable_variables) + len(
            self._non_trainable_variables
        )
        for index, generator in enumerate(self._saved_seed_generators()):
            store[f"{offset + index}"] = generator.state

    def load_own_variables(self, store):
        own = len(self._trainable_variables) + len(self._non_trainable_variables)
        generators = self._saved_seed_generators()
        if len(store.keys()) != own + len(generators):
            # A file saved without seed states.
            return super().load_own_variables(store)
        for index, generator in enumerate(generators):
            generator.state.assign(store[f"{own + index}"])
        super().load_own_variables({f"{i}": store[f"{i}"] for i in range(own)})

    def compile_from_config(self, config):
        """Recompile a loaded task and build its optimizer.

        The optimizer must exist before its saved variables (moments,
        iteration count) can be restored, which keeps the noise curriculum
        and the learning rate where training stopped.
        """
        config = keras.saving.deserialize_keras_object(config)
        for name in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            config.pop(name, None)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def current_noise_scale(self, step):
        """RGB noise std (8-bit pixel units) at optimizer step `step`."""
        config = self.training_config
        return noise_curriculum(
            step,
            config["training_steps"],
            config["noise_scale"],
            config["noise_min"],
        )

    def compute_objective(self, x, step, training, draws=None):
        """Evaluate the JetFormer objective on a preprocessed batch.

        Training mode draws all noise from `self.seed_generator` unless
        `draws` is given; evaluation keeps only the random order and the
        dequantization noise.
        """
        config = self.training_config
        backbone = self.backbone
        images = ops.convert_to_tensor(x["images"])
        # Shapes and dtypes are static, so this costs nothing per step.
        check_image_tensor(images, backbone.image_shape)
        if draws is None:
            draws = draw_training_noise(
                replica_seed_generator(self.seed_generator),
                images_shape=tuple(ops.shape(images)),
                num_image_tokens=backbone.num_image_tokens,
                image_token_dim=backbone.image_token_dim,
                text_prefix_prob=config["text_prefix_prob"],
                input_noise_std=config["input_noise_std"],
                label_drop_rate=config["label_drop_rate"],
                training=training,
            )
        noise_scale = self.current_noise_scale(step) if training else None
        loss, metrics = jetformer_objective(
            backbone,
            x,
            draws,
            noise_scale=noise_scale,
            text_loss_weight=config["text_loss_weight"],
            loss_on_prefix=config["loss_on_prefix"],
            rgb_noise_on_image_prefix=config["rgb_noise_on_image_prefix"],
            stop_flow_gradient_on_prefix=config["stop_flow_gradient_on_prefix"],
            training=training,
        )
        metrics["noise_scale"] = noise_scale
        return loss, metrics

    def update_objective_metrics(self, loss, metrics):
        logs = {}
        for name, tracker in self.objective_trackers.items():
            if name == "loss":
                tracker.update_state(loss)
            else:
                rows = metrics[METRIC_ROWS[name]]
                tracker.update_state(
                    metrics[f"per_example_{name}"],
                    sample_weight=ops.cast(rows, "float32"),
                )
            logs[name] = tracker.result()
        if metrics.get("noise_scale") is not None:
            self.noise_scale_tracker.update_state(metrics["noise_scale"])
            logs["noise_scale"] = self.noise_scale_tracker.result()
        return logs
