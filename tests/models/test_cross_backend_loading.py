"""Presets and `.keras` files saved on any backend load on this one.

A subprocess per backend (`cross_backend_worker.py`) saves a tiny
text-to-image task as a preset and as a `.keras` file, with the weights and
backbone outputs it computed. This process loads each of them on the
current backend: the weights must be bitwise equal and the outputs equal up
to float32 rounding. Running the suite on jax, tensorflow and torch covers
every (saving, loading) pair.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from cross_backend_worker import backbone_outputs

from keras_jetformer.models import JetFormerTextToImage

BACKENDS = ("jax", "tensorflow", "torch")
WORKER = os.path.join(os.path.dirname(__file__), "cross_backend_worker.py")
# Different backends use different float32 kernels (matmul order, erf,
# softmax), so outputs agree to rounding, not bitwise.
OUTPUT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Start one saving subprocess per backend; return their directories."""
    root = tmp_path_factory.mktemp("cross_backend")
    processes = {}
    for backend in BACKENDS:
        directory = root / backend
        directory.mkdir()
        environment = {**os.environ, "KERAS_BACKEND": backend}
        processes[backend] = (
            directory,
            subprocess.Popen(
                [sys.executable, WORKER, str(directory)],
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    directories = {}
    for backend, (directory, process) in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-4000:]
        directories[backend] = directory
    return directories


def check_against_reference(backbone, reference):
    for variable in backbone.weights:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable),
            reference[f"weight/{variable.path}"],
            err_msg=variable.path,
        )
    outputs = backbone_outputs(backbone)
    assert set(outputs) == {
        name for name in reference.files if name.startswith("output/")
    }
    for name, value in outputs.items():
        np.testing.assert_allclose(
            value,
            reference[name],
            rtol=OUTPUT_TOLERANCE,
            atol=OUTPUT_TOLERANCE,
            err_msg=name,
        )
    return outputs


@pytest.mark.parametrize("saving_backend", BACKENDS)
def test_load_on_current_backend(saved, saving_backend):
    directory = saved[saving_backend]
    reference = np.load(directory / "reference.npz")
    assert str(reference["backend"]) == saving_backend

    from_preset = JetFormerTextToImage.from_preset(str(directory / "preset"))
    preset_outputs = check_against_reference(from_preset.backbone, reference)

    # `safe_mode=True` refuses files with lambdas or other pickled code.
    from_file = keras.saving.load_model(
        directory / "model.keras", safe_mode=True
    )
    file_outputs = check_against_reference(from_file.backbone, reference)
    for name, value in preset_outputs.items():
        np.testing.assert_array_equal(file_outputs[name], value, err_msg=name)
