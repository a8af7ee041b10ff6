"""`JetFormerTextToImage.image_bits_per_dim` against the training objective."""

import keras
import numpy as np
import pytest
from jetformer_test_utils import perturb_weights
from jetformer_test_utils import tiny_backbone
from keras import ops

from keras_jetformer.models import JetFormerImageConverter
from keras_jetformer.models import JetFormerTextToImage
from keras_jetformer.models import JetFormerTextToImagePreprocessor
from keras_jetformer.models import JetFormerTokenizer
from keras_jetformer.models import compute_jetformer_tokenizer_proto
from keras_jetformer.training import jetformer_objective

PROTO = compute_jetformer_tokenizer_proto(["a handwritten seven", "the digit two"])
IMAGES = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype("uint8")
PROMPTS = ["a handwritten seven", "two"]
NUM_SAMPLES = 2
SEED = 4


@pytest.fixture(scope="module")
def task():
    keras.utils.set_random_seed(0)
    preprocessor = JetFormerTextToImagePreprocessor(
        JetFormerTokenizer(proto=PROTO),
        JetFormerImageConverter(),
        sequence_length=4,
    )
    backbone = tiny_backbone(
        vocabulary_size=preprocessor.tokenizer.model_vocabulary_size()
    )
    # Non-zero weights everywhere, so that the flow is not the identity and
    # the mixture depends on the text.
    perturb_weights(backbone, scale=0.05)
    return JetFormerTextToImage(backbone, preprocessor)


def objective_bits_per_dim(task, token_ids, padding_mask, unconditional):
    """Mean over the seeded draws of the objective's per-example image NLL."""
    batch = {
        "images": (IMAGES / 127.5 - 1.0).astype("float32"),
        "token_ids": token_ids,
        "padding_mask": padding_mask,
    }
    rng = np.random.default_rng(SEED)
    total = np.zeros(len(IMAGES))
    for _ in range(NUM_SAMPLES):
        draws = {
            "text_first_mask": np.ones(len(IMAGES), bool),
            "dequantization_noise": rng.uniform(
                0, 1 / 127.5, IMAGES.shape
            ).astype("float32"),
        }
        if unconditional:
            # The objective drops prefixes only in training mode; without
            # other training draws and with dropout 0 nothing else changes.
            draws["drop_labels"] = np.ones(len(IMAGES), bool)
        _, metrics = jetformer_objective(
            task.backbone, batch, draws, training=unconditional
        )
        total += ops.convert_to_numpy(metrics["per_example_nll_image"])
    return total / NUM_SAMPLES


def prompt_tokens(task):
    tokenized = task.preprocessor.generate_preprocess(PROMPTS)
    return (
        ops.convert_to_numpy(tokenized["token_ids"]),
        ops.convert_to_numpy(tokenized["padding_mask"]),
    )


def test_conditional_matches_objective(task):
    result = task.image_bits_per_dim(
        IMAGES, PROMPTS, num_samples=NUM_SAMPLES, seed=SEED
    )
    assert result.shape == (2,)
    assert result.dtype == np.float32
    token_ids, padding_mask = prompt_tokens(task)
    expected = objective_bits_per_dim(task, token_ids, padding_mask, False)
    np.testing.assert_allclose(result, expected, rtol=1e-5)


def test_unconditional_matches_objective_with_dropped_prefix(task):
    result = task.image_bits_per_dim(
        IMAGES, num_samples=NUM_SAMPLES, seed=SEED
    )
    text_length = task.preprocessor.sequence_length
    token_ids = np.zeros((2, text_length), "int32")
    padding_mask = np.ones((2, text_length), bool)
    expected = objective_bits_per_dim(task, token_ids, padding_mask, True)
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    conditional = task.image_bits_per_dim(
        IMAGES, PROMPTS, num_samples=NUM_SAMPLES, seed=SEED
    )
    assert np.all(np.abs(result - conditional) > 1e-6)


def test_tokenized_prompts_without_preprocessor(task):
    expected = task.image_bits_per_dim(IMAGES, PROMPTS, seed=SEED)
    token_ids, padding_mask = prompt_tokens(task)
    preprocessor = task.preprocessor
    task.preprocessor = None
    try:
        result = task.image_bits_per_dim(
            IMAGES / 127.5 - 1.0,
            {"token_ids": token_ids, "padding_mask": padding_mask},
            seed=SEED,
        )
        with pytest.raises(ValueError, match="preprocessor=None"):
            task.image_bits_per_dim(IMAGES / 127.5 - 1.0)
    finally:
        task.preprocessor = preprocessor
    np.testing.assert_allclose(result, expected, rtol=1e-5)


def test_rejects_bad_arguments(task):
    with pytest.raises(ValueError, match="num_samples=0"):
        task.image_bits_per_dim(IMAGES, PROMPTS, num_samples=0)
    with pytest.raises(ValueError, match="images.shape"):
        task.image_bits_per_dim(IMAGES[0], PROMPTS)
    with pytest.raises(ValueError, match="one prompt per image"):
        task.image_bits_per_dim(IMAGES, PROMPTS[:1])
