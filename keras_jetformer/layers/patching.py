"""Conversions between images, patch grids and token sequences.

Dimension legend: B batch, H and W image height and width, C channels,
p patch size, h = H / p and w = W / p grid height and width, N = h * w tokens,
D = p * p * C values per token.

A patch's values are ordered (row in patch, column in patch, channel), with
the channel fastest, and tokens run over the grid row by row.
"""

from keras import ops


def _check_divisible(height, width, patch_size):
    if height is None or width is None:
        raise ValueError(
            "Patching needs a static image height and width. "
            f"Received: height={height}, width={width}"
        )
    if height % patch_size or width % patch_size:
        raise ValueError(
            "The image height and width must be divisible by the patch size. "
            f"Received: image size=({height}, {width}), "
            f"patch_size={patch_size}"
        )


def patchify(images, patch_size):
    """Cut `[B, H, W, C]` images into a `[B, h, w, p * p * C]` patch grid."""
    _, height, width, channels = images.shape
    _check_divisible(height, width, patch_size)
    grid_height, grid_width = height // patch_size, width // patch_size
    x = ops.reshape(
        images,
        (-1, grid_height, patch_size, grid_width, patch_size, channels),
    )
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(
        x, (-1, grid_height, grid_width, patch_size * patch_size * channels)
    )


def unpatchify(grid, patch_size):
    """Reassemble a `[B, h, w, p * p * C]` patch grid into `[B, H, W, C]`."""
    _, grid_height, grid_width, token_dim = grid.shape
    if token_dim % (patch_size * patch_size):
        raise ValueError(
            "The token dimension must be a multiple of patch_size**2. "
            f"Received: token_dim={token_dim}, patch_size={patch_size}"
        )
    channels = token_dim // (patch_size * patch_size)
    x = ops.reshape(
        grid,
        (-1, grid_height, grid_width, patch_size, patch_size, channels),
    )
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(
        x, (-1, grid_height * patch_size, grid_width * patch_size, channels)
    )


def grid_to_tokens(grid):
    """Flatten a `[B, h, w, D]` grid row by row into `[B, h * w, D]` tokens."""
    _, grid_height, grid_width, token_dim = grid.shape
    return ops.reshape(grid, (-1, grid_height * grid_width, token_dim))


def tokens_to_grid(tokens, grid_height, grid_width):
    """Fold `[B, h * w, D]` tokens back into a `[B, h, w, D]` grid."""
    token_dim = tokens.shape[-1]
    return ops.reshape(tokens, (-1, grid_height, grid_width, token_dim))
