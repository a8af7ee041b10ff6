"""Estimate the training memory per device of the JetFormer presets.

    python tools/estimate_training_memory.py [--model-axis 1 8 16 64]

Counts, from each preset's `config.json`, the parameters that
`JetFormerBackbone.get_layout_map` splits over the model axis and those it
replicates. Prints the memory per device of the training state, which is
float32 weights, float32 gradients and Adam's two float32 moments (16 bytes
per parameter), with the split parameters divided by the model-axis size. Data
parallelism alone replicates everything, so its figure is the one for a
model axis of 1.

Activations are not included: they grow with the batch per device and the
sequence length (256 image tokens plus text), and shrink with `remat=True`.
"""

import argparse
import json
import os

# float32 weight, gradient and two Adam moments.
BYTES_PER_PARAMETER = 4 * 4


def split_parameter_counts(config):
    """Return `(sharded, replicated)` parameter counts of a backbone config.

    `sharded` counts the variables that `JetFormerBackbone.get_layout_map`
    splits over the model axis; `replicated` counts the rest (norms,
    biases, the image embedding and the frozen permutations). Their sum is
    `count_backbone_params(config)`.
    """
    from keras_jetformer.models.jetformer_presets import count_backbone_params

    height, width, channels = config["image_shape"]
    patch_size = config["patch_size"]
    flow_patch_size = config.get("flow_patch_size", 1)
    num_tokens = (height // patch_size // flow_patch_size) * (
        width // patch_size // flow_patch_size
    )
    token_dim = (patch_size * flow_patch_size) ** 2 * channels
    flow_width = config["flow_hidden_dim"]
    flow_mlp = config.get("flow_intermediate_dim") or 4 * flow_width

    # Flow: per coupling, the position embedding, the input and output
    # projections and, per ViT block, the attention and MLP kernels.
    vit_block_kernels = 4 * flow_width * flow_width + 2 * flow_width * flow_mlp
    coupling_kernels = (
        num_tokens * flow_width
        + (token_dim // 2) * flow_width
        + flow_width * token_dim
        + config["flow_num_layers"] * vit_block_kernels
    )
    sharded = config["flow_num_couplings"] * coupling_kernels

    # Transformer: embeddings, attention and MLP kernels, mixture head.
    hidden_dim = config["hidden_dim"]
    head_dim = config["head_dim"]
    text_classes = config["vocabulary_size"] * config.get("num_vocab_repeats", 1)
    sharded += text_classes * hidden_dim
    if not config.get("tie_text_embeddings", True):
        sharded += hidden_dim * text_classes
    block_kernels = (
        2 * hidden_dim * config["num_query_heads"] * head_dim
        + 2 * hidden_dim * config["num_key_value_heads"] * head_dim
        + 3 * hidden_dim * config["intermediate_dim"]
    )
    sharded += config["num_layers"] * block_kernels
    head_outputs = config["num_mixtures"] * (1 + 2 * config["image_token_dim"])
    sharded += hidden_dim * head_outputs

    total = count_backbone_params(config)
    return sharded, total - sharded


def training_state_bytes(config, model_axis_size):
    """Bytes per device of weights, gradients and Adam moments."""
    sharded, replicated = split_parameter_counts(config)
    parameters = sharded / model_axis_size + replicated
    return parameters * BYTES_PER_PARAMETER


def preset_configs():
    from keras_jetformer.models.jetformer_presets import ARCHITECTURE_PRESETS
    from keras_jetformer.models.jetformer_presets import preset_directory

    configs = {}
    for name in ARCHITECTURE_PRESETS:
        path = os.path.join(preset_directory(name), "config.json")
        with open(path, encoding="utf-8") as file:
            configs[name] = json.load(file)["config"]
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-axis",
        type=int,
        nargs="+",
        default=[1, 8, 16, 64],
        help="Sizes of the model axis to report.",
    )
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.model_axis):
        parser.error("--model-axis sizes must be at least 1.")

    header = ["preset", "parameters", "sharded"] + [
        f"model axis {size}" for size in args.model_axis
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, config in preset_configs().items():
        sharded, replicated = split_parameter_counts(config)
        total = sharded + replicated
        cells = [
            name,
            f"{total / 1e9:.2f}B",
            f"{100 * sharded / total:.2f}%",
        ]
        for size in args.model_axis:
            gib = training_state_bytes(config, size) / 2**30
            cells.append(f"{gib:.1f} GiB")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
