"""The network's shape for a time budget: the image size, width and depth, from a small measured family.

With --trainer.max_time and a recipe that leaves its shape to the run (`shape: auto`), `choose` takes
each candidate's training step time on this machine (`step_seconds`: a few steps on random images, at
start-up, in the run's precision), the number of training images, their native size and the budget,
and picks what the equal-compute table in bench/RESULTS.md found best: the last shape of FAMILY that
still trains for `MIN_EPOCHS` epochs and `MIN_STEPS` steps in the budget, else the first. A run resumed
from a checkpoint keeps that checkpoint's shape, and a typed --model.dim, --model.depth,
--model.num_heads, --model.mlp_ratio, --data.image_size or --data.patch_size, or `--shape NAME`, is the
user's word.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from src.hardware import fused_adamw, fused_attention
from src.images import patchify
from src.models.vit import ViT


@dataclass(frozen=True)
class Shape:
    """One member of the family: the training image size and the transformer's width and depth."""

    name: str
    image_size: int  # px, cut into 8x8 px tokens by the conv stem
    dim: int
    depth: int
    num_heads: int  # 32 channels per head

    def settings(self) -> dict[str, dict[str, int]]:
        """The config values this shape sets, by section."""
        return {"data": {"image_size": self.image_size},
                "model": {"dim": self.dim, "depth": self.depth, "num_heads": self.num_heads}}

    def __str__(self) -> str:
        return f"{self.name} ({self.image_size} px, dim {self.dim}, depth {self.depth})"


# In order of preference, each chosen over those before it once it gets enough training: more pixels
# before more width (on the Flowers-17 photos at 20 minutes s48 beat s32 on validation and m32 lost to
# both; bench/RESULTS.md). Model-only step cost on a 2-core AVX2 EPYC in float32, relative to s32: m32
# 2.3x, s48 2.0x, s64 3.9x. s32 is the CPU recipe's network.
FAMILY = (
    Shape("s32", 32, 128, 4, 4),
    Shape("m32", 32, 192, 6, 6),
    Shape("s48", 48, 128, 4, 4),
    Shape("s64", 64, 128, 4, 4),
)
BY_NAME = {shape.name: shape for shape in FAMILY}
# The shape flags: typing any of them fixes the shape.
SHAPE_FLAGS = ("--model.dim", "--model.depth", "--model.num_heads", "--model.mlp_ratio",
               "--data.image_size", "--data.patch_size")
# A bigger shape is chosen only when it still trains this many epochs, and this many steps, in the budget:
# on the Flowers-17 photos s48 lost to s32 with 109 epochs of 9 steps and won with 219 (1 971 steps); on
# 680 of them (flowers17.yaml), 6 steps an epoch, s64 with 207 epochs (1 242 steps) lost to s48 with 400.
MIN_EPOCHS = 200
MIN_STEPS = 1800
# How the model-only step time becomes an epoch's time, as measured end to end through train.py on a
# 2-core AVX2 EPYC (bench/RESULTS.md, "The shape family at equal compute"): the training steps take
# PIPELINE times their model-only time (augmentation, loading), and each epoch adds about EPOCH_COST_S
# (validation, checkpoint writes, logs). Fitted at d967ea1 on `s32` runs whose start-up measured a
# 0.19-0.22 s step: 150 epochs of 9 steps in 5 minutes (Flowers-17 photos as a folder), 182 of 6
# (flowers17.yaml), 26 of 33 in 3 minutes (the CIFAR-10 subset). Before the faster step and the cached
# evaluation images (1.4 and 1.0 s) it expected half the epochs these runs trained. Of the budget,
# TRAINED is training; the rest is the final validation and test.
PIPELINE = 1.1
EPOCH_COST_S = 0.2
TRAINED = 0.9


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Training batches in an epoch of `train_images` images (the last one smaller)."""
    return math.ceil(max(1, train_images) / batch_size)


def expected_epochs(budget_s: float, train_images: int, step_s: float, batch_size: int) -> float:
    """The epochs `budget_s` seconds give `train_images` images at `step_s` seconds a batch."""
    epoch_s = steps_per_epoch(train_images, batch_size) * step_s * PIPELINE + EPOCH_COST_S
    return TRAINED * budget_s / epoch_s


def enough(epochs: float, steps_per_epoch: int) -> bool:
    """Whether `epochs` of `steps_per_epoch` steps are enough training for a bigger shape to win."""
    return epochs >= MIN_EPOCHS and epochs * steps_per_epoch >= MIN_STEPS


@dataclass(frozen=True)
class Choice:
    shape: Shape
    epochs: dict[str, float]  # expected epochs of each candidate in the budget
    steps_per_epoch: int

    def __str__(self) -> str:
        expected = ", ".join(f"{name} {epochs:.0f}" for name, epochs in self.epochs.items())
        need = f"{MIN_EPOCHS} epochs and {MIN_STEPS} steps"
        why = (f"the family's last that trains {need} in the budget"
               if enough(self.epochs[self.shape.name], self.steps_per_epoch)
               else f"the smallest: none trains {need} in the budget")
        return (f"Shape: {self.shape}, {why} (expected epochs from this machine's step time: {expected}); "
                "override with --shape NAME or --model.dim/--model.depth/--data.image_size")


def candidates(native_size: int) -> list[Shape]:
    """The shapes whose images are not larger than the data's (32 px, the smallest, always counts)."""
    return [shape for shape in FAMILY if shape.image_size <= max(32, native_size)]


