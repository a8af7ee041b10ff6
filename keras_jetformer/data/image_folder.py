"""Images with captions from a local folder, in the format of
`digits_dataset`: dicts of "images" (`uint8 [H, W, C]`), "prompts"
(`tf.string`) and "labels" (`int32`, -1 when the images have no class).

Two layouts are read:

- A captions file (CSV or JSON Lines) that gives one or more captions per
  image file of the folder.
- One sub-folder per class, with no captions file: the class name becomes
  the prompt, "a photo of a {name}" by default, as for TFDS class labels.

The folder is listed and every image's header is checked when the dataset
is built; the pixels are decoded inside the `tf.data` pipeline.
"""

import csv
import json
import os

import numpy as np
import tensorflow as tf

from keras_jetformer.data.digits import _check_positive_int
from keras_jetformer.data.digits import _check_seed
from keras_jetformer.data.digits import _is_int
from keras_jetformer.data.tfds_loader import CLASS_PROMPT_TEMPLATE
from keras_jetformer.data.tfds_loader import _attach_prompts
from keras_jetformer.data.tfds_loader import _class_prompt
from keras_jetformer.data.tfds_loader import _resize_and_center_crop

# The formats that `tf.io.decode_image` reads, keyed by file extension, with
# the magic bytes that start such a file. WebP needs a TensorFlow that has
# `tf.io.decode_webp`.
_SIGNATURES = {
    ".bmp": (b"BM",),
    ".gif": (b"GIF87a", b"GIF89a"),
    ".jpeg": (b"\xff\xd8\xff",),
    ".jpg": (b"\xff\xd8\xff",),
    ".png": (b"\x89PNG\r\n\x1a\n",),
}
if hasattr(tf.io, "decode_webp"):
    _SIGNATURES[".webp"] = (b"RIFF",)
IMAGE_EXTENSIONS = tuple(sorted(_SIGNATURES))

# Columns of a CSV captions file, and keys of a JSON Lines one.
FILE_NAME_KEY = "file_name"
CAPTION_KEY = "caption"
CAPTIONS_FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
CHANNEL_COUNTS = (1, 2, 3, 4)

# Number of file names listed in an error message.
_MAX_LISTED = 5


def _is_image_file(name):
    return os.path.splitext(name)[1].lower() in _SIGNATURES


def _is_hidden(name):
    return name.startswith(".")


def _list_images(directory):
    """Return the image files under `directory`, recursively, sorted.

    Hidden files and folders (names starting with ".") and files without an
    image extension are skipped.
    """
    paths = []
    for root, folders, files in os.walk(directory):
        folders[:] = sorted(name for name in folders if not _is_hidden(name))
        for name in sorted(files):
            if not _is_hidden(name) and _is_image_file(name):
                paths.append(os.path.join(root, name))
    return paths


