"""Checkpoints written crash-safely and read safely.

Writing: Lightning's own save goes through an fsspec transaction, which for a local file writes a
temporary file under /tmp and then `shutil.move`s it into place: a copy (not an atomic rename) when
/tmp is another filesystem, no fsync, and an orphaned temporary file after kill -9. `SafeCheckpointIO`
writes next to the target, fsyncs, renames, fsyncs the folder, and refuses to replace a good
checkpoint with non-finite weights.

Reading: checkpoints are pickles, and unpickling an untrusted one the naive way can run any code.
Every checkpoint here is read with `torch.load(weights_only=True)`, which unpickles tensors and
plain containers only, or from safetensors, which holds no code at all.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from src.errors import CheckpointWriteError, DivergedError, UserError
from src.models.vit import saved_settings, upgrade_state_dict

# A checkpoint being written is `.<name>.<pid>.partial` beside its target until it is complete.
PARTIAL_SUFFIX = ".partial"


def first_non_finite(state_dict: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(checkpoint: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files left by a save that was killed; return what was removed."""
    removed = sorted(folder.glob(f".*{PARTIAL_SUFFIX}")) if folder.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe (see the module docstring); reads are unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own path
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        bad = first_non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise DivergedError(
                f"weight {bad} is NaN or inf at global step {checkpoint.get('global_step')}: training diverged, "
                f"so {path.name} was not overwritten and the checkpoints from before are kept. Lower "
                "--model.lr or lengthen --model.warmup_epochs and start again with --fresh"
            )
        try:
            atomic_save(checkpoint, path)
        except (OSError, RuntimeError) as error:
            if isinstance(error, OSError):
                why = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else (
                    error.strerror or type(error).__name__)
            elif "unexpected pos" in str(error):
                # torch's zip writer reports a short write, which a full disk or a file-size limit
                # makes, as a RuntimeError about the file position, not as an OSError.
                why = "the disk is full or the file size limit reached"
            else:
                raise
            raise CheckpointWriteError(
                f"could not write checkpoint {path} ({why}: {error}); the previous checkpoints in "
                f"{path.parent} are intact. Free some space or choose a writable --checkpoint.dirpath, "
                "then run the same command to resume"
            ) from error


def load_for_resume(last: Path) -> tuple[Path, dict]:
    """Read `last` weights-only; if it is unreadable, the newest readable checkpoint beside it, with a warning."""
    try:
        return last, torch.load(last, map_location="cpu", weights_only=True)
    except Exception as error:
        why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    others = sorted((p for p in last.parent.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    for path in others:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            continue
        warnings.warn(f"{last} is unreadable ({why}); resuming from the newest readable checkpoint, {path}",
                      stacklevel=2)
        return path, checkpoint
    raise UserError(
        f"cannot read {last} ({why}) and no other checkpoint in {last.parent} is readable; "
        "pass --fresh to start a new run (the old checkpoints are kept)"
    )


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
        return saved_settings(json.loads(metadata["vit_lightning"])), upgrade_state_dict(state), data
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
    state = upgrade_state_dict(state)  # names from before timm's
    return saved_settings(checkpoint.get("hyper_parameters", {})), state, checkpoint.get("datamodule_hyper_parameters")