def choose(budget_s: float, train_images: int, native_size: int, step_s: Callable[[Shape], float],
           batch_size: int) -> Choice:
    """The shape for `budget_s` seconds of training on `train_images` images of `native_size` px, from
    the step time of a batch of `batch_size` images that `step_s` measures for each candidate."""
    shapes = candidates(native_size)
    epochs = {shape.name: expected_epochs(budget_s, train_images, step_s(shape), batch_size) for shape in shapes}
    steps = steps_per_epoch(train_images, batch_size)
    fits = [shape for shape in shapes if enough(epochs[shape.name], steps)]
    return Choice(fits[-1] if fits else shapes[0], epochs, steps)  # the family's order is its preference


def step_times(native_size: int, settings: dict, batch_size: int, precision: str,
               device: torch.device) -> dict[str, float]:
    """Each candidate's training step time, measured now: a ViT with the run's other `settings`, at its batch
    size and precision on its device. The run's random state is left as it was."""
    fused = fused_attention(device, precision)
    times = {}
    for shape in candidates(native_size):
        network = {**settings, "num_classes": 10, **shape.settings()["data"], **shape.settings()["model"]}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            times[shape.name] = step_seconds(network, batch_size, precision, device, fused)
    return times


def step_seconds(settings: dict, batch_size: int, precision: str, device: torch.device,
                 fused_attention: bool, steps: int = 2) -> float:
    """Seconds of one training step (forward, cross entropy, backward, AdamW) of a ViT with `settings`
    on `batch_size` random images, the fastest of `steps` after one warm-up step."""
    model = ViT(**settings).to(device)
    model.use_fused_attention(fused_attention)
    return min(timed_steps(model, settings, batch_size, precision, device, steps + 1)[1:])


def timed_steps(model: ViT, settings: dict, batch_size: int, precision: str, device: torch.device,
                steps: int) -> list[float]:
    """The seconds of each of `steps` training steps of `model` (built with `settings`) on random images."""
    step = training_step(model, settings, batch_size, precision, device)
    return [step() for _ in range(steps)]


def training_step(model: ViT, settings: dict, batch_size: int, precision: str,
                  device: torch.device) -> Callable[[], float]:
    """One training step of `model` on the same random images each time, with one AdamW throughout, as a
    function that returns its seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(device, precision))
    size, patch = settings["image_size"], settings["patch_size"]
    patches = patchify(torch.randn(batch_size, settings.get("in_channels", 3), size, size), patch).to(device)
    labels = torch.randint(settings["num_classes"], (batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if "bf16" in precision else torch.float16,
                              enabled="mixed" in precision)

    def step() -> float:
        start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(patches), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return step


def budget_seconds(max_time: object) -> float | None:
    """--trainer.max_time in seconds ("DD:HH:MM:SS", a dict of timedelta fields or a timedelta)."""
    import datetime

    if not max_time:
        return None
    if isinstance(max_time, datetime.timedelta):
        return max_time.total_seconds()
    if isinstance(max_time, dict):
        return datetime.timedelta(**max_time).total_seconds()
    parts: Sequence[str] = str(max_time).split(":")
    try:
        days, hours, minutes, seconds = (float(p) for p in parts)
    except ValueError:
        return None  # Lightning's Timer says what is wrong with it
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
