"""Packing of images, prompts and responses for `JetFormerCausalLM`."""

import numpy as np
import pytest
import tensorflow as tf
from keras_hub.src.tests.test_case import TestCase

from keras_jetformer.models import JetFormerCausalLMPreprocessor
from keras_jetformer.models import JetFormerImageConverter
from keras_jetformer.models import JetFormerTokenizer
from keras_jetformer.models import compute_jetformer_tokenizer_proto

SENTENCES = ["a photo of a cat", "a photo of a dog", "caption this image"]
PROTO = compute_jetformer_tokenizer_proto(SENTENCES)


def make_tokenizer():
    return JetFormerTokenizer(proto=PROTO)


def word_ids(tokenizer, text):
    return [int(token) for token in np.asarray(tokenizer(text))]


class JetFormerCausalLMPreprocessorTest(TestCase):
    def setUp(self):
        self.tokenizer = make_tokenizer()
        self.end_id = self.tokenizer.end_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.init_kwargs = {
            "tokenizer": self.tokenizer,
            "image_converter": JetFormerImageConverter(),
            "sequence_length": 6,
        }
        self.images = np.stack(
            [np.zeros((2, 2, 1), "uint8"), np.full((2, 2, 1), 255, "uint8")]
        )
        self.input_data = {
            "images": self.images,
            "prompts": ["caption", ""],
            "responses": ["a cat", "a photo of a dog"],
        }

    def expected_rows(self):
        ids = lambda text: word_ids(self.tokenizer, text)  # noqa: E731
        caption, a_cat = ids("caption"), ids("a cat")
        # Row 0: prompt (1) + response (2) + end; row 1: response (5) + end.
        first = caption + a_cat + [self.end_id]
        second = ids("a photo of a dog") + [self.end_id]
        return first, second, len(caption)

    def test_preprocessor_basics(self):
        first, second, prompt_length = self.expected_rows()
        token_ids = np.array(
            [first + [self.pad_id] * (6 - len(first)), second], "int32"
        )
        padding_mask = np.array(
            [[True] * len(first) + [False] * (6 - len(first)), [True] * 6]
        )
        loss_mask = padding_mask.copy()
        loss_mask[0, :prompt_length] = False
        self.run_preprocessor_test(
            cls=JetFormerCausalLMPreprocessor,
            init_kwargs=self.init_kwargs,
            input_data=(self.input_data,),
            expected_output=(
                {
                    "images": self.images / 127.5 - 1.0,
                    "token_ids": token_ids,
                    "padding_mask": padding_mask,
                    "loss_mask": loss_mask,
                },
                token_ids,
                loss_mask,
            ),
        )

    def test_missing_prompts_count_as_empty(self):
        preprocessor = JetFormerCausalLMPreprocessor(**self.init_kwargs)
        without, _, _ = preprocessor(
            {"images": self.images, "responses": self.input_data["responses"]}
        )
        empty, _, _ = preprocessor({**self.input_data, "prompts": ["", ""]})
        for key in ("token_ids", "padding_mask", "loss_mask"):
            self.assertAllEqual(without[key], empty[key])

    def test_truncation_keeps_prompt_and_end_token(self):
        preprocessor = JetFormerCausalLMPreprocessor(
            **{**self.init_kwargs, "sequence_length": 4}
        )
        outputs, _, _ = preprocessor(
            {
                "images": self.images[:1],
                "prompts": ["caption"],
                "responses": ["a photo of a dog"],
            }
        )
        expected = (
            word_ids(self.tokenizer, "caption")
            + word_ids(self.tokenizer, "a photo")
            + [self.end_id]
        )
        self.assertAllEqual(outputs["token_ids"], [expected])
        self.assertAllEqual(outputs["loss_mask"], [[False, True, True, True]])

    def test_attend_to_padding_pads_with_scored_end_tokens(self):
        preprocessor = JetFormerCausalLMPreprocessor(
            **self.init_kwargs, attend_to_padding=True
        )
        outputs, _, _ = preprocessor(self.input_data)
        first, _, prompt_length = self.expected_rows()
        padding = 6 - len(first)
        self.assertAllEqual(
            outputs["token_ids"][0], first + [self.end_id] * padding
        )
        self.assertAllEqual(outputs["padding_mask"], np.ones((2, 6), bool))
        self.assertAllEqual(
            outputs["loss_mask"][0],
            [False] * prompt_length + [True] * (6 - prompt_length),
        )

    def test_generate_preprocess_packs_prompt_only(self):
        preprocessor = JetFormerCausalLMPreprocessor(
            **self.init_kwargs, attend_to_padding=True
        )
        outputs = preprocessor.generate_preprocess(
            {"images": self.images, "prompts": ["caption", "a photo of"]}
        )
        caption = word_ids(self.tokenizer, "caption")
        photo = word_ids(self.tokenizer, "a photo of")
        self.assertEqual(set(outputs), {"images", "token_ids", "padding_mask"})
        self.assertAllEqual(
            outputs["token_ids"],
            [
                caption + [self.pad_id] * 5,
                photo + [self.pad_id] * 3,
            ],
        )
        self.assertAllEqual(
            outputs["padding_mask"],
            [[True] + [False] * 5, [True] * 3 + [False] * 3],
        )
        self.assertAllClose(outputs["images"], self.images / 127.5 - 1.0)

    def test_generate_preprocess_in_dataset(self):
        preprocessor = JetFormerCausalLMPreprocessor(**self.init_kwargs)
        inputs = {"images": self.images, "prompts": ["caption", ""]}
        eager = preprocessor.generate_preprocess(inputs)
        dataset = tf.data.Dataset.from_tensor_slices(inputs)
        batched = dataset.batch(2).map(preprocessor.generate_preprocess)
        graph = batched.get_single_element()
        for key in ("token_ids", "padding_mask", "images"):
            self.assertAllClose(eager[key], graph[key])

    def test_generate_postprocess_cuts_at_end_token(self):
        preprocessor = JetFormerCausalLMPreprocessor(**self.init_kwargs)
        cat = word_ids(self.tokenizer, "a cat")
        dog = word_ids(self.tokenizer, "dog")
        # Row 0 continues after its end token, and row 1 has padding.
        token_ids = np.array(
            [
                cat + [self.end_id] + dog + [self.end_id] * 2,
                dog + [self.pad_id] * 5,
            ],
            "int32",
        )
        padding_mask = np.array([[True] * 6, [True] + [False] * 5])
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        self.assertEqual(
            preprocessor.generate_postprocess(inputs), ["a cat", "dog"]
        )
        dataset = tf.data.Dataset.from_tensor_slices(inputs).batch(2)
        graph = dataset.map(preprocessor.generate_postprocess)
        self.assertAllEqual(graph.get_single_element(), ["a cat", "dog"])

    def test_round_trip_through_generate_postprocess(self):
        preprocessor = JetFormerCausalLMPreprocessor(**self.init_kwargs)
        outputs = preprocessor.generate_preprocess(
            {"images": self.images, "prompts": ["a photo of a cat", "dog"]}
        )
        self.assertEqual(
            preprocessor.generate_postprocess(outputs),
            ["a photo of a cat", "dog"],
        )

    def test_get_config_keeps_arguments(self):
        preprocessor = JetFormerCausalLMPreprocessor(
            **{**self.init_kwargs, "sequence_length": 9},
            attend_to_padding=True,
        )
        config = preprocessor.get_config()
        self.assertNotIn("add_start_token", config)
        restored = JetFormerCausalLMPreprocessor.from_config(config)
        self.assertEqual(restored.sequence_length, 9)
        self.assertTrue(restored.attend_to_padding)
        self.assertIsInstance(restored.image_converter, JetFormerImageConverter)

    def test_rejects_bad_arguments(self):
        with pytest.raises(ValueError, match="sequence_length=0"):
            JetFormerCausalLMPreprocessor(self.tokenizer, sequence_length=0)
        with pytest.raises(TypeError, match="attend_to_padding='yes'"):
            JetFormerCausalLMPreprocessor(
                self.tokenizer, attend_to_padding="yes"
            )
        preprocessor = JetFormerCausalLMPreprocessor(**self.init_kwargs)
        with pytest.raises(ValueError, match="responses"):
            preprocessor({"images": self.images, "prompts": ["a", "b"]})
        with pytest.raises(ValueError, match="prompts"):
            preprocessor.generate_preprocess({"images": self.images})

    def test_given_targets_and_weights_pass_through(self):
        preprocessor = JetFormerCausalLMPreprocessor(**self.init_kwargs)
        labels = np.array([1, 0])
        weights = np.array([0.5, 2.0])
        _, y, sample_weight = preprocessor(self.input_data, labels, weights)
        self.assertAllEqual(y, labels)
        self.assertAllEqual(sample_weight, weights)
