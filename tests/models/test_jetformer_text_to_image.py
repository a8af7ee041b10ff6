"""Training and generation of `JetFormerTextToImage` on a tiny model."""

import math

import keras
import numpy as np
import pytest
from jetformer_test_utils import TINY_BACKBONE_CONFIG
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch
from keras import ops

from keras_jetformer.models import JetFormerTextToImage
from keras_jetformer.training import jetformer_objective
from keras_jetformer.training import jetformer_optimizer

TRAINING_STEPS = 8


class StepLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


def make_task(seed=3, **kwargs):
    keras.utils.set_random_seed(seed)
    kwargs.setdefault("training_steps", TRAINING_STEPS)
    kwargs.setdefault("text_prefix_prob", 0.5)
    kwargs.setdefault("noise_min", 3.0)
    return JetFormerTextToImage(tiny_backbone(), seed=seed, **kwargs)


def fit_steps(task, batch, steps, callbacks=()):
    dataset = {key: np.repeat(value, 2, axis=0) for key, value in batch.items()}
    return task.fit(
        dataset,
        batch_size=len(batch["images"]),
        epochs=steps // 2,
        verbose=0,
        callbacks=list(callbacks),
        shuffle=False,
    )


@pytest.fixture(scope="module")
def trained():
    """A task trained for `TRAINING_STEPS` steps, with its step logs."""
    task = make_task()
    logs = StepLogs()
    fit_steps(task, tiny_batch(8), TRAINING_STEPS, callbacks=[logs])
    return task, logs.logs


def expected_noise_scale(step):
    progress = step / TRAINING_STEPS
    return 3.0 + (64.0 - 3.0) * (1 + math.cos(math.pi * progress)) / 2


def test_fit_logs_named_metrics(trained):
    _, logs = trained
    assert set(logs[0]) == {"loss", "nll_image", "nll_text", "logdet", "noise_scale"}
    for entry in logs:
        assert all(np.isfinite(value) for value in entry.values())


@pytest.mark.parametrize("step", [0, TRAINING_STEPS // 2, TRAINING_STEPS - 1])
def test_logged_noise_scale_follows_cosine(trained, step):
    _, logs = trained
    np.testing.assert_allclose(
        logs[step]["noise_scale"], expected_noise_scale(step), rtol=1e-5
    )


def test_noise_curriculum_reads_optimizer_step(trained):
    task, _ = trained
    assert int(ops.convert_to_numpy(task.optimizer.iterations)) == TRAINING_STEPS
    np.testing.assert_allclose(
        ops.convert_to_numpy(task.current_noise_scale(TRAINING_STEPS)), 3.0
    )


def test_training_noise_differs_between_steps():
    task = make_task()
    batch = tiny_batch(4)
    first, _ = task.compute_objective(batch, step=0, training=True)
    second, _ = task.compute_objective(batch, step=0, training=True)
    assert abs(float(first) - float(second)) > 1e-6


def test_seed_generator_advances_during_fit(trained):
    task, _ = trained
    state = ops.convert_to_numpy(task.seed_generator.state)
    fresh = make_task()
    fresh_state = ops.convert_to_numpy(fresh.seed_generator.state)
    assert not np.array_equal(state, fresh_state)


def test_same_seed_reproduces_training():
    histories, weights = [], []
    for _ in range(2):
        task = make_task(seed=11)
        history = fit_steps(task, tiny_batch(4), 4)
        histories.append(history.history["loss"])
        weights.append(
            [ops.convert_to_numpy(w) for w in task.backbone.trainable_weights]
        )
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-6)
    for first, second in zip(*weights):
        np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)


def deterministic_loss(task, batch, seed=0):
    """The evaluation-mode objective with fixed draws."""
    rng = np.random.default_rng(seed)
    draws = {
        "text_first_mask": np.ones(len(batch["images"]), bool),
        "dequantization_noise": rng.uniform(
            0, 1 / 127.5, batch["images"].shape
        ).astype("float32"),
    }
    loss, _ = jetformer_objective(task.backbone, batch, draws)
    return float(ops.convert_to_numpy(loss))


def test_short_fit_lowers_loss():
    task = make_task(
        text_prefix_prob=1.0,
        noise_scale=0.0,
        noise_min=0.0,
        input_noise_std=0.0,
        label_drop_rate=0.0,
    )
    task.compile(optimizer=jetformer_optimizer(learning_rate=3e-3))
    batch = tiny_batch(8)
    before = deterministic_loss(task, batch)
    fit_steps(task, batch, 30)
    after = deterministic_loss(task, batch)
    assert after < before - 0.2, (before, after)


def test_keras_file_round_trip(trained, tmp_path):
    task, _ = trained
    path = str(tmp_path / "task.keras")
    task.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, JetFormerTextToImage)
    assert restored.training_config == task.training_config
    batch = tiny_batch(4)
    for key in ("image_logits", "text_logits", "logdet"):
        np.testing.assert_allclose(
            ops.convert_to_numpy(task.predict(batch, verbose=0)[key]),
            ops.convert_to_numpy(restored.predict(batch, verbose=0)[key]),
            rtol=1e-6,
            atol=1e-6,
        )
    np.testing.assert_allclose(
        deterministic_loss(task, batch), deterministic_loss(restored, batch)
    )
    # The optimizer state comes back, so training resumes where it stopped.
    assert int(ops.convert_to_numpy(restored.optimizer.iterations)) == (
        TRAINING_STEPS
    )
    for saved, loaded in zip(task.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_allclose(
            ops.convert_to_numpy(saved), ops.convert_to_numpy(loaded)
        )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(task.seed_generator.state),
        ops.convert_to_numpy(restored.seed_generator.state),
    )


def test_get_config_round_trip_keeps_training_arguments():
    task = make_task(noise_scale=32.0, label_drop_rate=0.2, text_loss_weight=0.5)
    config = task.get_config()
    restored = JetFormerTextToImage.from_config(config)
    assert restored.training_config == task.training_config
    assert restored.backbone.get_config() == task.backbone.get_config()


def test_generate_is_reproducible_with_seed(trained):
    task, _ = trained
    batch = tiny_batch(3)
    prompts = {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]}
    first = task.generate(prompts, seed=5, guidance_scale=2.0)
    second = task.generate(prompts, seed=5, guidance_scale=2.0)
    other = task.generate(prompts, seed=6, guidance_scale=2.0)
    assert first.dtype == np.uint8
    assert first.shape == (3, *TINY_BACKBONE_CONFIG["image_shape"])
    np.testing.assert_array_equal(first, second)
    assert np.any(first != other)


def test_generate_rejects_bad_arguments(trained):
    task, _ = trained
    batch = tiny_batch(1)
    prompts = {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]}
    with pytest.raises(ValueError, match="guidance_scale"):
        task.generate(prompts, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        task.generate(prompts, temperature=0.0)
    with pytest.raises(ValueError, match="guidance_method"):
        task.generate(prompts, guidance_scale=1.0, guidance_method="exact")
    with pytest.raises(ValueError, match="preprocessor"):
        task.generate(["a prompt"])
