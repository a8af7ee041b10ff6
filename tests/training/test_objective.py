"""The bits/dim objective, noise curriculum and draws against formulas."""

import math

import keras
import numpy as np
import pytest
from jetformer_test_utils import gradients
from jetformer_test_utils import perturb_weights
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch
from keras import ops

from keras_jetformer.training import add_rgb_noise
from keras_jetformer.training import bits_per_dim
from keras_jetformer.training import draw_training_noise
from keras_jetformer.training import jetformer_objective
from keras_jetformer.training import noise_curriculum


def to_numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 64.0),
        (50, 3.0 + 61.0 * 0.5),
        (100, 3.0),
        (150, 3.0),
        (25, 3.0 + 61.0 * (1 + math.cos(math.pi / 4)) / 2),
    ],
)
def test_noise_curriculum_cosine(step, expected):
    value = noise_curriculum(step, 100, noise_max=64.0, noise_min=3.0)
    np.testing.assert_allclose(to_numpy(value), expected, rtol=1e-6)


def test_noise_curriculum_without_steps_is_min():
    value = noise_curriculum(10, None, noise_max=64.0, noise_min=3.0)
    np.testing.assert_allclose(to_numpy(value), 3.0)


def test_rgb_noise_rounds_on_pixel_grid():
    images = np.array([0.0, -1.0, 1.0, 2 / 255 - 1], "float32").reshape(
        1, 2, 2, 1
    )
    noise = np.array([0.4, -0.05, 0.26, 0.5], "float32").reshape(1, 2, 2, 1)
    result = to_numpy(add_rgb_noise(images, 10.0, noise))
    # By hand: pixels round((x + 1) * 127.5) = [128, 0, 255, 1] (127.5 rounds
    # half to even), plus 10 * noise = [4, -0.5, 2.6, 5], rounded half to
    # even: [132, -0 (not clipped), 258, 6].
    expected_pixels = np.array([132, 0, 258, 6], "float32").reshape(1, 2, 2, 1)
    np.testing.assert_allclose(result, expected_pixels / 127.5 - 1, atol=1e-6)


def test_rgb_noise_per_example_scale():
    images = np.zeros((2, 1, 1, 1), "float32")
    noise = np.ones((2, 1, 1, 1), "float32")
    result = to_numpy(add_rgb_noise(images, np.array([4.0, 0.0]), noise))
    np.testing.assert_allclose(
        result.reshape(-1), (np.array([132.0, 128.0]) / 127.5) - 1, atol=1e-6
    )


def test_bits_per_dim_hand_computed():
    # One example with 2 tokens: the mixture log densities of their modelled
    # dims are given, and each has one factored-out dim (values 0 and 1).
    # The subpixel count is an independent input of the formula.
    gmm_log_prob = np.array([[-1.0, -2.0]], "float32")
    factored = np.array([[[0.0], [1.0]]], "float32")
    logdet = np.array([8.0], "float32")
    nll_image, nll_tokens, logdet_bpd = bits_per_dim(
        gmm_log_prob, factored, logdet, num_subpixels=4
    )
    factored_nll = math.log(2 * math.pi) + 0.5  # -log N(0) - log N(1)
    expected_tokens = (3.0 + factored_nll) / 4 / math.log(2)
    expected_logdet = (8.0 / 4 - math.log(127.5)) / math.log(2)
    np.testing.assert_allclose(to_numpy(nll_tokens), [expected_tokens], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(logdet_bpd), [expected_logdet], rtol=1e-6)
    np.testing.assert_allclose(
        to_numpy(nll_image), [expected_tokens - expected_logdet], rtol=1e-6
    )


def test_bits_per_dim_uniform_density_is_eight_bits():
    # A uniform density on [-1, 1] in every dim with an identity flow spreads
    # probability evenly over the 255 pixel steps: log2(255) bits per dim.
    num_tokens = 16
    gmm_log_prob = np.full((1, num_tokens), -2 * math.log(2.0), "float32")
    # Two modelled dims per token and no factored-out dims.
    factored = np.zeros((1, num_tokens, 0), "float32")
    nll_image, _, _ = bits_per_dim(
        gmm_log_prob, factored, np.zeros((1,), "float32"), num_tokens * 2
    )
    np.testing.assert_allclose(to_numpy(nll_image), [math.log2(255)], rtol=1e-6)


