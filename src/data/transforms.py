"""Patchify transform, train/eval augmentation presets and normalisation statistics.

Training presets end in normalised images (C, H, W): batches are mixed (MixUp/CutMix) before their
patches are cut, in `ImageDataModule.training_batch`. The evaluation preset ends in patches (N, P*P*C).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

from src.errors import ConfigError
from src.images import patchify, unpatchify

Augment = Literal["randaugment", "autoaugment", "simclr", "none"]


class PatchifyTransform:
    """Cut an image (C, H, W) into a sequence of flattened patches (N, P*P*C), row by row."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, image: Tensor) -> Tensor:
        return patchify(image, self.patch_size)

    def inverse(self, patches: Tensor, image_size: int | tuple[int, int]) -> Tensor:
        """Reassemble (N, P*P*C) patches into the (C, H, W) image they were cut from."""
        return unpatchify(patches, self.patch_size, image_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(patch_size={self.patch_size})"


def _normalised(mean: Sequence[float], std: Sequence[float], erase_prob: float = 0.0) -> list:
    """Common tail of every preset: float tensor in [0, 1], normalise, (random erasing)."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        *erasing(erase_prob),
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
    return v2.Compose(
        [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), *_normalised(mean, std),
         PatchifyTransform(patch_size)]
    )


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Augment = "randaugment",
    erase_prob: float = 0.0,
    flip: bool = True,
) -> v2.Compose:
    """Augmentation for small images: reflect-padded random crop, flip (unless `flip` is False: for
    classes a mirror changes) and an optional policy.

    The crop moves the image by up to 1/8 of its size (4 px at 32 px), the CIFAR standard; there is
    deliberately no aggressive random-resized crop, which destroys small images.
    """
    return v2.Compose(
        [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
            *([v2.RandomHorizontalFlip()] if flip else []),
            *policy(augment),
            *_normalised(mean, std, erase_prob),
        ]
    )


# How training crops an image: a reflect-padded random crop of the image at the training size ("pad",
# CIFAR's), or a random resized crop of the larger original ("resize"). Not chosen from the images'
# size: on Flowers-17 photos (500 px) trained at 32 px for 5 minutes, "pad" reached 83.1 % validation
# accuracy, "resize" 72.8 % (crop_scale 0.35-1) and 79.4 % (0.8-1) (bench/RESULTS.md).
Crop = Literal["pad", "resize"]


def crop_scale_for(crop: str, crop_scale: Sequence[float]) -> tuple[float, float] | None:
    """A DataModule's `crop_scale` attribute for its `crop` setting: the checked share of the image's area
    for random resized crops ("resize"), None for reflect-padded ones ("pad"); a ConfigError otherwise."""
    if crop not in ("pad", "resize"):
        raise ConfigError(f"crop must be pad or resize, got {crop!r}")
    return checked_crop_scale(crop_scale) if crop == "resize" else None


def checked_crop_scale(crop_scale: Sequence[float]) -> tuple[float, float]:
    """A random resized crop's (low, high) share of the image's area, or a ConfigError."""
    low, high = crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
    return float(low), float(high)


def photo_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Augment = "randaugment",
    crop_scale: tuple[float, float] = (0.35, 1.0),
    erase_prob: float = 0.0,
    flip: bool = True,
) -> v2.Compose:
    """Augmentation for photos larger than `image_size`: random resized crop, flip (unless `flip` is
    False) and a policy."""
    low, high = checked_crop_scale(crop_scale)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(low, high), antialias=True),
            *([v2.RandomHorizontalFlip()] if flip else []),
            *policy(augment),
            *_normalised(mean, std, erase_prob),
        ]
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


def batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """torchvision's MixUp and/or CutMix (one of the two per batch, with equal odds), or None for neither."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError(f"mixup_alpha and cutmix_alpha must be 0 (off) or more; got {mixup_alpha}, {cutmix_alpha}")
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
