"""The image format between the data side and the network: normalisation statistics and the patch layout.

The one module that both src/data (which normalises images and cuts patches) and src/models import.
An image (C, H, W) becomes N = (H/P) * (W/P) patches, row by row, each flattened as (P, P, C):
(N, P*P*C). Nothing else in the project reshapes between images and patches.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from src.errors import ConfigError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def patch_grid(image_size: int, patch_size: int) -> int:
    """Patches per side of a square image; the one check that the patch size divides the image."""
    if image_size < 1 or patch_size < 1:
        raise ConfigError(f"image_size and patch_size must be positive integers, got {image_size} and {patch_size}")
    if image_size % patch_size:
        raise ConfigError(f"patch_size={patch_size} does not divide image_size={image_size}")
    return image_size // patch_size


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Images (*, C, H, W) -> flattened patches (*, N, P*P*C), row by row; one image or a batch."""
    *lead, C, H, W = images.shape
    P = patch_size
    h, w = patch_grid(H, P), patch_grid(W, P)
    x = images.reshape(*lead, C, h, P, w, P)  # (*, C, h, P, w, P)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # (*, h, w, P, P, C)
    return x.reshape(*lead, h * w, P * P * C)  # (*, N, P*P*C)


def _grid(patches: Tensor, patch_size: int, image_size: int | tuple[int, int] | None) -> tuple[int, int, int]:
    """(h, w, C) of patches (*, N, P*P*C): square unless `image_size` says otherwise."""
    N, D = patches.shape[-2:]
    P = patch_size
    if image_size is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"{N} patches do not tile a square image; pass image_size")
        return side, side, D // (P * P)
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    return H // P, W // P, D // (P * P)


def unpatchify(patches: Tensor, patch_size: int, image_size: int | tuple[int, int] | None = None,
               channels_last: bool = False) -> Tensor:
    """Flattened patches (*, N, P*P*C), row by row -> the images (*, C, H, W); square unless `image_size` says.

    `channels_last`: the same images laid out (*, H, W, C) in memory (PyTorch's channels_last), which
    the patches' own (P, P, C) order gives with one copy and oneDNN's CPU convolutions run fastest.
    """
    *lead, _, _ = patches.shape
    P = patch_size
    h, w, C = _grid(patches, P, image_size)
    x = patches.reshape(*lead, h, w, P, P, C)  # (*, h, w, P, P, C)
    n = len(lead)
    if channels_last:
        x = x.permute(*range(n), n, n + 2, n + 1, n + 3, n + 4)  # (*, h, P, w, P, C)
        return x.reshape(*lead, h * P, w * P, C).movedim(-1, -3)  # (*, C, H, W), channels innermost
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)  # (*, C, h, P, w, P)
    return x.reshape(*lead, C, h * P, w * P)  # (*, C, H, W)


def hflip_patches(patches: Tensor, patch_size: int) -> Tensor:
    """The patches of the mirror images (*, N, P*P*C): patch columns and the columns inside each
    patch reversed, without reassembling the images."""
    *lead, N, D = patches.shape
    P = patch_size
    h, w, C = _grid(patches, P, None)
    x = patches.reshape(*lead, h, w, P, P, C).flip(-4, -2)  # (*, h, w, P, P, C), w and column axes reversed
    return x.reshape(*lead, N, D)


def resize_patches(patches: Tensor, patch_size: int, size: int) -> Tensor:
    """The patches (*, N, P*P*C) of the same square images resized to `size` px (bilinear, antialiased):
    (*, (size/P)**2, P*P*C). For progressive resizing: training batches at a lower resolution."""
    *lead, N, _ = patches.shape
    patch_grid(size, patch_size)
    if math.isqrt(N) * patch_size == size:
        return patches
    images = unpatchify(patches, patch_size).flatten(0, -4)  # (B, C, H, W)
    small = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return patchify(small.reshape(*lead, *small.shape[1:]), patch_size)
