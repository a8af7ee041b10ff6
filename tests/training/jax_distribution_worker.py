"""Compare JetFormer training under JAX distributions with one device.

Run as a script in a fresh process with 8 virtual CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python tests/training/jax_distribution_worker.py OUTPUT.json

`test_jax_distribution.py` starts it and checks the JSON it writes. The
flag must be set before JAX starts, hence the separate process. Each
distribution gets its own task with the same initial weights; the
distributions are the single-device run, `DataParallel` over 8 devices and
`ModelParallel` on a `(batch=2, model=4)` mesh with
`JetFormerBackbone.get_layout_map`.
"""

import contextlib
import json
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jetformer_test_utils import tiny_batch  # noqa: E402

from keras_jetformer.models import JetFormerBackbone  # noqa: E402
from keras_jetformer.models import JetFormerTextToImage  # noqa: E402
from keras_jetformer.training.objective import draw_training_noise  # noqa: E402

BATCH_SIZE = 8
FIT_STEPS = 2
# Widths divisible by the model axis of 4.
CONFIG = {
    "image_shape": (8, 8, 1),
    "patch_size": 2,
    "image_token_dim": 2,
    "vocabulary_size": 13,
    "num_layers": 2,
    "hidden_dim": 16,
    "intermediate_dim": 32,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_mixtures": 3,
    "flow_num_couplings": 2,
    "flow_hidden_dim": 8,
    "flow_num_layers": 1,
    "flow_num_heads": 2,
    "seed": 1,
}


def make_distributions():
    devices = keras.distribution.list_devices()
    data_parallel = keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4), axis_names=("batch", "model"), devices=devices
    )
    model_parallel = keras.distribution.ModelParallel(
        layout_map=JetFormerBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )
    return {
        "single": None,
        "data_parallel": data_parallel,
        "model_parallel": model_parallel,
    }


def build_task(initial_weights):
    """A task whose `fit` draws no training noise.

    The random order and the dequantization noise remain, drawn from the
    task's seed generator.
    """
    backbone = JetFormerBackbone(**CONFIG)
    task = JetFormerTextToImage(
        backbone,
        training_steps=10,
        text_prefix_prob=0.5,
        noise_scale=0.0,
        noise_min=0.0,
        input_noise_std=0.0,
        label_drop_rate=0.0,
        seed=3,
    )
    if initial_weights is not None:
        task.set_weights(initial_weights)
    # SGD with momentum: unlike Adam, its update is linear in the gradient,
    # so float32 rounding differences stay small in the weights. Its
    # momentum variables show how optimizer state is sharded.
    task.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return task


def fixed_draws(task, seed):
    """Training draws made once on one device, then passed explicitly."""
    backbone = task.backbone
    generator = keras.random.SeedGenerator(seed)
    draws = draw_training_noise(
        generator,
        images_shape=(BATCH_SIZE, *CONFIG["image_shape"]),
        num_image_tokens=backbone.num_image_tokens,
        image_token_dim=backbone.image_token_dim,
        text_prefix_prob=0.5,
        input_noise_std=0.3,
        label_drop_rate=0.1,
        training=True,
    )
    return {name: np.asarray(value) for name, value in draws.items()}


def loss_and_gradients(task, batch, draws):
    """Loss and gradients at step 2 with explicit draws, one jitted call."""
    import jax

    variables = task.trainable_variables
    non_trainable = task.non_trainable_variables

    def loss_fn(values, non_trainable_values, batch, draws):
        mapping = [
            *zip(variables, values),
            *zip(non_trainable, non_trainable_values),
        ]
        with keras.StatelessScope(state_mapping=mapping):
            loss, _ = task.compute_objective(
                batch, step=2, training=True, draws=draws
            )
        return loss

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(
        [v.value for v in variables],
        [v.value for v in non_trainable],
        batch,
        draws,
    )
    return float(loss), [np.asarray(g) for g in grads]


