"""Save a tiny JetFormer on one backend for `test_cross_backend_loading.py`.

Run as a script with the saving backend in `KERAS_BACKEND`:

    KERAS_BACKEND=torch python tests/models/cross_backend_worker.py DIRECTORY

It writes into DIRECTORY a preset (`preset/`), a `.keras` file
(`model.keras`) and `reference.npz`: the backbone weights and the backbone
outputs on `reference_inputs()`, computed on the saving backend.
"""

import os
import sys

import numpy as np

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS_DIR)

BATCH_SIZE = 2


def reference_inputs(backbone):
    """Fixed backbone inputs: both sequence orders, one padded prompt."""
    rng = np.random.default_rng(0)
    height, width, channels = backbone.image_shape
    pixels = rng.integers(0, 256, (BATCH_SIZE, height, width, channels))
    padding_mask = np.ones((BATCH_SIZE, 8), bool)
    padding_mask[0, -2:] = False
    return {
        "images": (pixels / 127.5 - 1.0).astype("float32"),
        "token_ids": rng.integers(
            0, backbone.vocabulary_size - 3, (BATCH_SIZE, 8)
        ).astype("int32"),
        "padding_mask": padding_mask,
        "text_first_mask": np.array([True, False]),
    }


def backbone_outputs(backbone):
    """Backbone outputs on `reference_inputs()` as a dict of numpy arrays."""
    import keras

    outputs = backbone(reference_inputs(backbone))
    return {
        f"output/{name}": keras.ops.convert_to_numpy(value)
        for name, value in outputs.items()
    }


def backbone_weights(backbone):
    import keras

    return {
        f"weight/{variable.path}": keras.ops.convert_to_numpy(variable)
        for variable in backbone.weights
    }


def main(directory):
    import keras
    from jetformer_preset_utils import tiny_text_to_image
    from jetformer_test_utils import perturb_weights

    task = tiny_text_to_image(seed=0)
    # Random weights everywhere, so that no output depends on zeros only.
    perturb_weights(task.backbone, scale=0.1, seed=0)
    task.save_to_preset(os.path.join(directory, "preset"))
    task.save(os.path.join(directory, "model.keras"))
    np.savez(
        os.path.join(directory, "reference.npz"),
        backend=keras.config.backend(),
        **backbone_outputs(task.backbone),
        **backbone_weights(task.backbone),
    )


if __name__ == "__main__":
    main(sys.argv[1])
