"""Tests of `tfds_dataset` on TFDS mock data, which is generated offline
from the feature specs of the dataset builders. Nothing is downloaded."""

import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_jetformer.data import CAPTION_TEMPLATES
from keras_jetformer.data import caption_for_label
from keras_jetformer.data import class_prompt
from keras_jetformer.data import tfds_dataset
from keras_jetformer.data.tfds_loader import _pick_caption
from keras_jetformer.data.tfds_loader import _readable_class_names
from keras_jetformer.data.tfds_loader import _resize_and_center_crop

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=10):
        yield


def take_all(dataset):
    """Return the elements of a finite unbatched dataset as numpy arrays,
    in a list because image sizes may differ."""
    return list(dataset.as_numpy_iterator())


def raw_examples(name, split="train"):
    return list(tfds.load(name, split=split).as_numpy_iterator())


def check_element_spec(dataset, image_shape):
    spec = dataset.element_spec
    assert set(spec) == {"images", "prompts", "labels"}
    assert spec["images"].shape.as_list() == list(image_shape)
    assert spec["images"].dtype == tf.uint8
    assert spec["prompts"].dtype == tf.string
    assert spec["labels"].dtype == tf.int32


# mnist


def test_mnist_native_images(mock_tfds):
    dataset = tfds_dataset("mnist")
    elements = take_all(dataset)
    raw = raw_examples("mnist")

    check_element_spec(dataset, [28, 28, 1])
    assert len(elements) == 10
    for element, example in zip(elements, raw):
        assert np.array_equal(element["images"], example["image"])
        assert element["labels"] == example["label"]


def test_mnist_prompts_are_digit_captions(mock_tfds):
    elements = take_all(tfds_dataset("mnist", seed=2))

    for element in elements:
        label = int(element["labels"])
        captions = {
            caption_for_label(label, index)
            for index in range(len(CAPTION_TEMPLATES))
        }
        assert 0 <= label <= 9
        assert element["prompts"].decode() in captions


def test_mnist_class_prompts(mock_tfds):
    elements = take_all(tfds_dataset("mnist", random_captions=False))

    for element in elements:
        assert element["prompts"].decode() == class_prompt(element["labels"])


def test_mnist_same_size_is_identity(mock_tfds):
    native = take_all(tfds_dataset("mnist"))
    resized = take_all(tfds_dataset("mnist", image_size=28))

    for native_element, resized_element in zip(native, resized):
        assert np.array_equal(
            native_element["images"], resized_element["images"]
        )


def test_mnist_resize_keeps_one_channel(mock_tfds):
    dataset = tfds_dataset("mnist", image_size=20, batch_size=5)
    batches = list(dataset.as_numpy_iterator())

    check_element_spec(dataset, [None, 20, 20, 1])
    assert len(batches) == 2
    assert batches[0]["images"].shape == (5, 20, 20, 1)
    assert batches[0]["images"].dtype == np.uint8


def test_mnist_with_label_names(mock_tfds):
    names = [f"class_{i}" for i in range(10)]
    elements = take_all(tfds_dataset("mnist", label_names=names))

    for element in elements:
        expected = f"a photo of a class {element['labels']}"
        assert element["prompts"].decode() == expected


# cifar10


def test_cifar10_native_images(mock_tfds):
    dataset = tfds_dataset("cifar10", label_names=CIFAR10_NAMES)
    elements = take_all(dataset)
    raw = raw_examples("cifar10")

    check_element_spec(dataset, [32, 32, 3])
    for element, example in zip(elements, raw):
        assert np.array_equal(element["images"], example["image"])
        assert element["labels"] == example["label"]


def test_cifar10_prompts_from_label_names(mock_tfds):
    elements = take_all(tfds_dataset("cifar10", label_names=CIFAR10_NAMES))

    for element in elements:
        name = CIFAR10_NAMES[element["labels"]]
        article = "an" if name in ("airplane", "automobile") else "a"
        expected = f"a photo of {article} {name}"
        assert element["prompts"].decode() == expected


def test_cifar10_underscores_become_spaces(mock_tfds):
    names = ["pickup_truck"] * 10
    elements = take_all(tfds_dataset("cifar10", label_names=names))

    assert elements[0]["prompts"].decode() == "a photo of a pickup truck"


def test_cifar10_without_names_warns(mock_tfds):
    # Offline, TFDS has no cifar10 class names: the builder declares
    # ClassLabel(num_classes=10) and reads the names during preparation.
    with pytest.warns(UserWarning, match="has no class names"):
        dataset = tfds_dataset("cifar10")
    element = next(dataset.as_numpy_iterator())

    expected = f"a photo of a {element['labels']}"
    assert element["prompts"].decode() == expected


