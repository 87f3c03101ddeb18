"""Pictures of what a model sees and says: attention rollout, overlays, prediction grids, confusion."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor

from src.images import unpatchify


def attention_rollout(maps: Sequence[Tensor], global_pool: str = "token") -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each patch flows into what the head reads.

    `maps` are the blocks' attention weights (B, H, N+1, N+1); `global_pool` is the model's (its
    `ViT.global_pool`): "token" follows the class token's row, "avg" the mean of the patch tokens'
    rows, since that mean is what an avg-pooled head classifies. Returns (B, h, w) scaled to max 1.
    """
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    B, _, N, _ = maps[0].shape
    eye = torch.eye(N, device=maps[0].device)
    rollout = eye.expand(B, N, N)
    for weights in maps:
        a = weights.float().mean(dim=1)  # (B, N+1, N+1), heads averaged
        a = 0.5 * a + 0.5 * eye  # the residual connection carries half of each token through
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    if global_pool == "token":
        relevance = rollout[:, 0, 1:]  # (B, N): class token's row, patch columns
    else:
        relevance = rollout[:, 1:, 1:].mean(dim=1)  # (B, N): the patch rows' mean, patch columns
    side = math.isqrt(N - 1)
    relevance = relevance.reshape(B, side, side)  # (B, h, w)
    return relevance / relevance.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def to_pixels(patches: Tensor, image_size: int, patch_size: int, mean: Sequence[float],
              std: Sequence[float]) -> Tensor:
    """Undo patchify and normalisation: (B, N, P*P*C) -> (B, H, W, C) in [0, 1], for display."""
    images = unpatchify(patches.float().cpu(), patch_size, image_size)  # (B, C, H, W)
    images = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return images.clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, C)


def _grid(count: int, panel: float = 2.2) -> tuple[Figure, list]:
    cols = min(count, 4 if count <= 8 else 6)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(panel * cols, panel * rows + 0.3), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).flatten().tolist()
    for ax in axes:
        ax.axis("off")
    return figure, axes


def prediction_figure(images: Tensor, titles: Sequence[str], correct: Sequence[bool] | None = None,
                      heatmaps: Tensor | None = None) -> Figure:
    """A grid of images (B, H, W, C) with titles, green when right and red when wrong; with
    `heatmaps` (B, h, w), each is upsampled over its image as an attention overlay."""
    figure, axes = _grid(len(images))
    for i, (ax, image, title) in enumerate(zip(axes, images, titles)):
        H, W = image.shape[:2]
        ax.imshow(image.numpy(), extent=(0, W, H, 0))
        if heatmaps is not None:
            ax.imshow(heatmaps[i].cpu().numpy(), cmap="inferno", alpha=0.55, extent=(0, W, H, 0),
                      interpolation="bilinear")
        colour = "black" if correct is None else ("tab:green" if correct[i] else "tab:red")
        ax.set_title(title, fontsize=8, color=colour)
    return figure


def confusion_figure(matrix: Tensor, class_names: Sequence[str]) -> Figure:
    """Confusion matrix (true rows, predicted columns), each row normalised to sum to 1."""
    counts = matrix.float().cpu()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    size = min(12.0, 2.5 + 0.45 * n)
    figure = Figure(figsize=(size, size), layout="constrained")
    ax = figure.subplots()
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for t in range(n):
            for p in range(n):
                ax.text(p, t, f"{rates[t, p]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if rates[t, p] > 0.5 else "black")
    ax.set_title(f"validation confusion ({int(counts.sum())} images)")
    return figure
