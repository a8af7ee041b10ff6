"""Compare JetFormer training under `tf.distribute.MirroredStrategy` with
one device.

Run as a script in a fresh process (the logical CPU devices must be set up
before TensorFlow starts):

    KERAS_BACKEND=tensorflow python tests/training/tf_distribution_worker.py \
        OUTPUT.json

`test_tf_distribution.py` starts it and checks the JSON it writes.
"""

import json
import os
import sys

import tensorflow as tf

# Two logical CPU devices for the two replicas.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jetformer_test_utils import tiny_backbone  # noqa: E402
from jetformer_test_utils import tiny_batch  # noqa: E402

from keras_jetformer.models import JetFormerTextToImage  # noqa: E402
from keras_jetformer.training.objective import draw_training_noise  # noqa: E402
from keras_jetformer.training.train_step import replica_seed_generator  # noqa: E402

GLOBAL_BATCH_SIZE = 8
FIT_STEPS = 3
TRAINING_STEPS = 10


class NoiselessTextToImage(JetFormerTextToImage):
    """A task whose training draws nothing at random.

    The order is fixed by the data (text first for even first token ids)
    and the dequantization noise is zero, so any two runs see the same
    inputs however the batch is split.
    """

    def compute_objective(self, x, step, training, draws=None):
        images = ops.convert_to_tensor(x["images"])
        token_ids = ops.convert_to_tensor(x["token_ids"])
        draws = {
            "text_first_mask": ops.equal(token_ids[:, 0] % 2, 0),
            "dequantization_noise": ops.zeros_like(images),
        }
        return super().compute_objective(x, step, training, draws=draws)


def build_task(initial_weights, noiseless):
    task_class = NoiselessTextToImage if noiseless else JetFormerTextToImage
    task = task_class(
        tiny_backbone(),
        training_steps=TRAINING_STEPS,
        text_prefix_prob=0.5,
        seed=3,
    )
    task.set_weights(initial_weights)
    # SGD with momentum: unlike Adam, its update is linear in the gradient,
    # so float32 rounding differences stay small in the weights.
    task.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return task


def fit(task, batches):
    dataset = tf.data.Dataset.from_tensor_slices(batches)
    history = task.fit(dataset, epochs=1, verbose=0)
    return {
        "history": history.history,
        "iterations": int(task.optimizer.iterations.numpy()),
        "weights": [np.asarray(w).tolist() for w in task.get_weights()],
    }


def replica_noise(strategy, task, use_replica_seeds):
    """RGB noise drawn by each replica for identical images."""
    backbone = task.backbone
    generator = task.seed_generator
    local_batch = GLOBAL_BATCH_SIZE // strategy.num_replicas_in_sync

    def draw():
        seed_generator = generator
        if use_replica_seeds:
            seed_generator = replica_seed_generator(generator)
        draws = draw_training_noise(
            seed_generator,
            images_shape=(local_batch, *backbone.image_shape),
            num_image_tokens=backbone.num_image_tokens,
            image_token_dim=backbone.image_token_dim,
            text_prefix_prob=0.5,
            input_noise_std=0.3,
            label_drop_rate=0.1,
            training=True,
        )
        return draws["rgb_noise"]

    per_replica = tf.function(lambda: strategy.run(draw))()
    return [
        np.asarray(value).tolist()
        for value in strategy.experimental_local_results(per_replica)
    ]


def main(output_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    batches = [
        tiny_batch(GLOBAL_BATCH_SIZE, seed=step) for step in range(FIT_STEPS)
    ]
    batches = {
        name: np.stack([batch[name] for batch in batches])
        for name in batches[0]
    }
    initial_weights = JetFormerTextToImage(
        tiny_backbone(), training_steps=TRAINING_STEPS, seed=3
    ).get_weights()

    results = {"num_replicas": strategy.num_replicas_in_sync}
    results["single_noiseless"] = fit(
        build_task(initial_weights, noiseless=True), batches
    )
    results["single_noisy"] = fit(
        build_task(initial_weights, noiseless=False), batches
    )
    with strategy.scope():
        mirrored_noiseless = build_task(initial_weights, noiseless=True)
        mirrored_noisy = build_task(initial_weights, noiseless=False)
    results["mirrored_noiseless"] = fit(mirrored_noiseless, batches)
    results["mirrored_noisy"] = fit(mirrored_noisy, batches)
    results["replica_noise"] = replica_noise(
        strategy, mirrored_noisy, use_replica_seeds=True
    )
    results["replica_noise_shared_seed"] = replica_noise(
        strategy, mirrored_noisy, use_replica_seeds=False
    )
    with open(output_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(sys.argv[1])
