"""Loss terms beyond plain cross entropy: the contrastive (InfoNCE / NT-Xent) term over two views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def info_nce(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE (SimCLR's NT-Xent) between two views (B, D) of the same B images.

    Each of the 2B embeddings is an anchor; its positive is the other view of the same image and its
    negatives are the 2B - 2 views of the other images (never itself, never its own positive). All
    anchors at once: one cross entropy over the (2B, 2B) cosine-similarity matrix with the diagonal
    masked out.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"need two (B, D) views of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # (2B, D), unit length
    logits = z @ z.T / temperature  # (2B, 2B) cosine similarities
    logits = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)  # i <-> i + B
    return F.cross_entropy(logits, positives)


class ProjectionHead(nn.Module):
    """SimCLR's small MLP from backbone features to the space the contrastive loss compares in."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
