"""Tests for the image, patch grid and token sequence conversions."""

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

from keras_hub.src.tests.test_case import TestCase

from keras_jetformer.layers.patching import grid_to_tokens
from keras_jetformer.layers.patching import patchify
from keras_jetformer.layers.patching import tokens_to_grid
from keras_jetformer.layers.patching import unpatchify

# (batch, height, width, channels, patch_size): square and rectangular images
# with one, two, three and four channels.
IMAGE_CASES = (
    (2, 4, 4, 1, 2),
    (2, 6, 8, 3, 2),
    (1, 6, 9, 2, 3),
    (3, 8, 4, 4, 4),
    (2, 3, 5, 3, 1),
)


def distinct_images(batch, height, width, channels):
    """Return float32 images in which every value differs from all others."""
    size = batch * height * width * channels
    return np.arange(size, dtype="float32").reshape(
        batch, height, width, channels
    )


def named_cases():
    return [
        {
            "testcase_name": f"{b}x{h}x{w}x{c}_patch{p}",
            "shape": (b, h, w, c),
            "patch_size": p,
        }
        for b, h, w, c, p in IMAGE_CASES
    ]


class PatchingTest(TestCase):
    @parameterized.named_parameters(*named_cases())
    def test_unpatchify_inverts_patchify(self, shape, patch_size):
        images = distinct_images(*shape)

        grid = patchify(images, patch_size)
        restored = unpatchify(grid, patch_size)

        self.assertEqual(tuple(restored.shape), shape)
        self.assertAllEqual(ops.convert_to_numpy(restored), images)

    @parameterized.named_parameters(*named_cases())
    def test_patchify_output_shape(self, shape, patch_size):
        batch, height, width, channels = shape
        images = distinct_images(*shape)

        grid = patchify(images, patch_size)

        self.assertEqual(
            tuple(grid.shape),
            (
                batch,
                height // patch_size,
                width // patch_size,
                patch_size * patch_size * channels,
            ),
        )

    @parameterized.named_parameters(*named_cases())
    def test_token_layout_matches_hand_indexing(self, shape, patch_size):
        batch, height, width, channels = shape
        grid_width = width // patch_size
        images = distinct_images(*shape)

        tokens = ops.convert_to_numpy(
            grid_to_tokens(patchify(images, patch_size))
        )

        # Token `grid_row * grid_width + grid_col` contains the patch at that
        # grid position. Inside it, value `(row * p + col) * C + channel`
        # is the pixel at that row and column of the patch.
        num_tokens = (height // patch_size) * grid_width
        token_dim = patch_size * patch_size * channels
        expected = np.zeros((batch, num_tokens, token_dim), "float32")
        for token_index in range(num_tokens):
            grid_row, grid_col = divmod(token_index, grid_width)
            for row in range(patch_size):
                for col in range(patch_size):
                    for channel in range(channels):
                        value_index = (row * patch_size + col) * channels
                        value_index += channel
                        expected[:, token_index, value_index] = images[
                            :,
                            grid_row * patch_size + row,
                            grid_col * patch_size + col,
                            channel,
                        ]
        self.assertAllEqual(tokens, expected)

    def test_specific_patch_contents(self):
        # A 4x6 image with 2 channels and 2x2 patches gives a 2x3 grid.
        images = distinct_images(1, 4, 6, 2)

        tokens = ops.convert_to_numpy(grid_to_tokens(patchify(images, 2)))

        # Token 4 is grid row 1, grid column 1: image rows 2-3, columns 2-3.
        expected = np.array(
            [
                images[0, 2, 2, 0],
                images[0, 2, 2, 1],
                images[0, 2, 3, 0],
                images[0, 2, 3, 1],
                images[0, 3, 2, 0],
                images[0, 3, 2, 1],
                images[0, 3, 3, 0],
                images[0, 3, 3, 1],
            ]
        )
        self.assertAllEqual(tokens[0, 4], expected)
        # The pixel (row 2, column 2) starts at index ((2 * 6) + 2) * 2.
        self.assertAllEqual(
            tokens[0, 4], [28, 29, 30, 31, 40, 41, 42, 43]
        )

    def test_patch_size_one_keeps_pixel_order(self):
        images = distinct_images(2, 3, 5, 3)

        tokens = ops.convert_to_numpy(grid_to_tokens(patchify(images, 1)))

        self.assertAllEqual(tokens, images.reshape(2, 15, 3))

    def test_integer_images_round_trip(self):
        images = distinct_images(2, 4, 6, 3).astype("int32")

        restored = unpatchify(patchify(images, 2), 2)

        self.assertAllEqual(ops.convert_to_numpy(restored), images)

    @parameterized.named_parameters(*named_cases())
    def test_tokens_to_grid_inverts_grid_to_tokens(self, shape, patch_size):
        _, height, width, _ = shape
        grid_height, grid_width = height // patch_size, width // patch_size
        grid = patchify(distinct_images(*shape), patch_size)

        tokens = grid_to_tokens(grid)
        restored = tokens_to_grid(tokens, grid_height, grid_width)

        self.assertEqual(
            tuple(tokens.shape),
            (shape[0], grid_height * grid_width, grid.shape[-1]),
        )
        self.assertAllEqual(
            ops.convert_to_numpy(restored), ops.convert_to_numpy(grid)
        )

    def test_grid_to_tokens_is_row_major(self):
        grid = distinct_images(2, 3, 4, 5)

        tokens = ops.convert_to_numpy(grid_to_tokens(grid))

        for row in range(3):
            for col in range(4):
                self.assertAllEqual(tokens[:, row * 4 + col], grid[:, row, col])

    def test_patchify_rejects_height_not_divisible(self):
        images = np.zeros((1, 5, 4, 3), "float32")

        with self.assertRaisesRegex(ValueError, "divisible by the patch"):
            patchify(images, 2)

    def test_patchify_rejects_width_not_divisible(self):
        images = np.zeros((1, 6, 7, 3), "float32")

        with self.assertRaisesRegex(ValueError, "divisible by the patch"):
            patchify(images, 3)

    def test_patchify_rejects_dynamic_size(self):
        images = keras.KerasTensor((None, None, 4, 3))

        with self.assertRaisesRegex(ValueError, "static image height"):
            patchify(images, 2)

    def test_unpatchify_rejects_token_dim_not_multiple(self):
        grid = np.zeros((1, 2, 2, 6), "float32")

        with self.assertRaisesRegex(ValueError, "multiple of patch_size"):
            unpatchify(grid, 2)