def shard_specs(task):
    """Mesh axes of each model variable's sharding, by path."""
    specs = {}
    for variable in task.trainable_variables + task.non_trainable_variables:
        sharding = variable.value.sharding
        spec = getattr(sharding, "spec", None)
        specs[variable.path] = {
            "spec": [None if s is None else str(s) for s in (spec or ())],
            "shard_shape": list(sharding.shard_shape(variable.shape)),
            "shape": list(variable.shape),
        }
    return specs


def optimizer_shard_fraction(task):
    """Share of optimizer-moment values held per device."""
    total = 0
    per_device = 0
    for variable in task.optimizer.variables:
        if len(variable.shape) == 0:
            continue
        size = int(np.prod(variable.shape))
        shard = int(np.prod(variable.value.sharding.shard_shape(variable.shape)))
        total += size
        per_device += shard
    return per_device / total


def seed_noise_rows(task, batch):
    """The RGB noise drawn inside a jitted step, per row of the batch.

    Draws come from the task's seed generator, as in `fit`, under the
    active distribution; returns `[B, H * W * C]` numpy noise.
    """
    import jax

    state = task.seed_generator.state

    def draw(seed_value, images):
        with keras.StatelessScope(state_mapping=[(state, seed_value)]):
            draws = draw_training_noise(
                task.seed_generator,
                images_shape=tuple(images.shape),
                num_image_tokens=task.backbone.num_image_tokens,
                image_token_dim=task.backbone.image_token_dim,
                text_prefix_prob=0.5,
                input_noise_std=0.3,
                label_drop_rate=0.1,
                training=True,
            )
        return draws["rgb_noise"]

    noise = jax.jit(draw)(state.value, batch["images"])
    return np.asarray(noise).reshape(BATCH_SIZE, -1), str(noise.sharding)


def fit_losses(task, batch):
    dataset = [
        {name: value for name, value in batch.items()}
        for _ in range(FIT_STEPS)
    ]
    history = task.fit(
        _as_generator(dataset), steps_per_epoch=FIT_STEPS, epochs=1, verbose=0
    )
    weights = [np.asarray(v.value) for v in task.trainable_variables]
    return history.history, weights


def _as_generator(batches):
    def generator():
        for batch in batches:
            yield batch

    import tensorflow as tf

    spec = {
        name: tf.TensorSpec(value.shape, tf.as_dtype(value.dtype))
        for name, value in batches[0].items()
    }
    return tf.data.Dataset.from_generator(generator, output_signature=spec)


def main(output_path):
    import jax

    results = {"num_devices": len(jax.devices())}
    batch = tiny_batch(BATCH_SIZE, seed=0, config=CONFIG)
    # Identical images in every row: only the noise distinguishes the rows.
    same_images = np.repeat(batch["images"][:1], BATCH_SIZE, axis=0)
    same_batch = {**batch, "images": same_images}

    reference = build_task(None)
    initial_weights = reference.get_weights()
    draws = fixed_draws(reference, seed=5)

    for name, distribution in make_distributions().items():
        entry = {}
        scope = (
            distribution.scope()
            if distribution is not None
            else contextlib.nullcontext()
        )
        with scope:
            task = build_task(initial_weights)
            loss, grads = loss_and_gradients(task, batch, draws)
            entry["loss"] = loss
            entry["gradients"] = [g.tolist() for g in grads]
            entry["shardings"] = shard_specs(task)
            noise, noise_sharding = seed_noise_rows(task, same_batch)
            entry["noise_rows"] = noise.tolist()
            entry["noise_sharding"] = noise_sharding
            history, weights = fit_losses(task, batch)
            entry["fit_history"] = history
            entry["fit_weights"] = [w.tolist() for w in weights]
            entry["optimizer_shard_fraction"] = optimizer_shard_fraction(task)
        results[name] = entry

    with open(output_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(sys.argv[1])