def _listing(paths, directory):
    """Format up to `_MAX_LISTED` paths relative to `directory`."""
    names = [os.path.relpath(path, directory) for path in paths]
    text = ", ".join(repr(name) for name in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        text += f" and {len(names) - _MAX_LISTED} more"
    return text


def _check_readable(path, directory):
    """Raise `ValueError` unless `path` starts like an image of a format
    that `tf.io.decode_image` reads."""
    try:
        with open(path, "rb") as file:
            header = file.read(12)
    except OSError as error:
        raise ValueError(
            f"The image file {path} cannot be read ({error}). "
            f"Received: directory={directory!r}"
        ) from error

    extension = os.path.splitext(path)[1].lower()
    if extension in _SIGNATURES:
        valid = header.startswith(_SIGNATURES[extension])
    else:
        # A file named in a captions file may have any extension.
        known = [start for starts in _SIGNATURES.values() for start in starts]
        valid = header.startswith(tuple(known))
    if header.startswith(b"RIFF"):
        # RIFF also starts WAV and AVI files. WebP has "WEBP" at byte 8.
        valid = valid and header[8:12] == b"WEBP"
    if not valid:
        raise ValueError(
            f"The file {path} is not a readable image: its contents do not "
            f"start like a {_format_names()} file. Replace or remove it. "
            f"Received: directory={directory!r}"
        )


def _format_names():
    names = [extension[1:].upper() for extension in IMAGE_EXTENSIONS]
    names = sorted(set(name.replace("JPG", "JPEG") for name in names))
    return ", ".join(names[:-1]) + " or " + names[-1]


# --- Captions file ------------------------------------------------------------


def _read_csv_captions(path):
    """Return `[(line number, file name, caption)]` from a CSV file with a
    header row that names the `file_name` and `caption` columns."""
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        missing = [
            key for key in (FILE_NAME_KEY, CAPTION_KEY) if key not in columns
        ]
        if missing:
            raise ValueError(
                f"The CSV captions file {path} must have a header row with "
                f"the columns {FILE_NAME_KEY!r} and {CAPTION_KEY!r}; "
                f"{missing[0]!r} is missing. Found columns: {columns}. "
                f"Received: captions_file={path!r}"
            )
        return [
            (reader.line_num, row[FILE_NAME_KEY], row[CAPTION_KEY])
            for row in reader
        ]


def _read_jsonl_captions(path):
    """Return `[(line number, file name, caption)]` from a JSON Lines file.

    Each non-blank line is an object with a `file_name` string and a
    `caption` that is a string or a list of strings.
    """
    entries = []
    with open(path, encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"Line {line_number} of the captions file {path} is not "
                    f"valid JSON ({error}). Each line must be an object such "
                    f'as {{"{FILE_NAME_KEY}": "cat.png", "{CAPTION_KEY}": '
                    f'"a cat"}}. Received: captions_file={path!r}'
                ) from error
            if not isinstance(record, dict) or not (
                FILE_NAME_KEY in record and CAPTION_KEY in record
            ):
                raise ValueError(
                    f"Line {line_number} of the captions file {path} must be "
                    f"an object with the keys {FILE_NAME_KEY!r} and "
                    f"{CAPTION_KEY!r}. Received: captions_file={path!r}"
                )
            captions = record[CAPTION_KEY]
            # A non-empty list gives several captions; any other value is
            # checked later as a single caption.
            if not (isinstance(captions, list) and captions):
                captions = [captions]
            for caption in captions:
                entries.append((line_number, record[FILE_NAME_KEY], caption))
    return entries


def _read_captions_file(captions_file, directory):
    """Return `(paths, captions)`: the image paths in sorted order and, for
    each, its captions in file order."""
    if not isinstance(captions_file, (str, os.PathLike)):
        raise TypeError(
            "`captions_file` must be a path (str or os.PathLike) or None. "
            f"Received: captions_file={captions_file!r}"
        )
    captions_file = os.fspath(captions_file)
    if not os.path.isfile(captions_file):
        raise ValueError(
            f"The captions file {captions_file} does not exist. Relative "
            "paths are resolved against the current directory, not against "
            f"`directory`. Received: captions_file={captions_file!r}"
        )
    extension = os.path.splitext(captions_file)[1].lower()
    file_format = CAPTIONS_FILE_FORMATS.get(extension)
    if file_format is None:
        raise ValueError(
            "`captions_file` must be a CSV (.csv) or JSON Lines (.jsonl) "
            f"file. Received: captions_file={captions_file!r}"
        )
    if file_format == "csv":
        entries = _read_csv_captions(captions_file)
    else:
        entries = _read_jsonl_captions(captions_file)

    captions_by_path = {}
    for line_number, file_name, caption in entries:
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(
                f"Line {line_number} of the captions file {captions_file} "
                f"has no {FILE_NAME_KEY!r}: it must be the path of an image "
                f"relative to `directory`. Received: {FILE_NAME_KEY}="
                f"{file_name!r}"
            )
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(
                f"Line {line_number} of the captions file {captions_file} "
                f"has an empty or non-string caption for {file_name!r}; "
                "every caption must be a non-empty string. "
                f"Received: {CAPTION_KEY}={caption!r}"
            )
        path = os.path.normpath(os.path.join(directory, file_name))
        captions_by_path.setdefault(path, []).append(caption)

    if not captions_by_path:
        raise ValueError(
            f"The captions file {captions_file} lists no images. "
            f"Received: captions_file={captions_file!r}"
        )
    missing = [path for path in captions_by_path if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"The captions file {captions_file} names {len(missing)} files "
            f"that do not exist in {directory}: "
            f"{_listing(missing, directory)}. File names are relative to "
            f"`directory`. Received: captions_file={captions_file!r}"
        )
    # Every image of the folder must be captioned, so that a forgotten
    # caption does not silently drop training data.
    uncaptioned = [
        path
        for path in _list_images(directory)
        if os.path.normpath(path) not in captions_by_path
    ]
    if uncaptioned:
        raise ValueError(
            f"{len(uncaptioned)} images in {directory} have no caption in "
            f"{captions_file}: {_listing(uncaptioned, directory)}. Add "
            "captions for them, or move them out of the folder. "
            f"Received: captions_file={captions_file!r}"
        )

    paths = sorted(captions_by_path)
    return paths, [captions_by_path[path] for path in paths]


# --- Class sub-folders ------------------------------------------------------------


def _read_class_folders(directory):
    """Return `(paths, labels, class_names)` from one sub-folder per class.

    Classes are numbered in the sorted order of their folder names.
    """
    entries = sorted(os.listdir(directory))
    class_names = [
        name
        for name in entries
        if not _is_hidden(name) and os.path.isdir(os.path.join(directory, name))
    ]
    loose = [
        os.path.join(directory, name)
        for name in entries
        if not _is_hidden(name)
        and _is_image_file(name)
        and os.path.isfile(os.path.join(directory, name))
    ]
    if not class_names:
        if loose:
            raise ValueError(
                f"The images in {directory} have no captions: pass a "
                "`captions_file`, or put the images in one sub-folder per "
                f"class. Received: directory={directory!r}, captions_file=None"
            )
        raise ValueError(
            f"No images found in {directory}. Expected one sub-folder per "
            f"class with {', '.join(IMAGE_EXTENSIONS)} files, or a "
            f"`captions_file`. Received: directory={directory!r}"
        )
    if loose:
        raise ValueError(
            f"{len(loose)} images in {directory} are outside the class "
            f"sub-folders, so they have no caption: "
            f"{_listing(loose, directory)}. Move them into the folder of "
            f"their class. Received: directory={directory!r}"
        )

    paths = []
    labels = []
    for label, name in enumerate(class_names):
        class_paths = _list_images(os.path.join(directory, name))
        if not class_paths:
            raise ValueError(
                f"The class folder {os.path.join(directory, name)} has no "
                f"images ({', '.join(IMAGE_EXTENSIONS)}). Add images or "
                f"remove the folder. Received: directory={directory!r}"
            )
        paths.extend(class_paths)
        labels.extend([label] * len(class_paths))
    return paths, labels, class_names


# --- Decoding -------------------------------------------------------------------


def _convert_channels(image, channels):
    """Convert a uint8 image with 1 to 4 channels (gray, gray and alpha, RGB,
    RGBA; known only at run time) to `channels` channels.

    Gray becomes RGB by repetition, and RGB becomes gray with
    `tf.image.rgb_to_grayscale`. A missing alpha channel is opaque (255),
    and an alpha channel is dropped when `channels` has none. An image that
    already has `channels` channels is returned unchanged.
    """
    count = tf.shape(image)[-1]
    pixels = tf.cast(image, tf.float32)
    has_color = count >= 3
    rgb = tf.cond(
        has_color,
        lambda: pixels[..., :3],
        lambda: tf.tile(pixels[..., :1], [1, 1, 3]),
    )
    outputs = []
    if channels in (1, 2):
        outputs.append(
            tf.cond(
                has_color,
                lambda: tf.image.rgb_to_grayscale(rgb),
                lambda: pixels[..., :1],
            )
        )
    else:
        outputs.append(rgb)
    if channels in (2, 4):
        opaque = tf.fill(tf.shape(pixels[..., :1]), 255.0)
        alpha = tf.case(
            [
                (tf.equal(count, 4), lambda: pixels[..., 3:4]),
                (tf.equal(count, 2), lambda: pixels[..., 1:2]),
            ],
            default=lambda: opaque,
        )
        outputs.append(alpha)
    converted = tf.concat(outputs, axis=-1)
    converted = tf.cast(tf.clip_by_value(tf.round(converted), 0, 255), tf.uint8)
    converted.set_shape([None, None, channels])
    return converted


def _decode_image(path, channels, image_size):
    """Read, decode, convert and resize the image at `path` (a string
    tensor). Animated GIFs give their first frame."""
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=0, expand_animations=False
    )
    image = _convert_channels(image, channels)
    return _resize_and_center_crop(image, image_size)


