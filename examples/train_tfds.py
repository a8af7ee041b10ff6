"""Train JetFormer on a TFDS dataset with the published recipes.

    python examples/train_tfds.py --dataset imagenet2012 --size 350m

Class-conditional datasets (imagenet2012, cifar10) model one label token
per image; image-text datasets (coco_captions) model captions and images
in both orders. Each dataset starts from the recipe of the matching
big_vision config (`jetformer_imagenet2012.py` or `jetformer_image_text.py`):
batch size, steps, learning-rate schedule, noise curriculum, classifier-free
guidance dropout, text loss weight and sampling settings. Any of them can be
changed on the command line.

What a real run needs:

- The dataset prepared in the TFDS data directory (`--data-dir`, default
  `~/tensorflow_datasets`), because this script never downloads. Run
  `tfds build cifar10` or `tfds build coco_captions` once; imagenet2012
  needs its archives downloaded by hand into `<data-dir>/downloads/manual`
  first (see the TFDS catalog page of imagenet2012).
- For image-text data, a SentencePiece model (`--tokenizer`); the reference
  uses a 32,000-piece model. Without one, a word-level tokenizer is
  trained on the first `--tokenizer-captions` captions.
- Accelerators: the preset sizes hold 1.1B to 2.7B parameters (the
  mixture head and the flow hold 0.7B to 1B of them), that is 16 to 41 GiB
  of float32 weights, gradients and Adam moments before activations
  (`tools/estimate_training_memory.py`). The 350m size fits one 40 or 80
  GB GPU with a small batch (an estimate, not measured). Larger sizes and
  the published batches (2048 and 4096) need many devices: `--distribution
  data` (JAX or TensorFlow) or `--distribution model --mesh BATCH,MODEL`
  (JAX).

`--mock-examples N` replaces the data by N random examples from
`tfds.testing.mock_data`, a smoke test of the whole run with no data.

Outputs in `--output-dir`: `checkpoints/step_<N>.keras` every
`--checkpoint-every` steps (`--resume` continues from the latest),
TensorBoard logs of every training metric in `logs/`, sample grids
`samples/step_<N>.png` every `--sample-every` steps (also in TensorBoard),
and the final model `model.keras`.
"""

import argparse
import glob
import json
import math
import os
import re
import sys

