"""Caption image files with a JetFormer preset.

    python examples/caption_images.py --preset jetformer_tiny_mnist \\
        digit_0.png digit_1.png --sampler top_k

Loads `JetFormerCausalLM.from_preset(NAME)`, where NAME is a built-in preset
with trained weights or a preset directory written by `save_to_preset`,
reads each image file with Pillow, converts it to the model's channel count
and size (center crop to the model's aspect ratio, then resize), and prints
one caption per image. Select the backend with `--backend` (or
`KERAS_BACKEND`): jax, tensorflow or torch.
"""

import argparse
import os
import sys
import time

SAMPLERS = ("greedy", "top_k", "top_p")


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
        "images", nargs="+", metavar="IMAGE", help="Image files to caption."
    )
    parser.add_argument(
        "--prompt",
        default="",
        help="Text that every caption continues; the printed caption "
        "excludes it.",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="Maximum length of prompt plus caption, in tokens. Defaults to "
        "the preset's sequence length.",
    )
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="greedy",
        help="Decoding: the most likely token (greedy), or a random draw "
        "from the top-k tokens or from the smallest set of tokens whose "
        "probability reaches top-p.",
    )
    parser.add_argument(
        "--top-k", type=int, default=5, help="k of the top_k sampler."
    )
    parser.add_argument(
        "--top-p", type=float, default=0.9, help="p of the top_p sampler."
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="Divisor of the text logits for the top_k and top_p samplers.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the top_k and top_p draws."
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="Images captioned per call of the compiled decoder.",
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=os.environ.get("KERAS_BACKEND") or "jax",
        help="Keras backend.",
    )
    args = parser.parse_args(argv)

    if args.max_length is not None and args.max_length < 1:
        parser.error("--max-length must be at least 1.")
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1.")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1].")
    if args.temperature <= 0:
        parser.error("--temperature must be positive.")
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        parser.error(f"Image files not found: {', '.join(missing)}")
    return args


def load_images(paths, image_shape):
    """Read image files into uint8 `[B, H, W, C]` for `image_shape`.

    Each image is converted to grayscale (`C = 1`) or RGB (`C = 3`), center
    cropped to the aspect ratio of `(H, W)` and resized with bicubic
    interpolation. Raises `ValueError` for files that Pillow cannot read.
    """
    import numpy as np
    from PIL import Image
    from PIL import ImageOps
    from PIL import UnidentifiedImageError

    height, width, channels = image_shape
    if channels not in (1, 3):
        raise ValueError(
            "Image files can be converted to 1 or 3 channels only. "
            f"Received: image_shape={tuple(image_shape)}"
        )
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                image = ImageOps.fit(
                    image, (width, height), method=Image.Resampling.BICUBIC
                )
        except UnidentifiedImageError as error:
            raise ValueError(f"{path} is not an image file Pillow can read.") from error
        array = np.asarray(image, dtype="uint8")
        arrays.append(array.reshape(height, width, channels))
    return np.stack(arrays)


def make_sampler(args):
    import keras_hub

    if args.sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    if args.sampler == "top_k":
        return keras_hub.samplers.TopKSampler(
            k=args.top_k, seed=args.seed, temperature=args.temperature
        )
    return keras_hub.samplers.TopPSampler(
        p=args.top_p, seed=args.seed, temperature=args.temperature
    )


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
    causal_lm.compile(sampler=make_sampler(args))
    try:
        images = load_images(args.images, causal_lm.backbone.image_shape)
    except ValueError as error:
        sys.exit(f"error: {error}")

    print(
        f"Captioning {len(images)} images with the {args.sampler} sampler "
        f"on {args.backend} ...",
        flush=True,
    )
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        captions = causal_lm.generate(
            {"images": batch, "prompts": [args.prompt] * len(batch)},
            max_length=args.max_length,
            strip_prompt=True,
        )
        if isinstance(captions, str):
            captions = [captions]
        for path, caption in zip(args.images[start:], captions):
            print(f"{path}: {caption.strip()}", flush=True)
    print(f"Captioned {len(images)} images in {time.time() - started:.1f} s.")


if __name__ == "__main__":
    main()
