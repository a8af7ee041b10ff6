"""Image-text datasets from TensorFlow Datasets (TFDS), in the format of
`digits_dataset`: dicts of "images" (`uint8 [H, W, C]`), "prompts"
(`tf.string`) and "labels" (`int32`, -1 when the dataset has no class label).
"""

import functools
import re
import warnings

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_jetformer.data.digits import _attach_digit_prompts
from keras_jetformer.data.digits import _check_positive_int
from keras_jetformer.data.digits import _check_seed

# Caption features looked up, in this order, when `caption_key` is None.
# A key is a path through nested feature dicts, separated by "/".
CAPTION_KEYS = ("captions/text", "caption", "captions", "text")
IMAGE_KEY = "image"
LABEL_KEY = "label"
CLASS_PROMPT_TEMPLATE = "a photo of {article} {name}"
DEFAULT_SHUFFLE_BUFFER_SIZE = 10_000

# ImageNet label names in TFDS are WordNet ids such as "n01440764".
_WORDNET_ID = re.compile(r"n\d{8}")


def _base_name(name):
    """Return the dataset name without config and version: "mnist" for
    "mnist:3.*.*" or "coco_captions/2017"."""
    return name.split(":")[0].split("/")[0]


def _load(name, split, data_dir, shuffle, seed, download):
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    try:
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            shuffle_files=shuffle,
            download=download,
            read_config=read_config,
            with_info=True,
        )
    except tfds.core.DatasetNotFoundError as error:
        # The TFDS message lists every registered dataset, so it is replaced.
        raise ValueError(
            f"TFDS has no dataset named {name!r}. Call "
            "`tensorflow_datasets.list_builders()` for the available names. "
            f"Received: name={name!r}"
        ) from error
    except AssertionError as error:
        # With download=False, TFDS asserts that the prepared files exist.
        if download or "could not find data" not in str(error):
            raise
        raise FileNotFoundError(
            f"The prepared TFDS dataset {name!r} was not found in the data "
            f"directory. Run `tfds build {_base_name(name)}` first, or pass "
            "download=True. "
            f"Received: name={name!r}, data_dir={data_dir!r}"
        ) from error


def _find_feature(element_spec, key):
    """Return the `tf.TensorSpec` at the "/"-separated `key`, or None."""
    spec = element_spec
    for part in key.split("/"):
        if not isinstance(spec, dict) or part not in spec:
            return None
        spec = spec[part]
    return spec if isinstance(spec, tf.TensorSpec) else None


def _get_feature(example, key):
    for part in key.split("/"):
        example = example[part]
    return example


def _resolve_caption_key(element_spec, caption_key):
    """Return the key of the string caption feature, or None if there is none.

    An explicit `caption_key` must exist. Otherwise the first of
    `CAPTION_KEYS` that is a string feature is used.
    """
    if caption_key is not None:
        spec = _find_feature(element_spec, caption_key)
        if spec is None or spec.dtype != tf.string:
            raise ValueError(
                "`caption_key` must name a string feature of the dataset, "
                'with "/" between the keys of nested features. Available '
                "features: "
                f"{_describe_spec(element_spec)}. "
                f"Received: caption_key={caption_key!r}"
            )
        return caption_key
    for key in CAPTION_KEYS:
        spec = _find_feature(element_spec, key)
        if spec is not None and spec.dtype == tf.string:
            return key
    return None


def _describe_spec(element_spec, prefix=""):
    parts = []
    for key, spec in element_spec.items():
        if isinstance(spec, dict):
            parts.append(_describe_spec(spec, f"{prefix}{key}/"))
        else:
            parts.append(f"{prefix}{key} ({spec.dtype.name} {spec.shape})")
    return ", ".join(parts)


@functools.lru_cache(maxsize=1)
def _wordnet_id_to_class_name():
    """Map ImageNet-1k WordNet ids to class names, e.g. "n01440764" to
    "tench", with the table that ships with keras_hub (no download)."""
    import keras_hub

    # keras_hub exposes its table only through this decoder, so decode one
    # one-hot prediction per class.
    one_hot = np.eye(1000, dtype="float32")
    decoded = keras_hub.utils.decode_imagenet_predictions(
        one_hot, top=1, include_synset_ids=True
    )
    return {row[0][0]: row[0][1] for row in decoded}


def _readable_class_names(names):
    """Replace WordNet ids by class names and underscores by spaces."""
    if names and all(_WORDNET_ID.fullmatch(name) for name in names):
        table = _wordnet_id_to_class_name()
        names = [table.get(name, name) for name in names]
    return [name.replace("_", " ") for name in names]


def _class_prompt(name, template=CLASS_PROMPT_TEMPLATE):
    # NOTE: the article follows the first letter, so "a photo of an unicorn"
    # and "a photo of a hourglass" come out wrong.
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(article=article, name=name)


