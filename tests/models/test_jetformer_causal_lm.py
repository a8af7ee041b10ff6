"""Training, cached text decoding and scoring of `JetFormerCausalLM`."""

import keras
import numpy as np
import pytest
from jetformer_test_utils import tiny_backbone
from keras import ops
from keras_hub.samplers import TopKSampler
from keras_hub.src.tests.test_case import TestCase

from keras_jetformer.models import JetFormerCausalLM
from keras_jetformer.models import JetFormerCausalLMPreprocessor
from keras_jetformer.models import JetFormerImageConverter
from keras_jetformer.models import JetFormerTokenizer
from keras_jetformer.models import compute_jetformer_tokenizer_proto
from keras_jetformer.training import jetformer_objective

SENTENCES = ["a photo of a cat", "a photo of a dog", "caption this image"]
PROTO = compute_jetformer_tokenizer_proto(SENTENCES)
SEQUENCE_LENGTH = 6
IMAGES = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype("uint8")
# Prompts of different lengths, one of them empty.
PROMPTS = ["a photo of", ""]


def make_preprocessor(**kwargs):
    kwargs.setdefault("sequence_length", SEQUENCE_LENGTH)
    return JetFormerCausalLMPreprocessor(
        JetFormerTokenizer(proto=PROTO), JetFormerImageConverter(), **kwargs
    )


def make_task(num_vocab_repeats=1, **kwargs):
    # Seeding clears TensorFlow's kernel cache, which deletes the
    # SentencePiece resource of tokenizers made before it, so `tf.data`
    # could no longer tokenize with them.
    keras.utils.set_random_seed(0)
    preprocessor = make_preprocessor()
    backbone = tiny_backbone(
        vocabulary_size=preprocessor.tokenizer.model_vocabulary_size(),
        num_vocab_repeats=num_vocab_repeats,
    )
    return JetFormerCausalLM(backbone, preprocessor, **kwargs)


@pytest.fixture(scope="module")
def task():
    return make_task(seed=0)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def preprocessed(task, prompts=PROMPTS, responses=("a cat", "a dog")):
    x, _, _ = task.preprocessor(
        {"images": IMAGES, "prompts": list(prompts), "responses": list(responses)}
    )
    return {key: to_numpy(value) for key, value in x.items()}


def full_text_logits(task, images, token_ids, padding_mask):
    """Text logits `[B, T, V]` of the image-first layout, without a cache."""
    outputs = task.backbone(
        {
            "images": images,
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "text_first_mask": np.zeros(len(token_ids), bool),
        }
    )
    return to_numpy(outputs["text_logits"])


def sampling_argmax(task, logits):
    """Greedy choice among the tokenizer's ids (special model ids excluded)."""
    backbone = task.backbone
    logits = logits[..., : backbone.vocabulary_size].copy()
    logits[..., [backbone.bos_id, backbone.boi_id, backbone.nolabel_id]] = -np.inf
    return logits.argmax(-1)


# --- Forward pass and objective ------------------------------------------------


