"""Tests of `image_folder_dataset` on PNG, JPEG and other files written
with Pillow into a temporary folder."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_jetformer.data import image_folder_dataset
from keras_jetformer.data.tfds_loader import _resize_and_center_crop


def write_image(path, pixels, image_format=None):
    """Write a uint8 `[H, W]` or `[H, W, C]` array as an image file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    Image.fromarray(pixels).save(path, format=image_format)
    return path


def random_pixels(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8") as file:
        file.write("file_name,caption\n")
        for file_name, caption in rows:
            file.write(f'{file_name},"{caption}"\n')
    return str(path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    return str(path)


def take_all(dataset):
    return list(dataset.as_numpy_iterator())


def check_element_spec(dataset, image_shape):
    spec = dataset.element_spec
    assert set(spec) == {"images", "prompts", "labels"}
    assert spec["images"].shape.as_list() == list(image_shape)
    assert spec["images"].dtype == tf.uint8
    assert spec["prompts"].dtype == tf.string
    assert spec["labels"].dtype == tf.int32


@pytest.fixture
def captioned_folder(tmp_path):
    """Three 8x8 gray PNGs, one in a sub-folder, and their captions.

    Returns `(folder, {file name: (pixels, captions)})`.
    """
    folder = tmp_path / "images"
    images = {
        "a.png": (random_pixels((8, 8), 0), ["a first image", "one more"]),
        "b.png": (random_pixels((8, 8), 1), ["a second image"]),
        "sub/c.png": (random_pixels((8, 8), 2), ["a third image"]),
    }
    for name, (pixels, _) in images.items():
        write_image(str(folder / name), pixels)
    return folder, images


@pytest.fixture
def captions_csv(captioned_folder):
    folder, images = captioned_folder
    rows = [
        (name, caption)
        for name, (_, captions) in images.items()
        for caption in captions
    ]
    return write_csv(folder / "captions.csv", rows)


@pytest.fixture
def class_folder(tmp_path):
    """Two classes of 8x8 gray PNGs: `golden_retriever` (2) and `cat` (1)."""
    folder = tmp_path / "classes"
    write_image(str(folder / "golden_retriever" / "1.png"), random_pixels((8, 8), 0))
    write_image(str(folder / "golden_retriever" / "2.png"), random_pixels((8, 8), 1))
    write_image(str(folder / "cat" / "1.png"), random_pixels((8, 8), 2))
    return folder


# --- Captions files ---------------------------------------------------------------


def test_csv_images_and_captions(captioned_folder, captions_csv):
    folder, images = captioned_folder
    dataset = image_folder_dataset(folder, 8, captions_file=captions_csv)
    elements = take_all(dataset)

    check_element_spec(dataset, [8, 8, 1])
    assert dataset.class_names is None
    # Sorted by path: a.png, b.png, sub/c.png.
    assert len(elements) == 3
    for element, (pixels, captions) in zip(elements, images.values()):
        np.testing.assert_array_equal(element["images"][..., 0], pixels)
        assert element["prompts"].decode() in captions
        assert element["labels"] == -1


def test_csv_first_caption_without_random(captioned_folder, captions_csv):
    folder, images = captioned_folder
    dataset = image_folder_dataset(
        folder, 8, captions_file=captions_csv, random_captions=False
    )
    prompts = [element["prompts"].decode() for element in take_all(dataset)]
    assert prompts == [captions[0] for _, captions in images.values()]


def test_random_captions_cover_all(captioned_folder, captions_csv):
    folder, _ = captioned_folder
    dataset = image_folder_dataset(
        folder, 8, captions_file=captions_csv, repeat=True, seed=3
    )
    # Element 0 of every epoch is a.png, which has two captions.
    prompts = {
        element["prompts"].decode()
        for index, element in enumerate(dataset.take(60).as_numpy_iterator())
        if index % 3 == 0
    }
    assert prompts == {"a first image", "one more"}


def test_jsonl_caption_lists(captioned_folder):
    folder, images = captioned_folder
    records = [
        {"file_name": "a.png", "caption": ["a first image", "one more"]},
        {"file_name": "b.png", "caption": "a second image"},
        {"file_name": "sub/c.png", "caption": "a third image"},
        {"file_name": "sub/c.png", "caption": "also the third"},
    ]
    captions_file = write_jsonl(folder / "captions.jsonl", records)
    dataset = image_folder_dataset(
        folder, 8, captions_file=captions_file, random_captions=False
    )
    elements = take_all(dataset)

    assert [element["prompts"].decode() for element in elements] == [
        "a first image",
        "a second image",
        "a third image",
    ]
    np.testing.assert_array_equal(
        elements[2]["images"][..., 0], images["sub/c.png"][0]
    )


def test_captions_file_outside_folder(captioned_folder, tmp_path):
    folder, _ = captioned_folder
    captions_file = write_csv(
        tmp_path / "elsewhere.csv",
        [("a.png", "x"), ("b.png", "y"), ("sub/c.png", "z")],
    )
    dataset = image_folder_dataset(str(folder), 8, captions_file=captions_file)
    assert len(take_all(dataset)) == 3


# --- Class sub-folders ---------------------------------------------------------------


def test_class_folders(class_folder):
    dataset = image_folder_dataset(class_folder, 8)
    elements = take_all(dataset)

    check_element_spec(dataset, [8, 8, 1])
    assert dataset.class_names == ["cat", "golden_retriever"]
    assert [int(element["labels"]) for element in elements] == [0, 1, 1]
    assert [element["prompts"].decode() for element in elements] == [
        "a photo of a cat",
        "a photo of a golden retriever",
        "a photo of a golden retriever",
    ]
    np.testing.assert_array_equal(
        elements[0]["images"][..., 0], random_pixels((8, 8), 2)
    )


def test_class_prompt_template(class_folder):
    dataset = image_folder_dataset(
        class_folder, 8, class_prompt_template="{name}"
    )
    prompts = [element["prompts"].decode() for element in take_all(dataset)]
    assert prompts == ["cat", "golden retriever", "golden retriever"]


def test_ignores_hidden_and_other_files(class_folder):
    (class_folder / "cat" / "notes.txt").write_text("not an image")
    (class_folder / "cat" / ".hidden.png").write_text("not an image")
    (class_folder / ".cache").mkdir()
    dataset = image_folder_dataset(class_folder, 8)
    assert dataset.class_names == ["cat", "golden_retriever"]
    assert len(take_all(dataset)) == 3


# --- Pixels: formats, channels, size --------------------------------------------------


def test_formats_and_channel_conversion(tmp_path):
    folder = tmp_path / "mixed"
    gray = random_pixels((6, 6), 0)
    rgb = random_pixels((6, 6, 3), 1)
    rgba = random_pixels((6, 6, 4), 2)
    write_image(str(folder / "1_gray.png"), gray)
    write_image(str(folder / "2_rgb.bmp"), rgb)
    write_image(str(folder / "3_rgba.png"), rgba)
    captions_file = write_csv(
        tmp_path / "captions.csv",
        [("1_gray.png", "g"), ("2_rgb.bmp", "c"), ("3_rgba.png", "t")],
    )

    def images(channels):
        dataset = image_folder_dataset(
            folder, 6, captions_file=captions_file, channels=channels
        )
        return [element["images"] for element in take_all(dataset)]

    # None takes the first image's count: 1.
    gray_images = images(None)
    np.testing.assert_array_equal(gray_images[0][..., 0], gray)
    expected_gray = tf.image.rgb_to_grayscale(rgb.astype("float32"))
    np.testing.assert_array_equal(
        gray_images[1], np.round(expected_gray.numpy()).astype("uint8")
    )

    rgb_images = images(3)
    np.testing.assert_array_equal(rgb_images[0], np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(rgb_images[1], rgb)
    np.testing.assert_array_equal(rgb_images[2], rgba[..., :3])

    rgba_images = images(4)
    np.testing.assert_array_equal(rgba_images[1][..., :3], rgb)
    np.testing.assert_array_equal(rgba_images[1][..., 3], 255)
    np.testing.assert_array_equal(rgba_images[2], rgba)

    gray_alpha_images = images(2)
    np.testing.assert_array_equal(gray_alpha_images[0][..., 0], gray)
    np.testing.assert_array_equal(gray_alpha_images[2][..., 1], rgba[..., 3])


def test_jpeg_matches_pillow_decoding(tmp_path):
    folder = tmp_path / "photos"
    # A smooth image, so that JPEG artifacts stay small.
    ramp = np.linspace(0, 255, 16, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128), -1)
    path = write_image(str(folder / "animals" / "ramp.jpg"), pixels.astype("uint8"))

    dataset = image_folder_dataset(folder, 16)
    (element,) = take_all(dataset)
    decoded_by_pillow = np.asarray(Image.open(path).convert("RGB"))

    check_element_spec(dataset, [16, 16, 3])
    # libjpeg builds differ by a few levels in chroma upsampling.
    difference = np.abs(element["images"].astype(int) - decoded_by_pillow)
    assert difference.max() <= 4


def test_resize_and_center_crop(tmp_path):
    folder = tmp_path / "wide"
    # A 20x40 image whose center 20x20 square is white.
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, 10:30] = 255
    write_image(str(folder / "shapes" / "wide.png"), pixels)

    (native,) = take_all(image_folder_dataset(folder, 20))
    np.testing.assert_array_equal(native["images"][..., 0], 255)

    (smaller,) = take_all(image_folder_dataset(folder, 10))
    expected = _resize_and_center_crop(tf.constant(pixels[..., None]), 10)
    assert smaller["images"].shape == (10, 10, 1)
    np.testing.assert_array_equal(smaller["images"], expected.numpy())


def test_images_of_different_sizes_batch(tmp_path):
    folder = tmp_path / "sizes"
    write_image(str(folder / "a" / "tall.png"), random_pixels((30, 12, 3), 0))
    write_image(str(folder / "a" / "wide.png"), random_pixels((9, 25, 3), 1))
    dataset = image_folder_dataset(folder, 8, batch_size=2)
    (batch,) = take_all(dataset)

    check_element_spec(dataset, [None, 8, 8, 3])
    assert batch["images"].shape == (2, 8, 8, 3)


# --- Shuffle, repeat and batch ------------------------------------------------------------


@pytest.fixture
def ten_images(tmp_path):
    folder = tmp_path / "ten"
    for index in range(10):
        write_image(
            str(folder / f"class_{index % 2}" / f"{index}.png"),
            np.full((4, 4), index, np.uint8),
        )
    return folder


def first_pixels(dataset):
    return [int(element["images"][0, 0, 0]) for element in take_all(dataset)]


def test_shuffle_same_seed_reproduces(ten_images):
    first = first_pixels(image_folder_dataset(ten_images, 4, shuffle=True, seed=1))
    again = first_pixels(image_folder_dataset(ten_images, 4, shuffle=True, seed=1))
    other = first_pixels(image_folder_dataset(ten_images, 4, shuffle=True, seed=2))

    assert sorted(first) == list(range(10))
    assert first == again
    assert first != other


def test_batches_keep_remainder(ten_images):
    batches = take_all(image_folder_dataset(ten_images, 4, batch_size=4))
    assert [len(batch["labels"]) for batch in batches] == [4, 4, 2]


def test_shuffled_batches_drop_remainder(ten_images):
    dataset = image_folder_dataset(ten_images, 4, batch_size=4, shuffle=True)
    assert [len(batch["labels"]) for batch in take_all(dataset)] == [4, 4]
    check_element_spec(dataset, [4, 4, 4, 1])


def test_repeat_is_endless(ten_images):
    dataset = image_folder_dataset(ten_images, 4, batch_size=4, repeat=True)
    batches = list(dataset.take(6).as_numpy_iterator())
    assert len(batches) == 6
    assert all(batch["images"].shape == (4, 4, 4, 1) for batch in batches)


# --- Errors ------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = str(tmp_path / "absent")
    with pytest.raises(ValueError, match="does not exist") as error:
        image_folder_dataset(missing, 8)
    assert f"Received: directory={missing!r}" in str(error.value)


def test_directory_must_be_a_path():
    with pytest.raises(TypeError, match="`directory` must be a path"):
        image_folder_dataset(3, 8)


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="No images found"):
        image_folder_dataset(tmp_path, 8)


