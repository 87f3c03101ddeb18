"""k-nearest-neighbour classification of features: how self-supervised pre-training is watched.

As in the self-supervised literature (Wu et al. 2018, "Unsupervised feature learning via non-parametric
instance discrimination"; DINO's eval_knn): cosine similarity to a labelled reference set, the k most
similar references vote for their class with weight exp(similarity / temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(reference: Tensor, reference_labels: Tensor, queries: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> Tensor:
    """Class predicted (Q,) for each query (Q, D) by its k nearest references (R, D) labelled (R,)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k} and temperature={temperature}")
    reference = F.normalize(reference.float(), dim=-1)
    queries = F.normalize(queries.float(), dim=-1)
    similarity, nearest = (queries @ reference.T).topk(min(k, len(reference)), dim=-1)  # (Q, k) each
    votes = torch.zeros(len(queries), num_classes, device=queries.device)
    votes.scatter_add_(1, reference_labels[nearest], (similarity / temperature).exp())  # (Q, K)
    return votes.argmax(dim=-1)


def knn_accuracy(reference: Tensor, reference_labels: Tensor, queries: Tensor, query_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> Tensor:
    """Share of queries whose k-NN prediction is their label (a 0-dim tensor)."""
    predicted = knn_predict(reference, reference_labels, queries, num_classes, k, temperature)
    return (predicted == query_labels).float().mean()
