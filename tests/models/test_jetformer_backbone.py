"""`JetFormerBackbone`: keras-hub conventions, sequence layout, config."""

import numpy as np
import pytest
from jetformer_test_utils import TEXT_LENGTH
from jetformer_test_utils import TINY_BACKBONE_CONFIG
from jetformer_test_utils import perturb_weights
from jetformer_test_utils import tiny_backbone
from jetformer_test_utils import tiny_batch
from keras import ops
from keras_hub.src.tests.test_case import TestCase

from keras_jetformer.models import JetFormerBackbone


def backbone_inputs(batch_size=2, text_first=(True, False)):
    batch = tiny_batch(batch_size)
    return {
        "images": batch["images"],
        "token_ids": batch["token_ids"],
        "padding_mask": batch["padding_mask"],
        "text_first_mask": np.array(text_first, bool),
    }


class JetFormerBackboneTest(TestCase):
    def test_backbone_basics(self):
        inputs = backbone_inputs()
        num_tokens = 16
        self.run_backbone_test(
            cls=JetFormerBackbone,
            init_kwargs=TINY_BACKBONE_CONFIG,
            input_data=inputs,
            expected_output_shape={
                "image_tokens": (2, num_tokens, 4),
                "logdet": (2,),
                "hidden_states": (2, TEXT_LENGTH + num_tokens + 1, 16),
                "text_logits": (2, TEXT_LENGTH, 13),
                "image_logits": (2, num_tokens, 3 * (1 + 2 * 2)),
            },
            variable_length_data=[
                {
                    **inputs,
                    "token_ids": inputs["token_ids"][:, :length],
                    "padding_mask": inputs["padding_mask"][:, :length],
                }
                for length in (1, 2, 3)
            ],
            # The flow log-determinant and mixture head are float32 by
            # design; mixed precision is covered by the training tests.
            run_mixed_precision_check=False,
            run_quantization_check=False,
        )

    def test_config_round_trip_changes_every_argument(self):
        changed = {
            **TINY_BACKBONE_CONFIG,
            "num_vocab_repeats": 2,
            "flow_coupling_kinds": ("spatial", "channels"),
            "flow_spatial_patterns": ("hstripes",),
            "flow_intermediate_dim": 12,
            "scale_tol": 1e-5,
            "dropout": 0.1,
            "flow_dropout": 0.05,
            "rope_max_wavelength": 500,
            "bos_id": 0,
            "boi_id": 1,
            "nolabel_id": 2,
        }
        backbone = JetFormerBackbone(**changed)
        config = backbone.get_config()
        for name, value in changed.items():
            if isinstance(value, tuple):
                assert tuple(config[name]) == value, name
            else:
                assert config[name] == value, name
        restored = JetFormerBackbone.from_config(config)
        assert restored.get_config() == config
        assert restored.count_params() == backbone.count_params()

    def test_untied_text_logits_have_own_weights(self):
        backbone = tiny_backbone(tie_text_embeddings=False)
        names = [weight.path for weight in backbone.weights]
        assert any("reverse_embeddings" in name for name in names)

    def test_orders_differ_and_select_per_example(self):
        backbone = tiny_backbone()
        perturb_weights(backbone, scale=0.2)
        mixed = backbone(backbone_inputs(2, (True, False)))
        text_first = backbone(backbone_inputs(2, (True, True)))
        image_first = backbone(backbone_inputs(2, (False, False)))
        for key in ("image_logits", "text_logits"):
            mixed_value = ops.convert_to_numpy(mixed[key])
            self.assertAllClose(
                mixed_value[0], ops.convert_to_numpy(text_first[key])[0]
            )
            self.assertAllClose(
                mixed_value[1], ops.convert_to_numpy(image_first[key])[1]
            )
            assert not np.allclose(
                ops.convert_to_numpy(text_first[key])[1],
                ops.convert_to_numpy(image_first[key])[1],
            )

    def test_text_padding_does_not_change_image_outputs(self):
        # Padding keeps its slot but is masked and does not advance the
        # rotary positions: the image outputs equal those of unpadded text.
        backbone = tiny_backbone()
        perturb_weights(backbone, scale=0.2)
        inputs = backbone_inputs(2, (True, True))
        inputs["padding_mask"] = np.ones_like(inputs["padding_mask"])
        short = {
            **inputs,
            "token_ids": inputs["token_ids"][:, :2],
            "padding_mask": inputs["padding_mask"][:, :2],
        }
        padded = dict(inputs)
        padded["padding_mask"] = inputs["padding_mask"].copy()
        padded["padding_mask"][:, 2:] = False
        self.assertAllClose(
            ops.convert_to_numpy(backbone(short)["image_logits"]),
            ops.convert_to_numpy(backbone(padded)["image_logits"]),
            atol=1e-5,
        )

    def test_vocabulary_repeats_embed_text_repeatedly(self):
        backbone = tiny_backbone(num_vocab_repeats=3)
        table = backbone.token_embedding.embeddings
        assert tuple(table.shape) == (3 * 13, 16)
        outputs = backbone(backbone_inputs())
        assert tuple(outputs["hidden_states"].shape) == (
            2,
            3 * TEXT_LENGTH + 16 + 1,
            16,
        )
        assert tuple(outputs["text_logits"].shape) == (2, TEXT_LENGTH, 39)

    def test_decode_images_inverts_encode_images(self):
        backbone = tiny_backbone()
        perturb_weights(backbone, scale=0.2)
        images = tiny_batch(2)["images"]
        tokens, _ = backbone.encode_images(images)
        restored = ops.convert_to_numpy(backbone.decode_images(tokens))
        self.assertAllClose(restored, images, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"image_shape": (8, 8)}, "image_shape"),
        ({"patch_size": 3}, "divisible by `patch_size`"),
        ({"image_token_dim": 5}, "image_token_dim"),
        ({"num_mixtures": 0}, "num_mixtures"),
        ({"bos_id": 13}, "bos_id"),
        ({"num_query_heads": 3, "num_key_value_heads": 2}, "num_query_heads"),
        (
            {"tie_text_embeddings": False, "num_vocab_repeats": 2},
            "Untied text logits",
        ),
        ({"flow_coupling_kinds": ("diagonal",)}, "coupling_kinds"),
    ],
)
def test_invalid_arguments_raise(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        JetFormerBackbone(**{**TINY_BACKBONE_CONFIG, **overrides})