def test_empty_class_folder(class_folder):
    (class_folder / "dog").mkdir()
    with pytest.raises(ValueError, match="class folder .*dog has no images"):
        image_folder_dataset(class_folder, 8)


def test_images_without_classes_or_captions(tmp_path):
    write_image(str(tmp_path / "photo.png"), random_pixels((4, 4), 0))
    with pytest.raises(ValueError, match="have no captions: pass a `captions_file`"):
        image_folder_dataset(tmp_path, 8)


def test_images_beside_class_folders(class_folder):
    write_image(str(class_folder / "loose.png"), random_pixels((4, 4), 0))
    with pytest.raises(ValueError, match="outside the class sub-folders.*loose.png"):
        image_folder_dataset(class_folder, 8)


def test_image_without_caption(captioned_folder, tmp_path):
    folder, _ = captioned_folder
    captions_file = write_csv(tmp_path / "partial.csv", [("a.png", "x")])
    with pytest.raises(ValueError, match="2 images in .* have no caption") as error:
        image_folder_dataset(folder, 8, captions_file=captions_file)
    assert "'b.png'" in str(error.value)
    assert repr(os.path.join("sub", "c.png")) in str(error.value)


def test_captioned_file_missing(captioned_folder, tmp_path):
    folder, _ = captioned_folder
    captions_file = write_csv(
        tmp_path / "extra.csv",
        [("a.png", "x"), ("b.png", "y"), ("sub/c.png", "z"), ("gone.png", "w")],
    )
    with pytest.raises(ValueError, match="names 1 files that do not exist.*gone"):
        image_folder_dataset(folder, 8, captions_file=captions_file)