def test_resize_downsamples_uniform_image():
    image = tf.fill([32, 48, 3], tf.constant(77, tf.uint8))
    resized = _resize_and_center_crop(image, 8)

    assert resized.dtype == tf.uint8
    assert resized.shape == (8, 8, 3)
    assert np.all(resized.numpy() == 77)


def test_resize_crops_center():
    image = np.zeros((8, 16, 1), np.uint8)
    image[:, 4:12] = 200
    image[:, :4] = 10
    image[:, 12:] = 30
    cropped = _resize_and_center_crop(tf.constant(image), 8).numpy()

    assert cropped.shape == (8, 8, 1)
    assert np.all(cropped == 200)


def test_resize_crops_tall_image():
    image = np.random.RandomState(0).randint(0, 256, (30, 10, 3))
    image = image.astype(np.uint8)
    cropped = _resize_and_center_crop(tf.constant(image), 10).numpy()

    assert np.array_equal(cropped, image[10:20])


def test_resize_stays_within_uint8_range():
    # A checkerboard makes the antialiasing filter ring at the edges.
    image = np.indices((64, 64)).sum(axis=0) % 2 * 255
    image = np.repeat(image[..., None], 3, axis=-1).astype(np.uint8)
    resized = _resize_and_center_crop(tf.constant(image), 27).numpy()

    assert resized.dtype == np.uint8
    assert resized.shape == (27, 27, 3)
    assert 100 < resized.mean() < 155