def test_training_draws_shapes_and_ranges():
    seed = keras.random.SeedGenerator(0)
    draws = draw_training_noise(
        seed,
        images_shape=(2000, 2, 2, 1),
        num_image_tokens=3,
        image_token_dim=2,
        text_prefix_prob=0.25,
        input_noise_std=0.3,
        label_drop_rate=0.1,
        training=True,
    )
    dequantization = to_numpy(draws["dequantization_noise"])
    assert dequantization.shape == (2000, 2, 2, 1)
    assert dequantization.min() >= 0
    assert dequantization.max() < 1 / 127.5
    std = to_numpy(draws["input_noise_std"])
    assert std.min() >= 0 and std.max() < 0.3
    assert to_numpy(draws["input_noise"]).shape == (2000, 3, 2)
    assert abs(to_numpy(draws["text_first_mask"]).mean() - 0.25) < 0.05
    assert abs(to_numpy(draws["drop_labels"]).mean() - 0.1) < 0.03
    evaluation = draw_training_noise(
        seed, (4, 2, 2, 1), 3, 2, 0.5, 0.3, 0.1, training=False
    )
    assert set(evaluation) == {"text_first_mask", "dequantization_noise"}


def fixed_draws(batch, text_first, drop=None, input_noise_std=0.0, seed=0):
    rng = np.random.default_rng(seed)
    images = batch["images"]
    batch_size = images.shape[0]
    return {
        "text_first_mask": np.asarray(text_first, bool),
        "dequantization_noise": rng.uniform(0, 1 / 127.5, images.shape).astype(
            "float32"
        ),
        "rgb_noise": rng.standard_normal(images.shape).astype("float32"),
        "input_noise_std": np.full((batch_size,), input_noise_std, "float32"),
        "input_noise": rng.standard_normal((batch_size, 16, 2)).astype(
            "float32"
        ),
        "drop_labels": np.zeros(batch_size, bool)
        if drop is None
        else np.asarray(drop, bool),
    }


@pytest.fixture(scope="module")
def backbone():
    model = tiny_backbone()
    # Give the flow and the head non-trivial weights.
    perturb_weights(model, scale=0.2)
    return model


def objective(backbone, batch, draws, **kwargs):
    kwargs.setdefault("training", True)
    return jetformer_objective(backbone, batch, draws, **kwargs)


def test_loss_is_mean_of_suffix_nlls(backbone):
    batch = tiny_batch(4)
    draws = fixed_draws(batch, [True, False, True, False])
    loss, metrics = objective(
        backbone, batch, draws, noise_scale=10.0, text_loss_weight=0.5
    )
    nll_image = to_numpy(metrics["per_example_nll_image"])
    nll_text = to_numpy(metrics["per_example_nll_text"])
    expected = np.mean([nll_image[0], 0.5 * nll_text[1], nll_image[2],
                        0.5 * nll_text[3]])
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(
        to_numpy(metrics["nll_image"]), nll_image[[0, 2]].mean(), rtol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(metrics["nll_text"]), nll_text[[1, 3]].mean(), rtol=1e-6
    )


def test_loss_on_prefix_scores_both_modalities(backbone):
    batch = tiny_batch(4)
    draws = fixed_draws(batch, [True, False, True, False])
    loss, metrics = objective(
        backbone,
        batch,
        draws,
        noise_scale=0.0,
        text_loss_weight=0.5,
        loss_on_prefix=True,
    )
    nll_image = to_numpy(metrics["per_example_nll_image"])
    nll_text = to_numpy(metrics["per_example_nll_text"])
    np.testing.assert_allclose(
        to_numpy(loss), 0.5 * nll_text.mean() + nll_image.mean(), rtol=1e-6
    )


