"""Compiled training steps: traced once per input shape, random inside."""

import keras
import numpy as np
import pytest
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch

from keras_jetformer.models import JetFormerTextToImage
from keras_jetformer.training.objective import noise_curriculum

NUM_STEPS = 3


class TraceCountingTextToImage(JetFormerTextToImage):
    """Counts the Python executions of the objective.

    Inside a compiled step the Python body runs only while the step is
    traced, so the count is the number of traces.
    """

    trace_count = 0

    def compute_objective(self, *args, **kwargs):
        TraceCountingTextToImage.trace_count += 1
        return super().compute_objective(*args, **kwargs)


@pytest.fixture(scope="module")
def task():
    if keras.config.backend() == "torch":
        pytest.skip(
            "The torch backend trains eagerly by default, where the Python "
            "body runs on every step."
        )
    task = TraceCountingTextToImage(
        tiny_backbone(),
        training_steps=2 * NUM_STEPS,
        noise_scale=16.0,
        noise_min=2.0,
        seed=3,
    )
    task.compile(optimizer="adam")
    return task


def fit(task, batch_size, epochs=NUM_STEPS):
    # One step per epoch, so that the history contains every step's logs.
    batch = tiny_batch(batch_size=batch_size, seed=1)
    return task.fit(
        batch, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0
    )


def test_train_step_traced_once_per_shape(task):
    TraceCountingTextToImage.trace_count = 0
    fit(task, batch_size=4)
    assert TraceCountingTextToImage.trace_count == 1
    # A new batch size may retrace (jax) or reuse a trace whose batch
    # dimension is unknown (tensorflow).
    fit(task, batch_size=2)
    assert TraceCountingTextToImage.trace_count <= 2
    traces = TraceCountingTextToImage.trace_count
    fit(task, batch_size=4)
    assert TraceCountingTextToImage.trace_count == traces


def test_train_step_randomness_advances(task):
    seed_state = keras.ops.convert_to_numpy(task.seed_generator.state)
    first_step = int(task.optimizer.iterations.numpy())
    history = fit(task, batch_size=4)

    # The seed generator advances inside the compiled step.
    new_seed_state = keras.ops.convert_to_numpy(task.seed_generator.state)
    assert not np.array_equal(seed_state, new_seed_state)
    # The noise curriculum reads the step count inside the compiled step.
    expected = [
        float(noise_curriculum(step, 2 * NUM_STEPS, 16.0, 2.0))
        for step in range(first_step, first_step + NUM_STEPS)
    ]
    np.testing.assert_allclose(
        history.history["noise_scale"], expected, rtol=1e-5
    )
