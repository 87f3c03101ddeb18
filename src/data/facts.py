"""What an image folder's training images are like, measured before training, and the choices that
follow from it: whether mirror images keep their class (training flips, flip test-time augmentation)
and the normalisation statistics.

A seeded, class-balanced sample of the training folder is decoded once (`SAMPLE` images at most: a few
seconds). Nothing here reads a dataset's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE = 2000  # images decoded to measure the folder
PROBE = 16  # px: the mirror test's pixel classifier sees the images this small
Z_ASYMMETRIC = 3.0  # standard errors by which mirror images must score worse before flips go off
KEPT_ASYMMETRIC = 0.75  # ... and the share of the above-chance accuracy they may keep at most


@dataclass(frozen=True)
class MirrorTest:
    """A pixel classifier trained on unmirrored images, scored on other images and on their mirrors."""

    accuracy: float  # on the held-out images
    mirrored: float  # on the same images, mirrored
    chance: float
    z: float  # how many standard errors the mirrors score worse (McNemar's paired test)

    @property
    def mirror_safe(self) -> bool:
        """Whether mirror images keep their class: their accuracy is not clearly and largely lower."""
        kept = (self.mirrored - self.chance) / max(1e-9, self.accuracy - self.chance)
        return not (self.z >= Z_ASYMMETRIC and kept <= KEPT_ASYMMETRIC)

    def __str__(self) -> str:
        return (f"a pixel classifier scores {100 * self.accuracy:.1f} % on held-out training images and "
                f"{100 * self.mirrored:.1f} % on their mirror images, chance {100 * self.chance:.1f} %")


@dataclass(frozen=True)
class FolderFacts:
    """Measured on a sample of the training images."""

    images: int  # in the training folder
    per_class: tuple[int, int]  # fewest and most images of a class
    size: tuple[int, int]  # median native width, height
    grayscale: bool  # every sampled image has one channel
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mirror: MirrorTest

    def __str__(self) -> str:
        fewest, most = self.per_class
        counts = f"{fewest}" if fewest == most else f"{fewest}-{most}"
        return (f"{self.images} training images, {counts} per class, {self.size[0]}x{self.size[1]} px "
                f"(median), {'grayscale' if self.grayscale else 'colour'}")


def balanced_sample(targets: Sequence[int], count: int, seed: int) -> list[int]:
    """Up to `count` indices spread evenly over the classes (all of a class when it has fewer), seeded."""
    targets = torch.as_tensor(targets)
    classes = targets.unique()
    generator = torch.Generator().manual_seed(seed)
    share = max(1, count // len(classes))
    picked = []
    for c in classes:
        members = torch.nonzero(targets == c).flatten()
        picked += members[torch.randperm(len(members), generator=generator)[:share]].tolist()
    return sorted(picked)


def mirror_test(images: Tensor, targets: Tensor, num_classes: int, seed: int = 0) -> MirrorTest:
    """Train a ridge classifier on `images` (N, C, H, W) in [0, 1], unmirrored, in two folds; score each
    fold on its held-out images and on their mirrors. Classes that a mirror changes (digits, text,
    left and right) lose accuracy on the mirrors; photos of things seen from either side do not."""
    x = F.adaptive_avg_pool2d(images.float(), PROBE)  # (N, C, 16, 16)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=generator)
    folds = (order[: len(order) // 2], order[len(order) // 2:])
    right = right_mirrored = lost = gained = 0
    for train, held_out in (folds, folds[::-1]):
        features = x[train].flatten(1)  # (n, C*16*16)
        mean, std = features.mean(0), features.std(0) + 1e-3
        z = (features - mean) / std
        onehot = F.one_hot(targets[train], num_classes).float()
        # Ridge regression onto one-hot targets, in closed form: a linear pixel classifier in milliseconds.
        weights = torch.linalg.solve(z.T @ z + len(train) * torch.eye(z.shape[1]), z.T @ onehot)

        def correct(batch: Tensor) -> Tensor:
            return (((batch.flatten(1) - mean) / std @ weights).argmax(1) == targets[held_out])

        plain, mirrored = correct(x[held_out]), correct(x[held_out].flip(-1))
        right += int(plain.sum())
        right_mirrored += int(mirrored.sum())
        lost += int((plain & ~mirrored).sum())
        gained += int((mirrored & ~plain).sum())
    n = len(targets)
    z_score = (lost - gained) / math.sqrt(lost + gained) if lost + gained else 0.0
    return MirrorTest(right / n, right_mirrored / n, 1 / num_classes, z_score)


Loaded = tuple[Tensor, tuple[int, int], bool]  # uint8 (3, S, S) at the training size, native (w, h), grayscale


def measure_folder(targets: Sequence[int], num_classes: int, load: Callable[[int], Loaded],
                   seed: int = 0) -> FolderFacts:
    """The facts of a training folder whose image i is `load(i)` -> (uint8 (3, S, S) at the training
    size, its native (width, height), whether it is grayscale), measured on a balanced sample."""
    counts = torch.bincount(torch.as_tensor(targets), minlength=num_classes)
    picked = balanced_sample(targets, SAMPLE, seed)
    loaded = [load(i) for i in picked]
    images = torch.stack([image for image, _, _ in loaded]).float() / 255  # (n, 3, S, S)
    sizes = torch.tensor([size for _, size, _ in loaded])  # (n, 2)
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    labels = torch.as_tensor([targets[i] for i in picked])
    return FolderFacts(
        images=len(targets),
        per_class=(int(counts.min()), int(counts.max())),
        size=tuple(int(v) for v in sizes.median(dim=0).values),
        grayscale=all(gray for _, _, gray in loaded),
        mean=tuple(round(float(v), 4) for v in mean),
        std=tuple(round(float(v), 4) for v in std),
        mirror=mirror_test(images, labels, num_classes, seed),
    )
