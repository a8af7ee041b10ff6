"""`JetFormerBackbone.get_layout_map` and the memory estimate built on it.

Only the layout map's lookup by variable path is used here, which needs no
devices; `tests/training/test_jax_distribution.py` shards a model with it.
"""

import os
import sys

import keras
import numpy as np
import pytest

from jetformer_test_utils import TINY_BACKBONE_CONFIG
from jetformer_test_utils import tiny_backbone

from keras_jetformer.models import JetFormerBackbone

TOOLS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "tools"
)

pytestmark = pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="keras.distribution is not implemented for the torch backend.",
)


def make_mesh(axis_names=("batch", "model")):
    return keras.distribution.DeviceMesh(
        shape=(1, 1), axis_names=axis_names, devices=["cpu:0"]
    )


def is_sharded(layout_map, variable):
    layout = layout_map[variable.path]
    return layout is not None and any(axis for axis in layout.axes)


@pytest.fixture(scope="module")
def backbone():
    # Untied logits add the reverse embeddings; spatial couplings put the
    # permutation over tokens.
    return tiny_backbone(
        tie_text_embeddings=False,
        flow_coupling_kinds=("channels", "spatial"),
    )


def test_kernels_and_embeddings_are_sharded(backbone):
    layout_map = JetFormerBackbone.get_layout_map(make_mesh())
    for variable in backbone.weights:
        name = variable.path.split("/")[-1]
        large = name in (
            "kernel",
            "embeddings",
            "reverse_embeddings",
            "position_embedding",
        )
        # The image embedding `[d, E]` is small and stays replicated.
        expected = large and "image_embedding" not in variable.path
        assert is_sharded(layout_map, variable) == expected, variable.path


def test_permutations_are_replicated(backbone):
    layout_map = JetFormerBackbone.get_layout_map(make_mesh())
    permutations = [v for v in backbone.weights if "permutation" in v.path]
    assert len(permutations) == TINY_BACKBONE_CONFIG["flow_num_couplings"]
    for variable in permutations:
        assert layout_map[variable.path].axes == (None,)


def test_layout_axes_match_variable_ranks(backbone):
    layout_map = JetFormerBackbone.get_layout_map(make_mesh())
    for variable in backbone.weights:
        layout = layout_map[variable.path]
        if layout is not None:
            assert len(layout.axes) == len(variable.shape), variable.path


def test_memory_estimate_counts_sharded_parameters(backbone):
    sys.path.insert(0, TOOLS_DIR)
    try:
        from estimate_training_memory import split_parameter_counts
    finally:
        sys.path.pop(0)
    layout_map = JetFormerBackbone.get_layout_map(make_mesh())
    sharded = sum(
        int(np.prod(variable.shape))
        for variable in backbone.weights
        if is_sharded(layout_map, variable)
    )
    config = backbone.get_config()
    estimated_sharded, estimated_replicated = split_parameter_counts(config)
    assert estimated_sharded == sharded
    assert estimated_sharded + estimated_replicated == backbone.count_params()


def test_custom_axis_names():
    mesh = make_mesh(axis_names=("data", "shard"))
    layout_map = JetFormerBackbone.get_layout_map(
        mesh, model_parallel_dim_name="shard", data_parallel_dim_name="data"
    )
    layout = layout_map["transformer/decoder_block_0/ffw_down/kernel"]
    assert layout.axes == ("shard", None)


def test_rejects_missing_axis():
    with pytest.raises(ValueError, match="must be an axis of `device_mesh`"):
        JetFormerBackbone.get_layout_map(
            make_mesh(), model_parallel_dim_name="tensor"
        )


def test_rejects_non_mesh():
    with pytest.raises(ValueError, match="must be a `keras.distribution"):
        JetFormerBackbone.get_layout_map((2, 4))
