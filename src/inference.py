"""A trained classifier outside Lightning: safe loading, export, preprocessing and prediction.

Checkpoints are pickles, and unpickling an untrusted one the naive way can run any code. Every
checkpoint here is read with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only, or from safetensors, which holds no code at all; a DataModule is rebuilt only from
the project's own classes, never from an import path found in a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors.torch import save
from torch import Tensor

from src.checkpoints import not_ours, read_checkpoint
from src.data import CIFAR10DataModule, Flowers17DataModule, ImageDataModule, ImageFolderDataModule
from src.data.base import resolved_choices
from src.data.transforms import eval_transform
from src.errors import ConfigError, UserError
from src.models.classifier import evaluation_logits, mirror_tta
from src.models.vit import ARCHITECTURE, ViT
from src.runs import fit_problems

# Each run keeps its checkpoints in a folder of its own here (cifar10/, flowers17/, an image folder's name, ...).
RUNS_DIR = Path("data/lightning")
REQUIRED = (*ARCHITECTURE, "mean", "std")
DATAMODULES = {cls.__name__: cls for cls in (CIFAR10DataModule, Flowers17DataModule, ImageFolderDataModule)}


@dataclass
class Classifier:
    """A ViT in eval mode with everything needed to feed it: sizes, normalisation, class names."""

    model: ViT
    hparams: dict
    data_hparams: dict | None
    path: Path

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.get("class_names")
        return list(names) if names else [str(i) for i in range(self.hparams["num_classes"])]

    def preprocess(self, image: Image.Image) -> Tensor:
        """The training run's eval preprocessing, rebuilt from the checkpoint: (N, P*P*C)."""
        hp = self.hparams
        return eval_transform(hp["image_size"], hp["patch_size"], hp["mean"], hp["std"])(image)

    @torch.no_grad()
    def probabilities(self, patches: Tensor) -> Tensor:
        """Class probabilities (B, num_classes) for a batch of patchified images (B, N, P*P*C), scored
        as the run's validation and test scored them (with its flip_tta, if set)."""
        hp = self.hparams
        logits = evaluation_logits(self.model, patches, mirror_tta(hp), hp["patch_size"])
        return logits.float().softmax(dim=-1)

    def datamodule(self) -> ImageDataModule:
        """The DataModule the model was trained on, with its validation split set up."""
        if not self.data_hparams:
            raise UserError(f"{self.path} does not record its dataset; classify an image file instead")
        name = str(self.data_hparams.get("_class_path", "")).rsplit(".", 1)[-1]
        if name not in DATAMODULES:
            raise UserError(f"{self.path} was trained on {name or 'an unknown dataset'}, which classify.py "
                            f"cannot rebuild ({', '.join(DATAMODULES)} only); classify an image file instead")
        kwargs = {k: v for k, v in self.data_hparams.items() if not k.startswith("_")}
        kwargs.update(resolved_choices(self.data_hparams))  # nothing to measure again
        kwargs["num_workers"] = 0
        if "augment_on" in kwargs:
            kwargs["augment_on"] = "loader"  # nothing to augment here; skips decoding the training split
        if "download" in kwargs:
            kwargs["download"] = False
        data = DATAMODULES[name](**kwargs)
        data.setup("validate")
        return data


def load_classifier(path: Path, device: torch.device | str = "cpu") -> Classifier:
    """Rebuild the trained ViT from a checkpoint alone, refusing anything unsafe or foreign."""
    hparams, state, data_hparams = read_checkpoint(Path(path))
    missing = [k for k in REQUIRED if k not in hparams]
    if missing:
        raise not_ours(path, f"missing settings: {', '.join(missing)}")
    if hparams.get("evaluation") == "knn":
        raise UserError(f"{path} is a pre-training checkpoint: its head tells its {hparams['num_classes']} training "
                        "images apart, not classes; classify with a fine-tuned one (configs/flowers17-finetune.yaml)")
    try:
        model = ViT(**{k: hparams[k] for k in ARCHITECTURE})
    except ConfigError as error:
        raise not_ours(path, f"its settings do not make a network: {error}") from error
    problems = fit_problems(hparams, hparams, (), state, model.state_dict())
    if problems:
        raise not_ours(path, f"its weights do not fit its own settings: {'; '.join(problems[:3])}")
    model.load_state_dict(state)
    return Classifier(model.to(device).eval(), hparams, data_hparams, Path(path))


def export_safetensors(classifier: Classifier, out: Path) -> None:
    """Weights plus the settings needed to rebuild them, as safetensors metadata (no pickle)."""
    settings = {k: v for k, v in classifier.hparams.items() if not k.startswith("_")}
    metadata = {"vit_lightning": json.dumps(settings, default=list)}
    if classifier.data_hparams:
        metadata["datamodule"] = json.dumps(classifier.data_hparams, default=list)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written by Python, not by safetensors' own writer (which makes owner-only files): a file to share.
    out.write_bytes(save(state, metadata=metadata))


def newest_last_checkpoint(runs_dir: Path = RUNS_DIR) -> Path | None:
    """The most recently written `last.ckpt` among the recipes' folders (cifar10/, flowers17/, ...)."""
    candidates = [p for p in runs_dir.glob("*/last.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def default_checkpoint(runs_dir: Path = RUNS_DIR) -> tuple[Path, str]:
    """The newest run's best checkpoint by val/acc, else its last.ckpt; with a line saying which."""
    last = newest_last_checkpoint(runs_dir)
    if last is None:
        raise UserError(f"no checkpoint in {runs_dir}/*/ yet: train one with `python train.py` "
                        "(or pass --checkpoint PATH)")
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        callbacks: dict = state.get("callbacks", {})
    except Exception:
        return last, "last.ckpt of the newest run"  # load_classifier reports what is wrong with it
    for key, value in callbacks.items():
        best = Path(str(value.get("best_model_path") or "")) if key.startswith("ModelCheckpoint") else None
        if best and value.get("monitor") and best.is_file():
            if best.is_absolute() and best.is_relative_to(Path.cwd()):
                best = best.relative_to(Path.cwd())  # as the user would type it
            score = value.get("best_model_score")
            return best, f"best {value['monitor']} {float(score):.4f} of the newest run"
    return last, "last.ckpt of the newest run"


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, else Apple MPS, else CPU."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise UserError(f"--device {name}: {error}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: PyTorch sees no CUDA device here; use --device auto")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: Apple MPS is not available here; use --device auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def top_k(probabilities: Tensor, class_names: Sequence[str], k: int) -> list[dict]:
    """[{index, name, probability}] of the k most probable classes, most probable first."""
    values, indices = probabilities.topk(min(k, len(class_names)))
    return [{"index": int(i), "name": class_names[int(i)], "probability": round(float(p), 6)}
            for p, i in zip(values, indices)]