def _class_names(info, element_spec, name, label_names):
    """Return the label names to build prompts from, or None if the dataset
    has no `ClassLabel` "label" feature."""
    label_feature = None
    if LABEL_KEY in element_spec and LABEL_KEY in info.features:
        label_feature = info.features[LABEL_KEY]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        if label_names is not None:
            raise ValueError(
                "`label_names` needs a dataset with a `ClassLabel` "
                f"{LABEL_KEY!r} feature, and {name!r} has none. "
                f"Received: label_names={label_names!r}"
            )
        return None

    num_classes = label_feature.num_classes
    if label_names is None:
        return _readable_class_names(list(label_feature.names))

    if not isinstance(label_names, (list, tuple)) or not all(
        isinstance(label_name, str) and label_name
        for label_name in label_names
    ):
        raise ValueError(
            "`label_names` must be a list or tuple of non-empty strings. "
            f"Received: label_names={label_names!r}"
        )
    if len(label_names) != num_classes:
        raise ValueError(
            f"`label_names` must have one name per class, {num_classes} for "
            f"{name!r}. Received: len(label_names)={len(label_names)}"
        )
    return [label_name.replace("_", " ") for label_name in label_names]


def _warn_if_unnamed(class_names, name):
    # ClassLabel(num_classes=n) names the classes "0" to "n - 1" until a
    # prepared dataset stores the real names, as cifar10 does.
    if class_names == [str(i) for i in range(len(class_names))]:
        warnings.warn(
            f"The TFDS dataset {name!r} has no class names, so the prompts "
            "use the class numbers. Pass `label_names` to name the classes.",
            stacklevel=3,
        )


def _resize_and_center_crop(image, size):
    """Resize the shorter side of `image` to `size` with antialiasing, then
    crop the center `size` x `size` square. Returns uint8."""
    height = tf.shape(image)[0]
    width = tf.shape(image)[1]
    scale = size / tf.cast(tf.minimum(height, width), tf.float32)
    new_height = tf.maximum(
        size, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32)
    )
    new_width = tf.maximum(
        size, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32)
    )
    resized = tf.image.resize(
        image, [new_height, new_width], method="bilinear", antialias=True
    )

    top = (new_height - size) // 2
    left = (new_width - size) // 2
    cropped = resized[top : top + size, left : left + size]
    # Antialiased resizing can overshoot [0, 255] near sharp edges.
    cropped = tf.clip_by_value(tf.round(cropped), 0.0, 255.0)
    cropped = tf.cast(cropped, tf.uint8)
    cropped.set_shape([size, size, image.shape[-1]])
    return cropped


def _check_image_spec(element_spec, name, image_size, batch_size):
    spec = None
    if isinstance(element_spec, dict):
        spec = element_spec.get(IMAGE_KEY)
    if not isinstance(spec, tf.TensorSpec) or spec.shape.rank != 3:
        raise ValueError(
            f"The TFDS dataset {name!r} has no {IMAGE_KEY!r} feature of shape "
            "[height, width, channels]. Available features: "
            f"{_describe_spec(element_spec)}. Received: name={name!r}"
        )
    if spec.dtype != tf.uint8:
        raise ValueError(
            f"The images of {name!r} must be uint8. "
            f"Received: dtype={spec.dtype.name}"
        )
    varying_size = spec.shape[0] is None or spec.shape[1] is None
    if image_size is None and batch_size is not None and varying_size:
        raise ValueError(
            f"The images of {name!r} differ in size, so batching them needs "
            "an `image_size`. "
            f"Received: image_size=None, batch_size={batch_size}"
        )


def _pick_caption(captions, draw):
    """Return the caption at `draw` modulo the number of captions, or "" when
    the element has no caption."""
    # Appending "" lets an element without captions gather index 0.
    count = tf.maximum(tf.size(captions), 1)
    index = tf.math.floormod(draw, tf.cast(count, draw.dtype))
    return tf.gather(tf.concat([captions, [""]], axis=0), index)


def _attach_prompts(dataset, prompt_source, seed, random_captions):
    """Add a "prompts" string to each element and drop its "captions".

    The elements contain "images", "labels" and, for a caption dataset,
    "captions".

    `prompt_source` is "captions", "digits", a list of class prompts or None
    (every prompt is the empty string). Random choices are drawn as in
    `digits._attach_digit_prompts`, per element and epoch, from `seed`.
    """
    if prompt_source == "digits":
        return _attach_digit_prompts(dataset, random_captions, seed)

    if prompt_source == "captions":
        if random_captions:
            draws = tf.data.Dataset.random(
                seed=seed, rerandomize_each_iteration=True
            )
        else:
            # Draw 0 picks the first caption of every element.
            draws = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
            draws = draws.repeat()

        def add_caption(element, draw):
            prompt = _pick_caption(element["captions"], draw)
            return {
                "images": element["images"],
                "prompts": prompt,
                "labels": element["labels"],
            }

        dataset = tf.data.Dataset.zip(dataset, draws)
        return dataset.map(add_caption, num_parallel_calls=tf.data.AUTOTUNE)

    if prompt_source is None:
        table = tf.constant([""])
    else:
        table = tf.constant(prompt_source)
    has_table = prompt_source is not None

    def add_class_prompt(element):
        index = element["labels"] if has_table else 0
        return {
            "images": element["images"],
            "prompts": tf.gather(table, index),
            "labels": element["labels"],
        }

    return dataset.map(add_class_prompt, num_parallel_calls=tf.data.AUTOTUNE)


