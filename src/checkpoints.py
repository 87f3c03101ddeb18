"""Reading checkpoints safely: weights-only `.ckpt` files or safetensors exports, nothing else.

Checkpoints are pickles, and unpickling an untrusted one the naive way can run any code. Every
checkpoint here is read with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only, or from safetensors, which holds no code at all.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from src.errors import UserError


def not_ours(path: Path, why: str) -> UserError:
    """The error for a file that train.py did not write."""
    return UserError(f"{path} is not a vit-lightning checkpoint ({why}); pass one written by train.py "
                     f"or classify.py --export")


def read_checkpoint(path: Path) -> tuple[dict, dict[str, Tensor], dict | None]:
    """(model hparams, ViT state dict, DataModule hparams) from a .ckpt or an exported .safetensors."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise not_ours(path, f"unreadable safetensors: {error}") from error
        if "vit_lightning" not in metadata:
            raise not_ours(path, "no vit_lightning metadata")
        data = json.loads(metadata["datamodule"]) if "datamodule" in metadata else None
        return json.loads(metadata["vit_lightning"]), state, data
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Nothing was executed either way; the wording only tells code (a pickled global) from junk.
        if "global" not in str(error).lower():
            raise not_ours(path, f"corrupt or not a PyTorch file: {str(error).splitlines()[0]}") from error
        raise UserError(
            f"{path} was refused by safe (weights-only) loading: it holds Python objects that could run "
            "code when loaded, so it was not opened. Checkpoints written by train.py never do; only use "
            "checkpoints from sources you trust"
        ) from error
    except Exception as error:  # truncated zip, random bytes, a directory, ...
        raise not_ours(path, f"corrupt or not a PyTorch file: {type(error).__name__}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise not_ours(path, "no state_dict")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return dict(checkpoint.get("hyper_parameters", {})), state, checkpoint.get("datamodule_hyper_parameters")