def test_unreadable_image(class_folder):
    (class_folder / "cat" / "broken.png").write_text("not a PNG")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        image_folder_dataset(class_folder, 8)


def test_captions_file_errors(captioned_folder, tmp_path):
    folder, _ = captioned_folder
    cases = [
        ("missing.csv", None, "does not exist"),
        ("captions.txt", "file_name,caption\n", "CSV .* or JSON Lines"),
        ("columns.csv", "path,text\na.png,x\n", "'file_name' is missing"),
        ("empty.csv", "file_name,caption\n", "lists no images"),
        ("blank.csv", "file_name,caption\na.png,\n", "empty or non-string"),
        ("bad.jsonl", '{"file_name": "a.png"\n', "Line 1 .* not valid JSON"),
        ("keys.jsonl", '{"file": "a.png", "caption": "x"}\n', "keys 'file_name'"),
        ("list.jsonl", '{"file_name": "a.png", "caption": []}\n', "non-string"),
    ]
    for name, contents, message in cases:
        path = tmp_path / name
        if contents is not None:
            path.write_text(contents)
        with pytest.raises(ValueError, match=message) as error:
            image_folder_dataset(folder, 8, captions_file=str(path))
        assert "Received:" in str(error.value), name


def test_captions_file_must_be_a_path(captioned_folder):
    folder, _ = captioned_folder
    with pytest.raises(TypeError, match="`captions_file` must be a path"):
        image_folder_dataset(folder, 8, captions_file=["a.png"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"image_size": 0}, "Received: image_size=0"),
        ({"image_size": None}, "Received: image_size=None"),
        ({"channels": 5}, "Received: channels=5"),
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"seed": "a"}, "Received: seed='a'"),
        ({"class_prompt_template": "photo"}, "`{name}` placeholder"),
        ({"class_prompt_template": "{name} {other}"}, "only use the placeholders"),
    ],
)
def test_invalid_arguments(class_folder, arguments, message):
    arguments = {"image_size": 8, **arguments}
    with pytest.raises(ValueError, match=re.escape(message)):
        image_folder_dataset(class_folder, **arguments)