def _check_arguments(
    name, split, image_size, batch_size, seed, shuffle_buffer_size
):
    if not isinstance(name, str) or not name:
        raise ValueError(
            "`name` must be a non-empty TFDS dataset name such as 'mnist'. "
            f"Received: name={name!r}"
        )
    if not isinstance(split, str) or not split:
        raise ValueError(
            "`split` must be a TFDS split string such as 'train' or "
            f"'test[:10%]'. Received: split={split!r}"
        )
    _check_positive_int(image_size, "image_size", allow_none=True)
    _check_positive_int(batch_size, "batch_size", allow_none=True)
    _check_seed(seed)
    _check_positive_int(shuffle_buffer_size, "shuffle_buffer_size")


def tfds_dataset(
    name,
    split="train",
    image_size=None,
    batch_size=None,
    shuffle=False,
    seed=0,
    repeat=False,
    data_dir=None,
    caption_key=None,
    label_names=None,
    random_captions=True,
    shuffle_buffer_size=DEFAULT_SHUFFLE_BUFFER_SIZE,
    download=False,
):
    """Load a TFDS image dataset as images with text prompts.

    The prompt of an element comes from, in this order of preference:

    - a caption feature (`caption_key`, or the first of `CAPTION_KEYS` that
      the dataset has, e.g. "captions/text" in coco_captions). When it contains
      several captions, one is drawn at random per element and epoch.
      Elements without a caption get "".
    - the `ClassLabel` "label" feature: "a photo of a {name}", with the TFDS
      class name or `label_names[label]`, underscores read as spaces and
      ImageNet WordNet ids replaced by class names. MNIST (without
      `label_names`) uses the digit captions of `digits_dataset` instead.
    - otherwise "" for every element.

    Args:
        name: TFDS dataset name, with an optional config and version,
            e.g. "mnist", "cifar10" or "coco_captions".
        split: TFDS split string, e.g. "train" or "test[:10%]".
        image_size: when given, resize the shorter image side to
            `image_size` with antialiasing and crop the center square.
            When None, images keep their size, which must then be the same
            for every image if `batch_size` is given.
        batch_size: when given, batch the elements. As in `digits_dataset`,
            `shuffle` or `repeat` drops the last partial batch.
        shuffle: shuffle the files and the elements (through a buffer of
            `shuffle_buffer_size` preprocessed elements), anew every epoch.
        seed: integer seed of the file order, the shuffle and the prompt
            draws. The global TensorFlow seed also changes the last two.
        repeat: repeat the split without end.
        data_dir: TFDS data directory. None uses the TFDS default.
        caption_key: "/"-separated path of the string feature with the
            captions, e.g. "captions/text". None detects it.
        label_names: class names that replace the TFDS names, one per class.
        random_captions: draw one caption, or one digit phrasing for MNIST,
            at random. When False, take the first caption or the canonical
            digit prompt.
        shuffle_buffer_size: number of elements in the shuffle buffer.
        download: let TFDS download and prepare the dataset if it is
            missing from `data_dir`. Without it, a missing dataset raises
            FileNotFoundError.

    Returns:
        A dataset of dicts with "images" (`uint8 [H, W, C]`, with the
        channel count of the dataset), "prompts" (`tf.string` scalar) and
        "labels" (`int32` scalar, -1 without a `ClassLabel` "label" feature),
        with a leading batch dimension when `batch_size` is given.
    """
    _check_arguments(
        name, split, image_size, batch_size, seed, shuffle_buffer_size
    )
    dataset, info = _load(name, split, data_dir, shuffle, seed, download)
    element_spec = dataset.element_spec
    _check_image_spec(element_spec, name, image_size, batch_size)

    caption_key = _resolve_caption_key(element_spec, caption_key)
    class_names = _class_names(info, element_spec, name, label_names)

    if caption_key is not None:
        prompt_source = "captions"
    elif class_names is None:
        prompt_source = None
    elif _base_name(name) == "mnist" and label_names is None:
        prompt_source = "digits"
    else:
        _warn_if_unnamed(class_names, name)
        prompt_source = [
            _class_prompt(class_name) for class_name in class_names
        ]

    def preprocess(example):
        image = example[IMAGE_KEY]
        if image_size is not None:
            image = _resize_and_center_crop(image, image_size)
        if class_names is None:
            label = tf.constant(-1, tf.int32)
        else:
            label = tf.cast(example[LABEL_KEY], tf.int32)
        element = {"images": image, "labels": label}
        if caption_key is not None:
            # A single caption becomes a list of one.
            element["captions"] = tf.reshape(
                _get_feature(example, caption_key), [-1]
            )
        return element

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
        dataset = dataset.shuffle(
            shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True
        )
    if repeat:
        dataset = dataset.repeat()
    dataset = _attach_prompts(dataset, prompt_source, seed, random_captions)

    if batch_size is not None:
        dataset = dataset.batch(batch_size, drop_remainder=shuffle or repeat)
    return dataset.prefetch(tf.data.AUTOTUNE)