def _first_image_channels(path, directory):
    """Return the channel count of the image at `path`."""
    try:
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=0, expand_animations=False
        )
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        raise ValueError(
            f"The image file {path} cannot be decoded ({error.message}). "
            f"Received: directory={directory!r}"
        ) from error
    return int(image.shape[-1])


# --- Arguments ----------------------------------------------------------------


def _check_directory(directory):
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            "`directory` must be a path (str or os.PathLike). "
            f"Received: directory={directory!r}"
        )
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(
            f"The image folder {directory} does not exist or is not a "
            f"directory. Received: directory={directory!r}"
        )
    return directory


def _check_arguments(image_size, channels, batch_size, seed, template):
    if not _is_int(image_size) or image_size < 1:
        raise ValueError(
            "`image_size` must be a positive integer: images are resized so "
            "that their shorter side has this length, then center cropped "
            f"to a square. Received: image_size={image_size!r}"
        )
    if channels is not None and (
        not _is_int(channels) or channels not in CHANNEL_COUNTS
    ):
        raise ValueError(
            f"`channels` must be one of {CHANNEL_COUNTS} or None. "
            f"Received: channels={channels!r}"
        )
    _check_positive_int(batch_size, "batch_size", allow_none=True)
    _check_seed(seed)
    if not isinstance(template, str) or "{name}" not in template:
        raise ValueError(
            "`class_prompt_template` must be a string with a `{name}` "
            "placeholder for the class name (and optionally `{article}`). "
            f"Received: class_prompt_template={template!r}"
        )
    try:
        template.format(name="x", article="a")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            "`class_prompt_template` may only use the placeholders `{name}` "
            f"and `{{article}}` ({error!r}). "
            f"Received: class_prompt_template={template!r}"
        ) from error


