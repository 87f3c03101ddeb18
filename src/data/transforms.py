"""Patchify transform, train/eval augmentation presets and normalisation statistics."""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

from src.errors import ConfigError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Augment = Literal["randaugment", "autoaugment", "simclr", "none"]


class PatchifyTransform:
    """Cut an image (C, H, W) into a sequence of flattened patches (N, P*P*C), row by row."""

    def __init__(self, patch_size: int) -> None:
        if patch_size < 1:
            raise ConfigError(f"patch_size must be a positive integer, got {patch_size}")
        self.patch_size = patch_size

    def __call__(self, image: Tensor) -> Tensor:
        return patchify(image, self.patch_size)

    def inverse(self, patches: Tensor, image_size: int | tuple[int, int]) -> Tensor:
        """Reassemble (N, P*P*C) patches into the (C, H, W) image they were cut from."""
        return unpatchify(patches, self.patch_size, image_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(patch_size={self.patch_size})"


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Images (*, C, H, W) -> flattened patches (*, N, P*P*C), row by row; one image or a batch."""
    *lead, C, H, W = images.shape
    P = patch_size
    if H % P or W % P:
        raise ConfigError(f"patch_size={P} does not divide the image size {H}x{W}")
    x = images.reshape(*lead, C, H // P, P, W // P, P)  # (*, C, h, P, w, P)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # (*, h, w, P, P, C)
    return x.reshape(*lead, (H // P) * (W // P), P * P * C)  # (*, N, P*P*C)


def unpatchify(patches: Tensor, patch_size: int, image_size: int | tuple[int, int] | None = None) -> Tensor:
    """Flattened patches (*, N, P*P*C), row by row -> the images (*, C, H, W); square unless `image_size` says."""
    *lead, N, D = patches.shape
    P = patch_size
    if image_size is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"{N} patches do not tile a square image; pass image_size")
        image_size = side * P
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    h, w, C = H // P, W // P, D // (P * P)
    x = patches.reshape(*lead, h, w, P, P, C)  # (*, h, w, P, P, C)
    n = len(lead)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)  # (*, C, h, P, w, P)
    return x.reshape(*lead, C, H, W)  # (*, C, H, W)


def hflip_patches(patches: Tensor, patch_size: int) -> Tensor:
    """The patches of the mirror images: square images (*, N, P*P*C) flipped left to right."""
    return patchify(unpatchify(patches, patch_size).flip(-1), patch_size)  # (*, N, P*P*C)


def _to_patches(patch_size: int, mean: Sequence[float], std: Sequence[float], erase_prob: float = 0.0) -> list:
    """Common tail of every preset: float tensor in [0, 1], normalise, (random erasing), patchify."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        *erasing(erase_prob),
        PatchifyTransform(patch_size),
    ]


def erasing(erase_prob: float) -> list:
    """Random erasing (Zhong et al. 2020) of one box per image with probability `erase_prob`, after
    normalisation, so the box takes the mean colour (0); nothing when `erase_prob` is 0."""
    if not 0.0 <= erase_prob <= 1.0:
        raise ConfigError(f"erase_prob must be in [0, 1], got {erase_prob}")
    return [v2.RandomErasing(p=erase_prob)] if erase_prob > 0 else []


def eval_transform(
    image_size: int, patch_size: int, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """Deterministic preprocessing: shorter side to `image_size`, centre crop, normalise, patchify."""
    if image_size % patch_size:
        raise ConfigError(f"patch_size={patch_size} does not divide image_size={image_size}")
    return v2.Compose(
        [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
        + _to_patches(patch_size, mean, std)
    )


def train_transform(
    image_size: int,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Augment = "randaugment",
    erase_prob: float = 0.0,
) -> v2.Compose:
    """Augmentation for small images: reflect-padded random crop, flip and an optional policy.

    The crop moves the image by up to 1/8 of its size (4 px at 32 px), the CIFAR standard; there is
    deliberately no aggressive random-resized crop, which destroys small images.
    """
    if image_size % patch_size:
        raise ConfigError(f"patch_size={patch_size} does not divide image_size={image_size}")
    return v2.Compose(
        [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            *policy(augment),
        ]
        + _to_patches(patch_size, mean, std, erase_prob)
    )


def photo_train_transform(
    image_size: int,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Augment = "randaugment",
    crop_scale: tuple[float, float] = (0.35, 1.0),
    erase_prob: float = 0.0,
) -> v2.Compose:
    """Augmentation for photos larger than `image_size`: random resized crop, flip and a policy."""
    if image_size % patch_size:
        raise ConfigError(f"patch_size={patch_size} does not divide image_size={image_size}")
    low, high = crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(low, high), antialias=True),
            v2.RandomHorizontalFlip(),
            *policy(augment),
        ]
        + _to_patches(patch_size, mean, std, erase_prob)
    )


def policy(augment: Augment) -> list:
    """The colour/geometry policy after crop and flip: RandAugment, AutoAugment, SimCLR colour, none."""
    policies = {
        "randaugment": [v2.RandAugment(num_ops=2, magnitude=9)],
        "autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)],
        # SimCLR's colour distortion (Chen et al. 2020): the strong augmentation contrastive and
        # instance-discrimination objectives need, so two views differ in more than framing.
        "simclr": [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ],
        "none": [],
    }
    if augment not in policies:
        raise ConfigError(f"augment must be one of {sorted(policies)}, got {augment!r}")
    return policies[augment]
