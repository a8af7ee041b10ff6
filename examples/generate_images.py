"""Generate images from text prompts with a JetFormer preset.

    python examples/generate_images.py --preset jetformer_tiny_mnist \\
        --prompt "a handwritten seven" --prompt "a handwritten two" \\
        --num-images 8 --out grid.png

Loads `JetFormerTextToImage.from_preset(NAME)`, where NAME is a built-in
preset with trained weights or a preset directory written by
`save_to_preset`, and writes one PNG grid with a row of `--num-images`
images per prompt. Select the backend with `--backend` (or
`KERAS_BACKEND`): jax, tensorflow or torch.
"""

import argparse
import os
import sys
import time


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
        "--prompt",
        action="append",
        required=True,
        help="Text prompt; repeat the option for several prompts. Each "
        "prompt gets one row of the grid.",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=4,
        help="Images per prompt (columns of the grid).",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=3.0,
        help="Classifier-free guidance weight w in (1 + w) log p(x | text) "
        "- w log p(x); 0 turns guidance off.",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.9,
        help="Multiplier of the mixture components' standard deviations; "
        "below 1 gives cleaner, less varied images.",
    )
    parser.add_argument(
        "--mixture-temperature",
        type=float,
        default=1.0,
        help="Divisor of the mixture logits; below 1 picks likely mixture "
        "components more often.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the sampling noise."
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Images generated per compiled call; lower it to save memory. "
        "Defaults to all images at once.",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="Integer upscaling factor of the written grid (nearest "
        "neighbour), so that small images are visible.",
    )
    parser.add_argument("--out", required=True, help="Path of the PNG grid.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace --out if it exists.",
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=os.environ.get("KERAS_BACKEND") or "jax",
        help="Keras backend.",
    )
    args = parser.parse_args(argv)

    for name in ("num_images", "scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1.")
    if args.guidance_scale < 0:
        parser.error("--guidance-scale must be non-negative.")
    if args.temperature <= 0 or args.mixture_temperature <= 0:
        parser.error("--temperature and --mixture-temperature must be positive.")
    if any(not prompt.strip() for prompt in args.prompt):
        parser.error("--prompt must not be empty.")
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out must be a .png file. Received: {args.out}")
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(
            f"{args.out} already exists. Pass --overwrite to replace it, or "
            "choose another --out."
        )
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"The folder of --out does not exist: {out_dir}")
    return args


def image_grid(images, rows, scale=1):
    """Tile uint8 `images` `[rows * cols, H, W, C]` into one `[H', W', C]`
    array with a one-pixel black border around every image."""
    import numpy as np

    count, height, width, channels = images.shape
    cols = count // rows
    grid = images.reshape(rows, cols, height, width, channels)
    grid = np.pad(grid, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(
        rows * (height + 2), cols * (width + 2), channels
    )
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_png(array, path):
    from PIL import Image

    if array.shape[-1] == 1:
        array = array[..., 0]
    Image.fromarray(array).save(path)


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend

    from keras_jetformer.models import JetFormerTextToImage
    from keras_jetformer.models.jetformer_presets import check_preset

    try:
        check_preset(args.preset, load_weights=True)
    except ValueError as error:
        sys.exit(f"error: {error}")

    started = time.time()
    print(f"Loading {args.preset} ...", flush=True)
    try:
        text_to_image = JetFormerTextToImage.from_preset(args.preset)
    except FileNotFoundError as error:
        sys.exit(f"error: {args.preset} is not a complete preset: {error}")
    if text_to_image.preprocessor is None:
        sys.exit(
            f"error: the preset {args.preset} has no preprocessor, so it "
            "cannot tokenize text prompts."
        )
    height, width, channels = text_to_image.backbone.image_shape
    total = len(args.prompt) * args.num_images
    print(
        f"Generating {total} images of {height}x{width}x{channels} "
        f"({len(args.prompt)} prompts x {args.num_images}) on "
        f"{args.backend} ...",
        flush=True,
    )
    prompts = [prompt for prompt in args.prompt for _ in range(args.num_images)]
    images = text_to_image.generate(
        prompts,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        mixture_temperature=args.mixture_temperature,
        seed=args.seed,
        batch_size=args.batch_size,
        verbose=1,
    )
    save_png(image_grid(images, len(args.prompt), args.scale), args.out)
    print(
        f"Wrote {args.out}: {len(args.prompt)} rows (one per prompt) of "
        f"{args.num_images} images, in {time.time() - started:.1f} s."
    )


if __name__ == "__main__":
    main()