def test_call_returns_image_first_text_logits(task):
    batch = preprocessed(task)
    logits = to_numpy(task(batch))
    vocabulary_size = task.backbone.vocabulary_size
    assert logits.shape == (2, SEQUENCE_LENGTH, vocabulary_size)
    expected = full_text_logits(
        task, batch["images"], batch["token_ids"], batch["padding_mask"]
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_objective_scores_loss_mask_only(task):
    batch = preprocessed(task)
    draws = {
        "text_first_mask": np.zeros(2, bool),
        "dequantization_noise": np.zeros_like(batch["images"]),
    }
    _, metrics = task.compute_objective(batch, step=None, training=False, draws=draws)
    logits = to_numpy(task(batch))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_log_probs = np.take_along_axis(
        log_probs, batch["token_ids"][..., None].astype(int), -1
    )[..., 0]
    loss_mask = batch["loss_mask"]
    # The prompt of row 0 is valid text but is not scored.
    assert batch["padding_mask"][0, 0]
    assert not loss_mask[0, 0]
    expected = -(token_log_probs * loss_mask).sum(1) / loss_mask.sum(1)
    np.testing.assert_allclose(
        to_numpy(metrics["per_example_nll_text"]), expected, rtol=1e-5
    )


def test_default_recipe_trains_captioning_only(task):
    assert task.training_config["text_prefix_prob"] == 0.0
    names = {metric.name for metric in task.metrics}
    assert names == {"loss", "nll_text", "noise_scale"}


# --- Cached decoding -------------------------------------------------------------


def test_cached_logits_equal_full_forward(task):
    inputs = task.preprocessor.generate_preprocess(
        {"images": IMAGES, "prompts": PROMPTS}
    )
    prompt_mask = to_numpy(inputs["padding_mask"])
    prompt_lengths = prompt_mask.sum(1)
    assert prompt_lengths.min() == 0
    assert prompt_lengths.max() > 1
    # Fill every row past its prompt with other text ids, as decoding would.
    rng = np.random.default_rng(1)
    token_ids = to_numpy(inputs["token_ids"]).copy()
    fill = rng.integers(4, task.preprocessor.tokenizer.vocabulary_size(), token_ids.shape)
    token_ids = np.where(prompt_mask, token_ids, fill).astype("int32")
    images = to_numpy(inputs["images"])

    expected = full_text_logits(
        task, images, token_ids, np.ones_like(token_ids, bool)
    )
    hidden_states, cache = task._build_cache(images, token_ids)
    bos_slot = task.backbone.num_image_tokens + 1
    bos = np.full((2, 1), task.backbone.bos_id, "int32")
    inputs_by_index = np.concatenate([bos, token_ids], axis=1)
    for index in range(int(prompt_lengths.min()), SEQUENCE_LENGTH):
        logits, _, cache = task.call_with_cache(
            inputs_by_index[:, index : index + 1], cache, bos_slot + index
        )
        np.testing.assert_allclose(
            to_numpy(logits)[:, 0],
            expected[:, index],
            rtol=1e-4,
            atol=1e-4,
            err_msg=f"text position {index}",
        )

    # Padding after a shorter text does not change the logits before it.
    padded_mask = np.ones_like(token_ids, bool)
    padded_mask[1, 3:] = False
    padded = full_text_logits(task, images, token_ids, padded_mask)
    np.testing.assert_allclose(padded[1, :4], expected[1, :4], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def greedy_tokens(task):
    """Greedy decoding of all positions, without stop tokens."""
    inputs = task.preprocessor.generate_preprocess(
        {"images": IMAGES, "prompts": PROMPTS}
    )
    preprocessor = task.preprocessor
    task.preprocessor = None
    try:
        outputs = task.generate(inputs, stop_token_ids=None)
        repeated = task.generate(inputs, stop_token_ids=None)
    finally:
        task.preprocessor = preprocessor
    return inputs, to_numpy(outputs["token_ids"]), to_numpy(repeated["token_ids"])


def test_greedy_generate_follows_full_forward_argmax(task, greedy_tokens):
    inputs, token_ids, repeated = greedy_tokens
    prompt_mask = to_numpy(inputs["padding_mask"])
    np.testing.assert_array_equal(token_ids, repeated)
    np.testing.assert_array_equal(
        token_ids[prompt_mask], to_numpy(inputs["token_ids"])[prompt_mask]
    )
    logits = full_text_logits(
        task, to_numpy(inputs["images"]), token_ids, np.ones_like(token_ids, bool)
    )
    predicted = sampling_argmax(task, logits)
    generated = ~prompt_mask
    np.testing.assert_array_equal(token_ids[generated], predicted[generated])


def test_generate_returns_strings(task):
    texts = task.generate({"images": IMAGES, "prompts": list(PROMPTS)})
    assert isinstance(texts, list)
    assert len(texts) == 2
    assert texts[0].startswith(PROMPTS[0])
    continuations = task.generate(
        {"images": IMAGES, "prompts": list(PROMPTS)}, strip_prompt=True
    )
    assert texts[0] == f"{PROMPTS[0]} {continuations[0]}".strip()
    assert texts[1] == continuations[1]
    single = task.generate({"images": IMAGES[0], "prompts": PROMPTS[0]})
    assert single == texts[0]


def test_zero_temperature_decodes_greedily(task, greedy_tokens):
    inputs, token_ids, _ = greedy_tokens
    task.compile(sampler=TopKSampler(k=3, temperature=0.0))
    preprocessor = task.preprocessor
    task.preprocessor = None
    try:
        outputs = task.generate(inputs, stop_token_ids=None)
    finally:
        task.preprocessor = preprocessor
        task.compile(sampler="greedy")
    np.testing.assert_array_equal(to_numpy(outputs["token_ids"]), token_ids)


def test_generate_is_reproducible_with_sampler_seed(task):
    inputs = {"images": IMAGES, "prompts": list(PROMPTS)}
    results = []
    for _ in range(2):
        sampler = TopKSampler(k=3, seed=7)
        task.compile(sampler=sampler)
        state = to_numpy(sampler.seed_generator.state).copy()
        results.append(task.generate(dict(inputs)))
        # The sampler's seed state advances, so a next call draws anew.
        assert not np.array_equal(state, to_numpy(sampler.seed_generator.state))
    task.compile(sampler="greedy")
    assert results[0] == results[1]


# --- Scoring and representations ------------------------------------------------


def brute_force_scores(task, texts):
    """`[B, C]` log-likelihoods from `jetformer_objective` on image-first rows."""
    preprocessor = make_preprocessor()
    scores = np.zeros((len(IMAGES), len(texts)))
    for column, text in enumerate(texts):
        batch, _, _ = preprocessor(
            {"images": IMAGES, "prompts": ["", ""], "responses": [text, text]}
        )
        draws = {
            "text_first_mask": np.zeros(len(IMAGES), bool),
            "dequantization_noise": np.zeros(IMAGES.shape, "float32"),
        }
        _, metrics = jetformer_objective(task.backbone, batch, draws)
        counts = to_numpy(batch["loss_mask"]).sum(1)
        scores[:, column] = -to_numpy(metrics["per_example_nll_text"]) * counts
    return scores


TEXTS = ["a cat", "a photo of a dog", "caption"]


def test_score_matches_objective(task):
    scores = task.score(IMAGES, TEXTS)
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores, brute_force_scores(task, TEXTS), rtol=1e-4)
    np.testing.assert_allclose(task.score(IMAGES, TEXTS, batch_size=2), scores, rtol=1e-5)


def test_score_with_vocabulary_repeats_matches_objective():
    task = make_task(num_vocab_repeats=2)
    np.testing.assert_allclose(
        task.score(IMAGES, TEXTS), brute_force_scores(task, TEXTS), rtol=1e-4
    )


def test_classify_scores_template_captions(task):
    predicted, scores = task.classify(IMAGES, ["cat", "dog"], "a photo of a {}")
    expected = task.score(IMAGES, ["a photo of a cat", "a photo of a dog"])
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_array_equal(predicted, expected.argmax(1))


def test_encode_images_pools_image_prefix(task):
    features = task.encode_images(IMAGES)
    backbone = task.backbone
    images = IMAGES.astype("float32") / 127.5 - 1.0
    outputs = backbone(
        {
            "images": images,
            "token_ids": np.ones((2, 3), "int32"),
            "padding_mask": np.ones((2, 3), bool),
            "text_first_mask": np.zeros(2, bool),
        }
    )
    prefix = to_numpy(outputs["hidden_states"])[:, : backbone.num_image_tokens + 1]
    assert features["pooled"].shape == (2, backbone.hidden_dim)
    np.testing.assert_allclose(features["pooled"], prefix.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        features["image_tokens"],
        to_numpy(outputs["image_tokens"]),
        rtol=1e-5,
        atol=1e-6,
    )


# --- Serialization ---------------------------------------------------------------


def test_get_config_round_trip_keeps_training_arguments():
    arguments = {
        "training_steps": 7,
        "text_prefix_prob": 0.25,
        "noise_scale": 32.0,
        "noise_min": 2.0,
        "input_noise_std": 0.2,
        "label_drop_rate": 0.3,
        "text_loss_weight": 0.5,
        "loss_on_prefix": True,
        "rgb_noise_on_image_prefix": False,
        "stop_flow_gradient_on_prefix": False,
        "seed": 5,
    }
    task = make_task(**arguments)
    config = task.get_config()
    for name, value in arguments.items():
        assert config[name] == value, name
    restored = JetFormerCausalLM.from_config(config)
    assert restored.training_config == task.training_config
    assert restored.backbone.get_config() == task.backbone.get_config()
    assert restored.preprocessor.get_config() == task.preprocessor.get_config()


def test_keras_file_round_trip_keeps_tokenizer(task, tmp_path):
    path = str(tmp_path / "causal_lm.keras")
    task.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, JetFormerCausalLM)
    assert isinstance(restored.preprocessor.tokenizer, JetFormerTokenizer)
    assert restored.training_config == task.training_config
    np.testing.assert_array_equal(
        to_numpy(restored.preprocessor.tokenizer(["a photo of a cat"])),
        to_numpy(task.preprocessor.tokenizer(["a photo of a cat"])),
    )
    np.testing.assert_allclose(
        restored.score(IMAGES, TEXTS), task.score(IMAGES, TEXTS), rtol=1e-6
    )


