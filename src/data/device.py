"""Training images kept as one uint8 tensor and augmented a whole batch at a time where they lie.

`augment_on: device` in a DataModule puts the training split here: the loader yields only indices,
the images move once to the training device (a GPU, or the CPU's own process) and every batch is
cropped, flipped, put through the augmentation policy and normalised there. It
replaces per-image PIL work in loader processes, which on 2 CPU cores competes with training for
the same cores and on a GPU cannot keep up (bench/RESULTS.md, "end to end").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.ops import roi_align
from torchvision.transforms import v2

from src.data.transforms import Augment, erasing, policy
from src.errors import ConfigError


class DeviceImages(Dataset):
    """uint8 images (N, H, W, C) and their targets; the loader draws `(index, target)` pairs."""

    def __init__(self, images: Tensor, targets: Sequence[int]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self._on_device = images

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[int, Tensor]:
        return i, self.targets[i]

    def take(self, indices: Tensor) -> Tensor:
        """The images at `indices` as (B, C, H, W) uint8, on the indices' device (copied there once)."""
        if self._on_device.device != indices.device:
            self._on_device = self.images.to(indices.device)
        return self._on_device[indices].permute(0, 3, 1, 2)  # (B, C, H, W)


def reflect(index: Tensor, size: int) -> Tensor:
    """Map positions in [-size+1, 2*size-2] into [0, size) as reflect padding does (edge not repeated)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


class BatchAugment(nn.Module):
    """Per-image random crop (reflect padding) and flip (unless `flip` is False), a torchvision v2
    policy, normalise, random erasing: `train_transform` for a whole batch. With `crop_scale` the crop
    is instead a random resized crop to `size` (`photo_train_transform`'s), for photos stored larger
    than they train.

    Input (B, C, H, W) uint8 on any device; output (B, C, H, W) float32 on the same device. Crop and
    flip are drawn per image and done in one gather. The policy (RandAugment, AutoAugment, ...) is
    torchvision's own; torchvision draws one set of operations per call, so it is called on groups
    of `group_size` images drawn at random from the batch: every image still gets the policy's
    distribution of operations, and the images of a group share them (a group of 1 is exactly the
    per-image policy, at more calls). Erasing, torchvision's too, is drawn per image.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment = "randaugment",
        padding: int = 4,
        group_size: int = 8,
        erase_prob: float = 0.0,
        crop_scale: tuple[float, float] | None = None,
        size: int | None = None,
        flip: bool = True,
    ) -> None:
        super().__init__()
        if padding < 0 or group_size < 1:
            raise ConfigError(f"need padding >= 0 and group_size >= 1, got {padding} and {group_size}")
        if (crop_scale is None) != (size is None):
            raise ConfigError("a random resized crop needs both crop_scale and size")
        self.crop_scale, self.size = crop_scale, size
        self.flip = flip  # False: no mirror images (for classes a mirror changes)
        self.padding = padding
        self.group_size = group_size
        ops = policy(augment)
        self.policy = v2.Compose(ops) if ops else None
        self.mean, self.std = list(mean), list(std)
        self.erase_prob = erase_prob
        # Applied only to the images the coin chose, so the per-image loop costs p x B calls, not B.
        self.erase = erasing(1.0)[0] if erase_prob > 0 else None

    def crop_and_flip(self, images: Tensor) -> Tensor:
        """Each image shifted by up to `padding` px (reflected edges) and mirrored with p = 0.5."""
        B, C, H, W = images.shape
        if self.padding >= min(H, W):
            raise ConfigError(f"crop padding {self.padding} must be smaller than the image ({H}x{W})")
        device, span = images.device, 2 * self.padding + 1
        rows = torch.randint(span, (B, 1), device=device) + torch.arange(H, device=device) - self.padding
        cols = torch.randint(span, (B, 1), device=device) + torch.arange(W, device=device) - self.padding
        rows, cols = reflect(rows, H), reflect(cols, W)  # (B, H), (B, W)
        if self.flip:
            flip = torch.rand(B, 1, device=device) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        batch = torch.arange(B, device=device).view(B, 1, 1)
        out = images[batch, :, rows.view(B, H, 1), cols.view(B, 1, W)]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)  # (B, C, H, W)

    def resized_crop_and_flip(self, images: Tensor) -> Tensor:
        """Each image's random resized crop (torchvision's box distribution: `crop_scale` of the area,
        aspect ratio 3/4 to 4/3) scaled to `size` px and mirrored with p = 0.5: (B, C, size, size) uint8.

        All boxes are cut and resized in one `roi_align` call, whose adaptive sampling averages every
        source pixel under an output pixel, as an antialiased resize does."""
        B = len(images)
        boxes = torch.empty(B, 5)
        for b in range(B):  # torchvision's own sampling of the box, per image
            top, left, h, w = v2.RandomResizedCrop.get_params(images[b], list(self.crop_scale), [3 / 4, 4 / 3])
            boxes[b] = torch.tensor([b, left, top, left + w, top + h])
        out = roi_align(images.float(), boxes.to(images.device), (self.size, self.size), aligned=True)  # (B, C, S, S)
        if self.flip:
            flip = torch.rand(B, 1, 1, 1, device=images.device) < 0.5
            out = torch.where(flip, out.flip(-1), out)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"BatchAugment takes uint8 images, got {images.dtype}")
        x = (self.resized_crop_and_flip(images) if self.crop_scale else self.crop_and_flip(images)).contiguous()
        if self.policy is not None:
            # Groups drawn at random, so the copies of an image that a batch may hold (views) or
            # neighbours in the sampler's order do not share their operations.
            order = torch.randperm(len(x), device=x.device)
            mixed = torch.cat([self.policy(group) for group in x[order].split(self.group_size)])
            x = torch.empty_like(mixed).index_copy_(0, order, mixed)
        # The same torchvision ops as the per-image path's tail (transforms._normalised), on a batch.
        x = v2.functional.to_dtype(x, torch.float32, scale=True)
        x = v2.functional.normalize(x, self.mean, self.std)  # (B, C, H, W)
        if self.erase is not None:
            for i in torch.nonzero(torch.rand(len(x)) < self.erase_prob).flatten().tolist():
                x[i] = self.erase(x[i])
        return x  # (B, C, H, W)