# The settings of the big_vision JetFormer configs. `steps` for imagenet2012
# is about 100 epochs of the 1,277,071 training images outside the 4,096
# held out.
RECIPES = {
    "imagenet2012": {
        "kind": "class",
        "split": "train[4096:]",
        "batch_size": 2048,
        "steps": 62_400,
        "flip": True,
        "noise_min": 0.0,
        "text_prefix_prob": 1.0,
        "rgb_noise_on_image_prefix": True,
        "text_loss_weight": 1.0,
    },
    # Not a published recipe: the ImageNet recipe, about 100 epochs of 50,000.
    "cifar10": {
        "kind": "class",
        "split": "train",
        "batch_size": 2048,
        "steps": 2_450,
        "flip": True,
        "noise_min": 0.0,
        "text_prefix_prob": 1.0,
        "rgb_noise_on_image_prefix": True,
        "text_loss_weight": 1.0,
    },
    "coco_captions": {
        "kind": "text",
        "split": "train",
        "batch_size": 4096,
        "steps": 500_000,
        "flip": False,
        "noise_min": 3.0,
        "text_prefix_prob": 0.5,
        "rgb_noise_on_image_prefix": False,
        "text_loss_weight": 0.0025,
    },
}
# Shared by both configs.
COMMON_RECIPE = {
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "noise_scale": 64.0,
    "input_noise_std": 0.3,
    "label_drop_rate": 0.1,
    "text_length": 64,
}
# Classifier-free guidance weight and temperature of the sample grids.
SAMPLING = {
    ("class", "350m"): (3.0, 0.94),
    ("class", "750m"): (3.0, 0.94),
    ("class", "1.3b"): (2.0, 0.93),
    ("text", "350m"): (9.0, 0.96),
    ("text", "750m"): (8.0, 0.94),
    ("text", "1.3b"): (6.0, 0.96),
}
PRESETS = {
    ("class", "350m"): "jetformer_350m_imagenet_256",
    ("class", "750m"): "jetformer_750m_imagenet_256",
    ("class", "1.3b"): "jetformer_1_3b_imagenet_256",
    ("text", "350m"): "jetformer_350m_image_text_256",
    ("text", "750m"): "jetformer_750m_image_text_256",
    ("text", "1.3b"): "jetformer_1_3b_image_text_256",
}
SIZES = ("tiny", "350m", "750m", "1.3b")
# A model for smoke tests: 16x16 images of 4x4 patches.
TINY_CONFIG = {
    "patch_size": 4,
    "image_token_dim": 8,
    "num_layers": 2,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "num_mixtures": 4,
    "flow_num_couplings": 2,
    "flow_hidden_dim": 16,
    "flow_num_layers": 1,
    "flow_num_heads": 2,
}
TINY_IMAGE_SIZE = 16
NUM_VOCAB_REPEATS = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="TFDS name, with an optional config and version: "
        f"{', '.join(RECIPES)}.",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="350m",
        help="Model size: a published preset, or `tiny` for smoke tests. "
        "Default: 350m.",
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=os.environ.get("KERAS_BACKEND") or "jax",
        help="Keras backend. Default: $KERAS_BACKEND or jax.",
    )
    parser.add_argument(
        "--distribution",
        choices=("none", "data", "model"),
        default="none",
        help="`data`: replicate the model and split each batch over all "
        "devices (JAX `keras.distribution.DataParallel`, TensorFlow "
        "`MirroredStrategy`). `model`: shard the weights and optimizer "
        "state with `JetFormerBackbone.get_layout_map` over the model axis "
        "of `--mesh` (JAX only). Default: none.",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        help="Device mesh `BATCH,MODEL` for --distribution model, e.g. "
        "`2,4` for 8 devices. Default: 1,<number of devices>.",
    )
    parser.add_argument(
        "--multi-host",
        action="store_true",
        help="Call `keras.distribution.initialize()` before anything else, "
        "as every host of a multi-host TPU slice or GPU cluster must (JAX). "
        "Run the same command on every host.",
    )
    parser.add_argument("--steps", type=int, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, help="Global batch size.")
    parser.add_argument(
        "--learning-rate", type=float, help="Peak learning rate."
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="Side of the square training images, in pixels. Default: 256 "
        f"for the preset sizes, {TINY_IMAGE_SIZE} for tiny.",
    )
    parser.add_argument("--split", help="TFDS split to train on.")
    parser.add_argument("--data-dir", help="TFDS data directory.")
    parser.add_argument(
        "--tokenizer",
        help="SentencePiece model file for image-text data.",
    )
    parser.add_argument(
        "--tokenizer-captions",
        type=int,
        default=100_000,
        help="Captions to train a word-level tokenizer on when --tokenizer "
        "is not given. Default: 100000.",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="Steps between checkpoints. Default: 1000.",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="Number of most recent checkpoints kept. Default: 3.",
    )
    parser.add_argument(
        "--sample-every",
        type=int,
        default=5000,
        help="Steps between sample grids. Default: 5000.",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=16,
        help="Images per sample grid. Default: 16.",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=50,
        help="Steps between TensorBoard points. Default: 50.",
    )
    parser.add_argument(
        "--output-dir",
        default="runs/train_tfds",
        help="Folder for checkpoints, logs, samples and the final model. "
        "Default: runs/train_tfds.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue from the latest checkpoint in --output-dir.",
    )
    parser.add_argument(
        "--mock-examples",
        type=int,
        default=0,
        help="Train on this many random examples from "
        "`tfds.testing.mock_data` instead of the prepared dataset.",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    base_name = args.dataset.split(":")[0].split("/")[0]
    if base_name not in RECIPES:
        parser.error(
            f"--dataset must be one of {', '.join(RECIPES)}; got "
            f"{args.dataset!r}."
        )
    for name in (
        "steps",
        "batch_size",
        "image_size",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
        "num_samples",
        "log_every",
        "tokenizer_captions",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if args.mock_examples < 0:
        parser.error("--mock-examples must be non-negative.")
    if args.mesh is not None:
        if args.distribution != "model":
            parser.error("--mesh needs --distribution model.")
        if not re.fullmatch(r"\d+,\d+", args.mesh):
            parser.error(
                f"--mesh must be two positive integers BATCH,MODEL; got "
                f"{args.mesh!r}."
            )
        args.mesh = tuple(int(size) for size in args.mesh.split(","))
        if min(args.mesh) < 1:
            parser.error(f"--mesh sizes must be at least 1; got {args.mesh}.")
    if args.distribution == "model" and args.backend != "jax":
        parser.error(
            "--distribution model needs --backend jax: weight sharding uses "
            "keras.distribution, which only the JAX backend implements."
        )
    if args.multi_host and (args.backend != "jax" or args.distribution == "none"):
        parser.error(
            "--multi-host needs --backend jax and --distribution data or "
            "model."
        )
    if args.distribution != "none" and args.backend == "torch":
        parser.error(
            "--distribution needs --backend jax or tensorflow: the Keras "
            "torch backend trains on one device."
        )
    return args


def resolve_recipe(args):
    """Return the recipe of `args.dataset` with command-line replacements."""
    recipe = {**COMMON_RECIPE, **RECIPES[args.dataset.split(":")[0].split("/")[0]]}
    for name in ("steps", "batch_size", "learning_rate", "split"):
        if getattr(args, name) is not None:
            recipe[name] = getattr(args, name)
    default_size = TINY_IMAGE_SIZE if args.size == "tiny" else 256
    recipe["image_size"] = args.image_size or default_size
    if args.size == "tiny":
        recipe["text_length"] = 8
    return recipe


# --- Distribution -------------------------------------------------------------


def make_distribution(args, batch_size):
    """Set up the distribution and return the scope to build the model in."""
    import contextlib

    import keras

    if args.distribution == "none":
        return contextlib.nullcontext(), "one device"
    if args.multi_host:
        # NOTE: untested, because the tests run on a single host. Under a
        # distribution, Keras gives each host its share of a `tf.data` input.
        keras.distribution.initialize()
    if args.backend == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        description = (
            f"MirroredStrategy over {strategy.num_replicas_in_sync} replicas"
        )
        return strategy.scope(), description

    from keras_jetformer.models import JetFormerBackbone

    devices = keras.distribution.list_devices()
    if args.distribution == "data":
        distribution = keras.distribution.DataParallel(devices=devices)
        description = f"DataParallel over {len(devices)} devices"
    else:
        mesh_shape = args.mesh or (1, len(devices))
        if mesh_shape[0] * mesh_shape[1] != len(devices):
            sys.exit(
                f"error: --mesh {mesh_shape[0]},{mesh_shape[1]} needs "
                f"{mesh_shape[0] * mesh_shape[1]} devices, but "
                f"{len(devices)} are visible."
            )
        mesh = keras.distribution.DeviceMesh(
            shape=mesh_shape, axis_names=("batch", "model"), devices=devices
        )
        distribution = keras.distribution.ModelParallel(
            layout_map=JetFormerBackbone.get_layout_map(mesh),
            batch_dim_name="batch",
        )
        description = (
            f"ModelParallel on a (batch={mesh_shape[0]}, "
            f"model={mesh_shape[1]}) mesh"
        )
    data_parallel_size = distribution.device_mesh.shape[0]
    if batch_size % data_parallel_size:
        sys.exit(
            f"error: the batch size {batch_size} must be divisible by the "
            f"{data_parallel_size} devices that split each batch."
        )
    keras.distribution.set_distribution(distribution)
    return contextlib.nullcontext(), description


# --- Data -----------------------------------------------------------------------


def load_images(args, recipe, split, shuffle, repeat, seed):
    """TFDS elements as dicts of uint8 "images", "prompts" and "labels"."""
    import warnings

    from keras_jetformer.data import tfds_dataset

    with warnings.catch_warnings():
        # Class-conditional training uses the labels, not the prompts, so
        # unnamed classes do not matter.
        if recipe["kind"] == "class":
            warnings.simplefilter("ignore")
        return tfds_dataset(
            args.dataset,
            split=split,
            image_size=recipe["image_size"],
            shuffle=shuffle,
            repeat=repeat,
            seed=seed,
            data_dir=args.data_dir,
        )


def class_conditional_inputs(dataset):
    """Map elements to model inputs: one label token per image."""
    import tensorflow as tf

    def to_inputs(element):
        return {
            "images": tf.cast(element["images"], tf.float32) / 127.5 - 1.0,
            "token_ids": tf.reshape(element["labels"], [1]),
            "padding_mask": tf.ones([1], tf.bool),
        }

    return dataset.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE)


def flip_images(dataset, seed):
    """Mirror each image left to right with probability 1/2."""
    import tensorflow as tf

    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def flip(element, draw):
        images = tf.cond(
            draw % 2 == 1,
            lambda: tf.reverse(element["images"], axis=[1]),
            lambda: element["images"],
        )
        return {**element, "images": images}

    return tf.data.Dataset.zip(dataset, draws).map(
        flip, num_parallel_calls=tf.data.AUTOTUNE
    )


def build_tokenizer(args, recipe):
    from keras_jetformer.models import JetFormerTokenizer
    from keras_jetformer.models import compute_jetformer_tokenizer_proto

    if args.tokenizer:
        with open(args.tokenizer, "rb") as file:
            return JetFormerTokenizer(proto=file.read())
    captions = load_images(
        args, recipe, recipe["split"], shuffle=False, repeat=False, seed=0
    ).take(args.tokenizer_captions)
    sentences = [
        element["prompts"].decode("utf-8").lower()
        for element in captions.as_numpy_iterator()
    ]
    return JetFormerTokenizer(
        proto=compute_jetformer_tokenizer_proto(sentences, lowercase=True)
    )


def training_dataset(args, recipe, seed):
    """Batches of model inputs (class-conditional) or of images and
    lowercased prompts, which the task's preprocessor tokenizes in `fit`."""
    import tensorflow as tf

    dataset = load_images(
        args, recipe, recipe["split"], shuffle=True, repeat=True, seed=seed
    )
    if recipe["flip"]:
        dataset = flip_images(dataset, seed)
    if recipe["kind"] == "class":
        dataset = class_conditional_inputs(dataset)
    else:
        dataset = dataset.map(
            lambda element: {
                "images": element["images"],
                "prompts": tf.strings.lower(element["prompts"]),
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    dataset = dataset.batch(recipe["batch_size"], drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


# --- Model --------------------------------------------------------------------


def backbone_config(args, recipe, vocabulary_size):
    """`JetFormerBackbone` arguments of `args.size` for this recipe."""
    from keras_jetformer.models.jetformer_presets import preset_directory

    image_size = recipe["image_size"]
    if args.size == "tiny":
        config = {**TINY_CONFIG, "image_shape": (image_size, image_size, 3)}
    else:
        preset = PRESETS[(recipe["kind"], args.size)]
        path = os.path.join(preset_directory(preset), "config.json")
        with open(path, encoding="utf-8") as file:
            config = json.load(file)["config"]
        config["image_shape"] = (image_size, image_size, 3)
    config["vocabulary_size"] = vocabulary_size
    config["bos_id"] = config["boi_id"] = config["nolabel_id"] = None
    config["seed"] = args.seed
    if recipe["kind"] == "class":
        config["num_vocab_repeats"] = NUM_VOCAB_REPEATS
        config["tie_text_embeddings"] = True
    else:
        config["num_vocab_repeats"] = 1
        config["tie_text_embeddings"] = False
    return config


def build_task(args, recipe, tokenizer, num_classes):
    from keras_jetformer.models import JetFormerBackbone
    from keras_jetformer.models import JetFormerImageConverter
    from keras_jetformer.models import JetFormerTextToImage
    from keras_jetformer.models import JetFormerTextToImagePreprocessor
    from keras_jetformer.training import jetformer_optimizer

    if recipe["kind"] == "class":
        # The label ids, then BOS, BOI and NOLABEL.
        vocabulary_size = num_classes + 3
        preprocessor = None
    else:
        vocabulary_size = tokenizer.model_vocabulary_size()
        # The reference attends to and scores the padding (`ignore_pad`
        # is False in its image-text config).
        preprocessor = JetFormerTextToImagePreprocessor(
            tokenizer,
            JetFormerImageConverter(),
            sequence_length=recipe["text_length"],
            attend_to_padding=True,
        )
    backbone = JetFormerBackbone(
        **backbone_config(args, recipe, vocabulary_size)
    )
    task = JetFormerTextToImage(
        backbone,
        preprocessor,
        training_steps=recipe["steps"],
        text_prefix_prob=recipe["text_prefix_prob"],
        noise_scale=recipe["noise_scale"],
        noise_min=recipe["noise_min"],
        input_noise_std=recipe["input_noise_std"],
        label_drop_rate=recipe["label_drop_rate"],
        text_loss_weight=recipe["text_loss_weight"],
        rgb_noise_on_image_prefix=recipe["rgb_noise_on_image_prefix"],
        seed=args.seed,
    )
    task.compile(
        optimizer=jetformer_optimizer(
            total_steps=recipe["steps"],
            learning_rate=recipe["learning_rate"],
            weight_decay=recipe["weight_decay"],
        )
    )
    task.optimizer.build(task.trainable_variables)
    return task


def num_dataset_classes(args):
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.dataset, data_dir=args.data_dir)
    return builder.info.features["label"].num_classes


# --- Checkpoints, samples and logs ------------------------------------------------


def checkpoint_paths(output_dir):
    """Checkpoint files in `output_dir`, oldest first, with their steps."""
    paths = glob.glob(os.path.join(output_dir, "checkpoints", "step_*.keras"))
    steps = [int(re.search(r"step_(\d+)\.keras$", path)[1]) for path in paths]
    return sorted(zip(steps, paths))


def make_callbacks(args, recipe, sample_inputs):
    import keras
    import numpy as np
    import tensorflow as tf

    output_dir = args.output_dir
    guidance_scale, temperature = SAMPLING.get(
        (recipe["kind"], args.size), (3.0, 1.0)
    )
    image_writer = tf.summary.create_file_writer(
        os.path.join(output_dir, "logs", "samples")
    )

    class StepCallback(keras.callbacks.Callback):
        """Checkpoints and sample grids at multiples of the global step."""

        def on_train_batch_end(self, batch, logs=None):
            # `self.model` (not `task`): on JAX, reading it copies the
            # training state back into the variables.
            model = self.model
            step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
            last = step >= recipe["steps"]
            if step % args.checkpoint_every == 0 or last:
                self.save_checkpoint(model, step)
            if step % args.sample_every == 0 or last:
                self.write_samples(model, step)
            if last:
                # The last epoch can be longer than the steps left.
                model.stop_training = True

        def save_checkpoint(self, model, step):
            directory = os.path.join(output_dir, "checkpoints")
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"step_{step}.keras")
            model.save(path)
            for _, old_path in checkpoint_paths(output_dir)[
                : -args.keep_checkpoints
            ]:
                os.remove(old_path)
            print(f"\nSaved the checkpoint {path}", flush=True)

        def write_samples(self, model, step):
            images = model.generate(
                sample_inputs,
                guidance_scale=guidance_scale,
                temperature=temperature,
                seed=args.seed,
                verbose=0,
            )
            path = os.path.join(output_dir, "samples", f"step_{step}.png")
            save_grid(images, path)
            with image_writer.as_default():
                tf.summary.image(
                    "samples",
                    np.asarray(images, "float32") / 255.0,
                    step=step,
                    max_outputs=len(images),
                )
            print(f"\nWrote the sample grid {path}", flush=True)

    tensorboard = keras.callbacks.TensorBoard(
        log_dir=os.path.join(output_dir, "logs"),
        update_freq=args.log_every,
    )
    return [StepCallback(), tensorboard]


def save_grid(images, path):
    """Write uint8 `images` `[N, H, W, C]` as a PNG of about square shape."""
    import numpy as np
    from PIL import Image

    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    padded = np.zeros((rows * columns, height, width, channels), np.uint8)
    padded[:count] = images
    grid = padded.reshape(rows, columns, height, width, channels)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(
        rows * height, columns * width, channels
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid[..., 0] if channels == 1 else grid).save(path)


def sample_prompts(args, recipe, num_classes):
    """Prompts of the sample grids: spread-out labels, or held-out captions."""
    import numpy as np

    if recipe["kind"] == "class":
        labels = np.linspace(0, num_classes - 1, args.num_samples)
        labels = np.round(labels).astype("int32")
        return {
            "token_ids": labels[:, None],
            "padding_mask": np.ones((args.num_samples, 1), bool),
        }
    elements = load_images(
        args, recipe, recipe["split"], shuffle=False, repeat=True, seed=0
    ).take(args.num_samples)
    return [
        element["prompts"].decode("utf-8").lower()
        for element in elements.as_numpy_iterator()
    ]


# --- Main -----------------------------------------------------------------------


def check_output_dir(args):
    checkpoints = checkpoint_paths(args.output_dir)
    if checkpoints and not args.resume:
        sys.exit(
            f"error: {args.output_dir} already contains checkpoints up to "
            f"step {checkpoints[-1][0]}. Pass --resume to continue from "
            "there, or choose another --output-dir."
        )
    os.makedirs(args.output_dir, exist_ok=True)
    return checkpoints[-1] if checkpoints else None


def train(args):
    import keras

    recipe = resolve_recipe(args)
    latest = check_output_dir(args)
    keras.utils.set_random_seed(args.seed)
    scope, description = make_distribution(args, recipe["batch_size"])
    print(f"Backend {keras.config.backend()}, {description}")

    num_classes = None
    tokenizer = None
    if recipe["kind"] == "class":
        num_classes = num_dataset_classes(args)
    else:
        tokenizer = build_tokenizer(args, recipe)

    with scope:
        task = build_task(args, recipe, tokenizer, num_classes)
    initial_step = 0
    if latest is not None:
        initial_step, path = latest
        # The weights, the optimizer state (with the step count that drives
        # the schedules) and the seed generator states.
        task.load_weights(path)
        iterations = int(keras.ops.convert_to_numpy(task.optimizer.iterations))
        print(f"Resumed from {path} at optimizer step {iterations}")
    backbone = task.backbone
    print(
        f"Model: {backbone.count_params():,} parameters; recipe: "
        + json.dumps({k: v for k, v in recipe.items() if k != "kind"})
    )

    remaining = recipe["steps"] - initial_step
    if remaining <= 0:
        print(f"Training already reached {recipe['steps']} steps.")
        return task
    # A resumed run continues with a fresh shuffle of the data.
    dataset = training_dataset(args, recipe, seed=args.seed + initial_step)
    callbacks = make_callbacks(
        args, recipe, sample_prompts(args, recipe, num_classes)
    )
    # One Keras epoch per checkpoint interval keeps the progress bar short.
    steps_per_epoch = min(args.checkpoint_every, recipe["steps"])
    task.fit(
        dataset,
        initial_epoch=initial_step // steps_per_epoch,
        epochs=math.ceil(recipe["steps"] / steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
    )
    path = os.path.join(args.output_dir, "model.keras")
    task.save(path)
    print(f"Saved the model to {path}")
    return task


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    if args.mock_examples:
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=args.mock_examples):
            return train(args)
    return train(args)


if __name__ == "__main__":
    main()
