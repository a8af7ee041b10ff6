"""Classify image files zero-shot with a JetFormer preset.

    python examples/zero_shot_classify.py --preset jetformer_tiny_mnist \\
        digit.png --classes zero one two three four five six seven eight \\
        nine --template "a handwritten {}"

Loads `JetFormerCausalLM.from_preset(NAME)`, where NAME is a built-in preset
with trained weights or a preset directory written by `save_to_preset`,
fills the template with each class name, and scores every caption by its
log-likelihood given the image (`JetFormerCausalLM.classify`). Prints the
predicted class and the score of every class per image. Images are read as
in `caption_images.py`. Select the backend with `--backend` (or
`KERAS_BACKEND`): jax, tensorflow or torch.
"""

import argparse
import os
import sys
import time

from caption_images import load_images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        required=True,
        help="Built-in preset name with trained weights (e.g. "
        "jetformer_tiny_mnist) or path of a preset directory.",
    )
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="Image files to classify."
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        required=True,
        metavar="NAME",
        help="Class names, at least two.",
    )
    parser.add_argument(
        "--template",
        default="{}",
        help="Caption pattern; {} is replaced by each class name.",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Maximum (image, caption) pairs scored per forward pass; lower "
        "it to save memory. Defaults to all pairs at once.",
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=os.environ.get("KERAS_BACKEND") or "jax",
        help="Keras backend.",
    )
    args = parser.parse_args(argv)

    if len(args.classes) < 2:
        parser.error("--classes needs at least two class names.")
    if len(set(args.classes)) != len(args.classes):
        parser.error("--classes must not repeat a name.")
    if args.template.count("{}") != 1:
        parser.error(
            "--template must contain {} exactly once. "
            f"Received: {args.template!r}"
        )
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1.")
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        parser.error(f"Image files not found: {', '.join(missing)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend

    from keras_jetformer.models import JetFormerCausalLM
    from keras_jetformer.models.jetformer_presets import check_preset

    try:
        check_preset(args.preset, load_weights=True)
    except ValueError as error:
        sys.exit(f"error: {error}")

    started = time.time()
    print(f"Loading {args.preset} ...", flush=True)
    try:
        causal_lm = JetFormerCausalLM.from_preset(args.preset)
    except FileNotFoundError as error:
        sys.exit(f"error: {args.preset} is not a complete preset: {error}")
    try:
        images = load_images(args.images, causal_lm.backbone.image_shape)
    except ValueError as error:
        sys.exit(f"error: {error}")

    print(
        f"Scoring {len(images)} images against {len(args.classes)} captions "
        f"on {args.backend} ...",
        flush=True,
    )
    predicted, scores = causal_lm.classify(
        images, args.classes, template=args.template, batch_size=args.batch_size
    )
    width = max(len(name) for name in args.classes)
    for path, index, row in zip(args.images, predicted, scores):
        print(f"{path}: {args.classes[index]}")
        for name, score in zip(args.classes, row):
            print(f"  {name:<{width}}  {score:9.3f}")
    print(
        "Scores are log-likelihoods of the captions in nats (higher is more "
        f"likely). Classified {len(images)} images in "
        f"{time.time() - started:.1f} s."
    )


if __name__ == "__main__":
    main()
