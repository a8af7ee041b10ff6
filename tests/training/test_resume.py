"""A run stopped after one epoch and resumed continues exactly.

A tiny text-to-image task trains for 2 epochs of 4 steps without a break.
A second copy trains for 1 epoch and stops. Its checkpoint is restored into
a model with other weights and seeds, which trains the second epoch. The
restored model must start the second epoch with the same step count,
optimizer variables, seed-generator states and weights, and its losses and
noise-curriculum values in that epoch must match the uninterrupted run.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch

from keras_jetformer.models import JetFormerTextToImage

STEPS_PER_EPOCH = 4
BATCH_SIZE = 2
# The tolerance allows for float32 rounding differences between the
# compiled steps of the two runs.
LOSS_TOLERANCE = 1e-5


def make_task(seed):
    """A tiny task whose weights and training seed depend on `seed`."""
    # Some initializers draw from the global seed.
    keras.utils.set_random_seed(seed)
    task = JetFormerTextToImage(
        tiny_backbone(seed=seed),
        training_steps=2 * STEPS_PER_EPOCH,
        text_prefix_prob=0.5,
        noise_scale=64.0,
        noise_min=0.0,
        seed=seed,
    )
    task.compile()
    return task


def dataset():
    batch = tiny_batch(batch_size=STEPS_PER_EPOCH * BATCH_SIZE, seed=3)
    return tf.data.Dataset.from_tensor_slices(batch).batch(BATCH_SIZE)


class Recorder(keras.callbacks.Callback):
    """Record the state at the start of epoch 2 and the logs of each step."""

    def __init__(self):
        super().__init__()
        self.state = None
        self.logs = []

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != 1:
            return
        model = self.model
        self.state = {
            "iterations": int(
                keras.ops.convert_to_numpy(model.optimizer.iterations)
            ),
            "seed_state": keras.ops.convert_to_numpy(
                model.seed_generator.state
            ),
            "optimizer": [
                keras.ops.convert_to_numpy(v) for v in model.optimizer.variables
            ],
            "weights": [
                keras.ops.convert_to_numpy(v) for v in model.trainable_variables
            ],
        }

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(
            {
                name: float(keras.ops.convert_to_numpy(logs[name]))
                for name in ("loss", "noise_scale")
            }
        )


class Interrupted(Exception):
    """Simulates a killed job."""


class StopAtSecondEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise Interrupted("stopped before the second epoch")


@pytest.fixture(scope="module")
def uninterrupted():
    recorder = Recorder()
    make_task(seed=1).fit(dataset(), epochs=2, callbacks=[recorder], verbose=0)
    return recorder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Train 1 epoch, then stop; return the backup and `.keras` paths.

    The model stays usable after the stop (also on JAX, where the variables
    are synced back at the end of every epoch), so the same run also writes
    the `.keras` checkpoint.
    """
    directory = tmp_path_factory.mktemp("resume")
    backup_dir = str(directory / "backup")
    first = make_task(seed=1)
    with pytest.raises(Interrupted):
        first.fit(
            dataset(),
            epochs=2,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup_dir),
                StopAtSecondEpoch(),
            ],
            verbose=0,
        )
    keras_file = str(directory / "checkpoint.keras")
    first.save(keras_file)
    return {"backup": backup_dir, "keras_file": keras_file}


def resume_with_backup(checkpoints):
    recorder = Recorder()
    resumed = make_task(seed=2)
    resumed.fit(
        dataset(),
        epochs=2,
        callbacks=[
            keras.callbacks.BackupAndRestore(checkpoints["backup"]),
            recorder,
        ],
        verbose=0,
    )
    return recorder


def resume_from_keras_file(checkpoints):
    recorder = Recorder()
    # `safe_mode=True` is the default: the file contains no code.
    resumed = keras.saving.load_model(checkpoints["keras_file"], safe_mode=True)
    resumed.fit(
        dataset(), epochs=2, initial_epoch=1, callbacks=[recorder], verbose=0
    )
    return recorder


@pytest.mark.parametrize(
    "resume",
    [resume_with_backup, resume_from_keras_file],
    ids=["backup", "keras_file"],
)
def test_resume_matches_uninterrupted_run(uninterrupted, checkpoints, resume):
    resumed = resume(checkpoints)
    expected = uninterrupted.state
    actual = resumed.state
    assert actual["iterations"] == expected["iterations"] == STEPS_PER_EPOCH
    np.testing.assert_array_equal(actual["seed_state"], expected["seed_state"])
    assert len(actual["optimizer"]) == len(expected["optimizer"])
    for got, want in zip(actual["optimizer"], expected["optimizer"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    for got, want in zip(actual["weights"], expected["weights"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)

    second_epoch = uninterrupted.logs[STEPS_PER_EPOCH:]
    assert len(resumed.logs) == len(second_epoch) == STEPS_PER_EPOCH
    for got, want in zip(resumed.logs, second_epoch):
        assert got["noise_scale"] == pytest.approx(want["noise_scale"], abs=1e-6)
        assert abs(got["loss"] - want["loss"]) <= LOSS_TOLERANCE
    # The curriculum is still running in the second epoch.
    assert second_epoch[0]["noise_scale"] > second_epoch[-1]["noise_scale"] > 0