# --- Argument checks ---------------------------------------------------------------


def test_rejects_bad_arguments(task):
    with pytest.raises(ValueError, match="weighted_metrics"):
        task.compile(weighted_metrics=["accuracy"])
    with pytest.raises(ValueError, match="loss"):
        task.compile(loss="mse")
    with pytest.raises(ValueError, match="sampler='no_such_sampler'"):
        task.compile(sampler="no_such_sampler")
    task.compile(sampler="greedy")
    with pytest.raises(TypeError, match="text_prefix=0.5"):
        make_task(text_prefix=0.5)
    with pytest.raises(TypeError, match="texts='a cat'"):
        task.score(IMAGES, "a cat")
    with pytest.raises(ValueError, match="at least one"):
        task.score(IMAGES, [])
    with pytest.raises(ValueError, match="batch_size=0"):
        task.score(IMAGES, TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="images.shape"):
        task.score(IMAGES[0], TEXTS)
    with pytest.raises(ValueError, match="template='a photo'"):
        task.classify(IMAGES, ["cat"], template="a photo")
    preprocessor = task.preprocessor
    task.preprocessor = None
    try:
        with pytest.raises(ValueError, match="preprocessor=None"):
            task.score(IMAGES, TEXTS)
        with pytest.raises(ValueError, match="stop_token_ids"):
            task.generate({"images": IMAGES})
    finally:
        task.preprocessor = preprocessor


# --- keras-hub task checks -----------------------------------------------------------


class JetFormerCausalLMTaskTest(TestCase):
    def test_task_basics(self):
        task = make_task(seed=1)
        train_data = (
            {
                "images": IMAGES,
                "prompts": list(PROMPTS),
                "responses": ["a cat", "a dog"],
            },
        )
        self.run_task_test(
            cls=JetFormerCausalLM,
            init_kwargs={
                "backbone": task.backbone,
                "preprocessor": task.preprocessor,
            },
            train_data=train_data,
            expected_output_shape=(
                2,
                SEQUENCE_LENGTH,
                task.backbone.vocabulary_size,
            ),
        )
