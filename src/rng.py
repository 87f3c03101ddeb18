"""The random state that decides what training does, as plain data a weights-only checkpoint can hold.

One process's generators: torch's on the CPU (augmentation, MixUp/CutMix, erasing, stochastic depth
and dropout on the CPU), on each CUDA device (the same on a GPU), Python's `random` and NumPy's. The
training process saves them with every checkpoint (src.callbacks.ExactResume). Loader workers need
none: each sample they augment is seeded on its own (src.data.base.TransformedSubset).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """This process's random state: tensors, tuples and numbers only (a weights-only load reads them)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set this process's generators to a `capture()`d state."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