def test_padding_is_not_scored(backbone):
    batch = tiny_batch(4)
    draws = fixed_draws(batch, [False] * 4)
    _, metrics = objective(backbone, batch, draws, noise_scale=0.0)
    changed = dict(batch)
    token_ids = batch["token_ids"].copy()
    token_ids[0, -1] = (token_ids[0, -1] + 1) % 10  # a padding slot
    changed["token_ids"] = token_ids
    _, changed_metrics = objective(backbone, changed, draws, noise_scale=0.0)
    np.testing.assert_allclose(
        to_numpy(metrics["per_example_nll_text"]),
        to_numpy(changed_metrics["per_example_nll_text"]),
        rtol=1e-6,
    )


def test_dropped_prefix_ignores_text(backbone):
    batch = tiny_batch(4)
    draws = fixed_draws(batch, [True] * 4, drop=[True, False, False, True])
    _, metrics = objective(backbone, batch, draws, noise_scale=0.0)
    changed = dict(batch, token_ids=(batch["token_ids"] + 1) % 10)
    _, changed_metrics = objective(backbone, changed, draws, noise_scale=0.0)
    before = to_numpy(metrics["per_example_nll_image"])
    after = to_numpy(changed_metrics["per_example_nll_image"])
    np.testing.assert_allclose(before[[0, 3]], after[[0, 3]], rtol=1e-6)
    assert np.all(np.abs(before[[1, 2]] - after[[1, 2]]) > 1e-6)


def test_input_noise_only_on_text_first_rows(backbone):
    batch = tiny_batch(4)
    quiet = fixed_draws(batch, [True, False, True, False])
    noisy = dict(quiet, input_noise_std=np.full((4,), 0.3, "float32"))
    _, quiet_metrics = objective(backbone, batch, quiet, noise_scale=0.0)
    _, noisy_metrics = objective(backbone, batch, noisy, noise_scale=0.0)
    before = to_numpy(quiet_metrics["per_example_nll_text"])
    after = to_numpy(noisy_metrics["per_example_nll_text"])
    np.testing.assert_allclose(before[[1, 3]], after[[1, 3]], rtol=1e-6)
    before = to_numpy(quiet_metrics["per_example_nll_image"])
    after = to_numpy(noisy_metrics["per_example_nll_image"])
    assert np.all(np.abs(before[[0, 2]] - after[[0, 2]]) > 1e-6)


def test_evaluation_ignores_training_draws(backbone):
    batch = tiny_batch(4)
    draws = fixed_draws(batch, [True] * 4, input_noise_std=0.3)
    loss, _ = objective(backbone, batch, draws, noise_scale=None, training=False)
    minimal = {
        "text_first_mask": draws["text_first_mask"],
        "dequantization_noise": draws["dequantization_noise"],
    }
    minimal_loss, _ = objective(
        backbone, batch, minimal, noise_scale=None, training=False
    )
    np.testing.assert_allclose(to_numpy(loss), to_numpy(minimal_loss))


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_flow_gradient_stops_on_image_prefix(stop_gradient):
    # A spatial coupling transforms every dim of half the tokens, so the
    # modelled dims certainly depend on the flow (with channel couplings
    # alone that depends on the random permutations).
    backbone = tiny_backbone(flow_coupling_kinds=("spatial", "channels"))
    perturb_weights(backbone, scale=0.2)
    batch = tiny_batch(4)
    draws = fixed_draws(batch, [False] * 4)
    flow_variables = backbone.flow.trainable_variables

    def loss_fn():
        return objective(
            backbone,
            batch,
            draws,
            noise_scale=0.0,
            stop_flow_gradient_on_prefix=stop_gradient,
        )[0]

    _, grads = gradients(loss_fn, flow_variables)
    largest = max(
        0.0 if grad is None else float(np.abs(grad).max()) for grad in grads
    )
    if stop_gradient:
        assert largest == 0.0
    else:
        assert largest > 1e-6