@pytest.mark.parametrize(
    "label_names, fragment",
    [
        (CIFAR10_NAMES[:3], "len(label_names)=3"),
        ("airplane", "label_names='airplane'"),
        (CIFAR10_NAMES[:9] + [""], "non-empty strings"),
        (CIFAR10_NAMES[:9] + [3], "non-empty strings"),
    ],
)
def test_cifar10_rejects_label_names(mock_tfds, label_names, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        tfds_dataset("cifar10", label_names=label_names)


# coco_captions


def test_coco_prompts_are_element_captions(mock_tfds):
    dataset = tfds_dataset("coco_captions", image_size=16)
    elements = take_all(dataset)
    raw = raw_examples("coco_captions")

    check_element_spec(dataset, [16, 16, 3])
    assert len(elements) == 10
    for element, example in zip(elements, raw):
        captions = list(example["captions"]["text"])
        assert element["prompts"] in captions
        assert element["labels"] == -1
        assert element["images"].shape == (16, 16, 3)


def test_coco_first_caption_without_random(mock_tfds):
    elements = take_all(tfds_dataset("coco_captions", random_captions=False))
    raw = raw_examples("coco_captions")

    for element, example in zip(elements, raw):
        assert element["prompts"] == example["captions"]["text"][0]


def test_coco_native_sizes_kept(mock_tfds):
    elements = take_all(tfds_dataset("coco_captions"))
    raw = raw_examples("coco_captions")

    for element, example in zip(elements, raw):
        assert np.array_equal(element["images"], example["image"])


def test_coco_same_seed_reproduces(mock_tfds):
    first = take_all(tfds_dataset("coco_captions", image_size=8, seed=4))
    second = take_all(tfds_dataset("coco_captions", image_size=8, seed=4))

    assert [e["prompts"] for e in first] == [e["prompts"] for e in second]


def test_coco_other_seed_differs(mock_tfds):
    first = take_all(tfds_dataset("coco_captions", image_size=8, seed=4))
    second = take_all(tfds_dataset("coco_captions", image_size=8, seed=5))

    assert [e["prompts"] for e in first] != [e["prompts"] for e in second]


def test_coco_explicit_caption_key(mock_tfds):
    elements = take_all(
        tfds_dataset(
            "coco_captions", caption_key="captions/text", random_captions=False
        )
    )
    raw = raw_examples("coco_captions")

    assert elements[0]["prompts"] == raw[0]["captions"]["text"][0]


def test_coco_rejects_unknown_caption_key(mock_tfds):
    with pytest.raises(ValueError, match="Available features: .*captions/"):
        tfds_dataset("coco_captions", caption_key="captions/title")


def test_coco_batching_needs_image_size(mock_tfds):
    with pytest.raises(ValueError, match=r"Received: image_size=None"):
        tfds_dataset("coco_captions", batch_size=2)


def test_pick_caption_handles_empty_list():
    empty = tf.constant([], tf.string)
    captions = tf.constant(["first", "second"])
    draw = tf.constant(3, tf.int64)

    assert _pick_caption(empty, draw).numpy() == b""
    assert _pick_caption(captions, draw).numpy() == b"second"


# Other datasets


def test_imagenet_prompts_use_class_names(mock_tfds):
    dataset = tfds_dataset("imagenet2012", split="validation", image_size=24)
    elements = take_all(dataset)

    check_element_spec(dataset, [24, 24, 3])
    for element in elements:
        prompt = element["prompts"].decode()
        assert prompt.startswith("a photo of "), prompt
        assert "_" not in prompt
        assert not any(word.startswith("n0") for word in prompt.split())


def test_readable_class_names():
    names = _readable_class_names(["n01440764", "n01443537", "n01484850"])

    assert names == ["tench", "goldfish", "great white shark"]
    assert _readable_class_names(["cat", "pickup_truck"]) == [
        "cat",
        "pickup truck",
    ]


def test_dataset_without_labels_or_captions(mock_tfds):
    dataset = tfds_dataset("celeb_a", image_size=32)
    elements = take_all(dataset)

    check_element_spec(dataset, [32, 32, 3])
    for element in elements:
        assert element["prompts"] == b""
        assert element["labels"] == -1


def test_dataset_without_images_rejected(mock_tfds):
    with pytest.raises(ValueError, match="has no 'image' feature"):
        tfds_dataset("imdb_reviews")


def test_label_names_need_class_labels(mock_tfds):
    with pytest.raises(ValueError, match="needs a dataset with a `Class"):
        tfds_dataset("coco_captions", label_names=["person"])


# Shuffling, repetition and batching


def test_shuffle_same_seed_reproduces(mock_tfds):
    first = take_all(tfds_dataset("mnist", shuffle=True, seed=3))
    second = take_all(tfds_dataset("mnist", shuffle=True, seed=3))

    assert [e["labels"] for e in first] == [e["labels"] for e in second]
    assert [e["prompts"] for e in first] == [e["prompts"] for e in second]
    for first_element, second_element in zip(first, second):
        assert np.array_equal(
            first_element["images"], second_element["images"]
        )


def test_shuffle_other_seed_differs():
    with tfds.testing.mock_data(num_examples=40):
        first = take_all(tfds_dataset("mnist", shuffle=True, seed=3))
        second = take_all(tfds_dataset("mnist", shuffle=True, seed=4))

    first_images = np.stack([e["images"] for e in first])
    second_images = np.stack([e["images"] for e in second])
    assert not np.array_equal(first_images, second_images)
    assert np.array_equal(
        np.sort(first_images.reshape(40, -1), axis=0),
        np.sort(second_images.reshape(40, -1), axis=0),
    )


def test_batches_keep_remainder(mock_tfds):
    batches = list(tfds_dataset("mnist", batch_size=4).as_numpy_iterator())

    assert [len(batch["labels"]) for batch in batches] == [4, 4, 2]
    assert batches[0]["images"].shape == (4, 28, 28, 1)
    assert batches[0]["prompts"].shape == (4,)


def test_shuffled_batches_drop_remainder(mock_tfds):
    dataset = tfds_dataset("mnist", batch_size=4, shuffle=True)
    batches = list(dataset.as_numpy_iterator())

    assert dataset.element_spec["images"].shape == (4, 28, 28, 1)
    assert [len(batch["labels"]) for batch in batches] == [4, 4]


def test_repeat_yields_static_batches(mock_tfds):
    dataset = tfds_dataset(
        "cifar10", batch_size=4, repeat=True, label_names=CIFAR10_NAMES
    )
    batches = list(dataset.take(6).as_numpy_iterator())

    assert dataset.element_spec["images"].shape == (4, 32, 32, 3)
    assert len(batches) == 6
    assert all(batch["labels"].shape == (4,) for batch in batches)


# Argument errors


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="list_builders") as info:
        tfds_dataset("mnist_does_not_exist")
    assert "Received: name='mnist_does_not_exist'" in str(info.value)


def test_unprepared_dataset_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        tfds_dataset("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("image_size", [0, -8, 16.0, "16", True])
def test_rejects_image_size(image_size):
    with pytest.raises(ValueError, match=r"Received: image_size="):
        tfds_dataset("mnist", image_size=image_size)


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        ({"name": ""}, "Received: name=''"),
        ({"name": None}, "Received: name=None"),
        ({"split": 3}, "Received: split=3"),
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"seed": "1"}, "Received: seed='1'"),
        ({"shuffle_buffer_size": 0}, "Received: shuffle_buffer_size=0"),
    ],
)
def test_rejects_arguments(arguments, fragment):
    arguments = {"name": "mnist", **arguments}
    with pytest.raises(ValueError, match=re.escape(fragment)):
        tfds_dataset(**arguments)