def image_folder_dataset(
    directory,
    image_size,
    captions_file=None,
    channels=None,
    batch_size=None,
    shuffle=False,
    seed=0,
    repeat=False,
    random_captions=True,
    class_prompt_template=CLASS_PROMPT_TEMPLATE,
):
    """Load a local folder of images with captions as a `tf.data.Dataset`.

    With a `captions_file`, every image file under `directory` (searched
    recursively) must have at least one caption in it, and every file it
    names must exist. The file is one of:

    - CSV (`.csv`) with a header row that contains the columns `file_name`
      (the image path relative to `directory`) and `caption`. An image with
      several captions takes one row per caption.
    - JSON Lines (`.jsonl`), one object per line such as
      `{"file_name": "cats/1.png", "caption": "a cat on a sofa"}`, where
      `caption` may also be a list of strings. An image may also appear on
      several lines.

    Without a `captions_file`, each sub-folder of `directory` is a class
    (numbered in sorted order of the folder names), and its images, found
    recursively, get the prompt `class_prompt_template` filled with the
    folder name, underscores read as spaces: "a photo of a golden
    retriever" for `golden_retriever/`.

    Image files are those with a PNG, JPEG, GIF, BMP or (where TensorFlow
    decodes it) WebP extension. Other files are ignored, and so are hidden
    files (names starting with "."). Each image's first bytes are checked when the
    dataset is built. A file that starts like an image but is corrupt
    further on raises `tf.errors.InvalidArgumentError` when the dataset
    reaches it.

    Args:
        directory: path of the image folder.
        image_size: int. Images are resized with antialiasing so that their
            shorter side has `image_size` pixels, then center cropped to
            `image_size` x `image_size`.
        captions_file: path of a CSV or JSON Lines captions file, or None
            for one sub-folder per class. A relative path is resolved
            against the current directory.
        channels: number of output channels: 1 (gray), 2 (gray and alpha),
            3 (RGB) or 4 (RGBA). Images with other channel counts are
            converted: gray is repeated into RGB, RGB is converted to gray
            with `tf.image.rgb_to_grayscale`, a missing alpha channel is
            opaque (255) and an unwanted one is dropped. None uses the
            channel count of the first image in sorted path order.
        batch_size: when given, batch the elements. As in `digits_dataset`,
            `shuffle` or `repeat` drops the last partial batch.
        shuffle: shuffle the whole list of images, anew every epoch.
        seed: integer seed of the shuffle and of the caption draws. The
            global TensorFlow seed also changes them.
        repeat: repeat the images without end.
        random_captions: for an image with several captions, draw one at
            random per element and epoch. When False, take its first
            caption in the captions file.
        class_prompt_template: format string of the class prompts, with a
            `{name}` and optionally an `{article}` ("a" or "an")
            placeholder. Defaults to "a photo of {article} {name}".

    Returns:
        A dataset of dicts with "images" (`uint8 [image_size, image_size,
        channels]`), "prompts" (`tf.string` scalar) and "labels" (`int32`
        scalar: the class index, or -1 with a `captions_file`), with a
        leading batch dimension when `batch_size` is given. Its
        `class_names` attribute lists the class folder names in label
        order, or is None with a `captions_file`.

    Raises:
        TypeError: if `directory` or `captions_file` is not a path.
        ValueError: if the folder does not exist or contains no images, if an
            image has no caption or a captioned file is missing, if the
            captions file is malformed, if a file is not a readable image,
            or if another argument is invalid.
    """
    directory = _check_directory(directory)
    _check_arguments(image_size, channels, batch_size, seed, class_prompt_template)

    if captions_file is not None:
        paths, captions = _read_captions_file(captions_file, directory)
        labels = [-1] * len(paths)
        class_names = None
    else:
        paths, labels, class_names = _read_class_folders(directory)
    for path in paths:
        _check_readable(path, directory)
    if channels is None:
        channels = _first_image_channels(paths[0], directory)

    columns = {"paths": paths, "labels": np.array(labels, dtype=np.int32)}
    if captions_file is not None:
        columns["captions"] = tf.ragged.constant(captions)
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    # Shuffling file names is cheap, so the buffer contains the whole folder.
    if shuffle:
        dataset = dataset.shuffle(
            len(paths), seed=seed, reshuffle_each_iteration=True
        )
    if repeat:
        dataset = dataset.repeat()

    def load(element):
        loaded = {
            "images": _decode_image(element["paths"], channels, image_size),
            "labels": element["labels"],
        }
        if "captions" in element:
            loaded["captions"] = element["captions"]
        return loaded

    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if captions_file is not None:
        prompt_source = "captions"
    else:
        prompt_source = [
            _class_prompt(name.replace("_", " "), class_prompt_template)
            for name in class_names
        ]
    dataset = _attach_prompts(dataset, prompt_source, seed, random_captions)

    if batch_size is not None:
        dataset = dataset.batch(batch_size, drop_remainder=shuffle or repeat)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset.class_names = class_names
    return dataset
