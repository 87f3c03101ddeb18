"""A training run's policy, in the order train.py applies it: start fresh or resume, check that a
checkpoint fits the model, decide what validation may choose, pick the checkpoint to test.

The CLI (src/cli.py) only parses; everything here is plain code that `train.main` calls in order.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from src.checkpoints import load_for_resume, remove_partial_files
from src.data.base import AUTOMATIC, outermost_missing, resolved_choices
from src.errors import ConfigError, UserError
from src.models.vit import ARCHITECTURE, saved_settings, upgrade_state_dict
from src.shapes import BY_NAME


@dataclass
class Resume:
    """The checkpoint a run continues from, read weights-only."""

    path: Path
    checkpoint: dict[str, Any]


def check_writable(folder: Path, option: str) -> None:
    """Raise a ConfigError unless `folder` exists and is writable or could be created; create nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is a file, not a folder" if existing.exists() and not existing.is_dir() else "is not writable"
        raise ConfigError(f"cannot write to {folder}: {existing} {problem}; fix that or pass {option} with "
                          "a writable folder")


def start_or_resume(config: Any) -> Resume | None:
    """Before anything is built: --fresh moves the old checkpoints aside; otherwise an existing
    last.ckpt is the run to continue, and its TensorBoard version is reused so the curves go on."""
    models_dir = Path(config.checkpoint.dirpath)
    # Found now rather than after an epoch's work, when the first checkpoint is written.
    check_writable(models_dir, "--checkpoint.dirpath")
    check_writable(Path(config.trainer.default_root_dir or "."), "--trainer.default_root_dir")
    save_dir = getattr(getattr(config.trainer.logger, "init_args", None), "save_dir", None)
    if save_dir:
        check_writable(Path(save_dir), "--trainer.logger.init_args.save_dir")
    last = models_dir / "last.ckpt"
    # Under DDP every rank runs this; only rank 0 touches the files.
    if config.fresh:
        if rank_zero_only.rank == 0 and models_dir.is_dir() and any(models_dir.iterdir()):
            kept = models_dir.with_name(f"{models_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            models_dir.rename(kept)
            rank_zero_info(f"Starting fresh: the previous checkpoints were moved to {kept}")
        return None
    if not last.is_file() or config.trainer.fast_dev_run:  # a smoke test does not resume
        return None
    if rank_zero_only.rank == 0:
        for partial in remove_partial_files(models_dir):
            rank_zero_info(f"Removed {partial}, left by a checkpoint write that was interrupted")
    path, checkpoint = load_for_resume(last)
    repeat_choices(config, checkpoint)
    version = checkpoint.get("logger_version")
    logger = config.trainer.logger
    if version is not None and str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
        logger.init_args.version = version
    return Resume(path, checkpoint)


def repeat_choices(config: Any, checkpoint: dict) -> None:
    """A resumed run takes the choices its checkpoint made (mirroring, normalisation, the network's shape)
    for the settings still left automatic, instead of measuring the data and the machine again."""
    settings, repeated = config.data.init_args, []
    for key, value in resolved_choices(checkpoint.get("datamodule_hyper_parameters") or {}).items():
        if key in settings and settings[key] == AUTOMATIC[key]:
            settings[key] = value
            repeated.append(f"--data.{key} {str(value).lower() if isinstance(value, bool) else value}")
    if config.shape == "auto":
        trained = checkpoint.get("hyper_parameters") or {}
        shape = next((s for s in BY_NAME.values() if all(
            trained.get(k) == v for values in s.settings().values() for k, v in values.items())), None)
        config.shape = shape.name if shape else "recipe"  # the config's values: resume_from says if they do not fit
        repeated.append(f"--shape {config.shape}")
    if repeated:
        rank_zero_info(f"The resumed run's choices are kept: {', '.join(repeated)}")


def fit_problems(saved: dict, wanted: dict, keys: Iterable[str], found: dict[str, Tensor],
                 expected: dict[str, Tensor]) -> list[str]:
    """Why a checkpoint (settings `saved`, weights `found`) does not fit a model (settings `wanted`,
    weights `expected`), compared on the settings `keys` and on every tensor's name and shape; [] when
    it fits. The one check behind resume, --model.init_from and classify.py."""
    differ = [f"{k}={saved.get(k)!r} (here: {wanted.get(k)!r})" for k in keys if saved.get(k) != wanted.get(k)]
    if differ:
        return differ
    shapes = {name: tuple(t.shape) for name, t in expected.items()}
    stored = {name: tuple(t.shape) for name, t in found.items()}
    problems = [f"{n}: checkpoint {stored[n]} vs model {shapes[n]}"
                for n in shapes if n in stored and stored[n] != shapes[n]]
    problems += [f"{n} missing from the checkpoint" for n in shapes if n not in stored]
    problems += [f"{n} not in this model" for n in stored if n not in shapes]
    return problems


def resume_from(model: LightningModule, resume: Resume) -> Path:
    """The checkpoint to resume, once checked against the configured model and data; one clear
    ConfigError when it does not fit. `announce` says it is resumed, once the data is read."""
    checkpoint = resume.checkpoint
    saved = saved_settings(checkpoint.get("hyper_parameters", {}))
    weights = upgrade_state_dict(checkpoint.get("state_dict", {}), prefix="model.")
    problems = fit_problems(saved, dict(model.hparams), (*ARCHITECTURE, "class_names"), weights, model.state_dict())
    if problems:
        raise ConfigError(
            f"{resume.path} was trained with a different model or data: {'; '.join(problems[:3])}. "
            "Resume with the settings it was trained with, or pass --fresh to start a new run "
            "(the old checkpoints are kept)."
        )
    return resume.path


def announce(trainer: Trainer, resume: Resume | None) -> None:
    """What the run resumes, and where its checkpoints and TensorBoard logs go: said once fit has read
    and checked the data, so a run that its data stops announces nothing."""
    lines = []
    if resume is not None:
        checkpoint = resume.checkpoint
        lines.append(f"Resuming from {resume.path} (saved in epoch {checkpoint.get('epoch')}, global step "
                     f"{checkpoint.get('global_step')}); pass --fresh to start a new run.")
        if "ExactResume" not in checkpoint.get("callbacks", {}):  # src.callbacks.ExactResume's state
            lines.append("Note: this checkpoint predates exact resume (it holds no random state or data position): "
                         "training goes on from it, but not with the batches and random draws of an uninterrupted "
                         "run.")
    where = [f"Checkpoints: {as_typed(trainer.checkpoint_callback.dirpath)}/"] if trainer.checkpoint_callback else []
    logger = trainer.logger
    if isinstance(logger, TensorBoardLogger):
        where.append(f"TensorBoard logs: {logger.log_dir} (view them with: tensorboard --logdir {logger.save_dir})")
    if where:
        lines.append("; ".join(where))
    trainer.callbacks.append(SayAfterData(*lines))


def as_typed(path: str | Path) -> Path:
    """`path` relative to the working directory when it lies below it, as a user would type it."""
    path = Path(path)
    return path.relative_to(Path.cwd()) if path.is_absolute() and path.is_relative_to(Path.cwd()) else path


def check_start(model: LightningModule, datamodule: LightningDataModule) -> None:
    """Settings of the model and the data that only make sense together, checked before any work."""
    hp = model.hparams
    views = getattr(datamodule, "views", 1)
    if hp.get("contrastive_weight", 0) > 0 and views != 2:
        raise ConfigError(
            f"model.contrastive_weight > 0 compares two augmented views of each image, but data.views "
            f"is {views}: set data.views: 2 (as configs/flowers17-contrastive.yaml does)"
        )
    mixing = getattr(datamodule, "mixup_alpha", 0) or getattr(datamodule, "cutmix_alpha", 0)
    if hp.get("contrastive_weight", 0) > 0 and mixing and not getattr(datamodule, "keep_unmixed", False):
        raise ConfigError("the contrastive term compares unmixed views, but the DataModule mixes them all: "
                          "give it keep_unmixed=True (train.py does) to mix only a copy for the cross entropy")
    if hp.get("init_from") and not Path(hp.init_from).is_file():
        raise ConfigError(
            f"model.init_from: {hp.init_from} does not exist; train the backbone first "
            "(e.g. python train.py --config configs/flowers17-pretrain.yaml) or pass --model.init_from PATH"
        )


def follow_knn(trainer: Trainer, datamodule: LightningDataModule) -> None:
    """With k-NN validation (pre-training: `evaluation` "knn") there is no val/acc or val/loss to follow:
    the checkpoint and early stopping that follow one of them follow val/knn_acc instead, and say so."""
    if getattr(datamodule, "evaluation", "classify") != "knn":
        return
    switched = []
    for i, callback in enumerate(trainer.callbacks):
        if isinstance(callback, ModelCheckpoint) and callback.monitor in ("val/acc", "val/loss"):
            callback.monitor, callback.mode = "val/knn_acc", "max"
            callback.filename = "epoch{epoch:03d}-knn{val/knn_acc:.4f}"
            switched.append("the best checkpoint")
        elif isinstance(callback, EarlyStopping) and callback.monitor in ("val/acc", "val/loss"):
            trainer.callbacks[i] = type(callback)("val/knn_acc", min_delta=abs(callback.min_delta), mode="max",
                                                  patience=callback.patience, verbose=callback.verbose)
            switched.append(f"early stopping (patience {callback.patience})")
    if switched:
        rank_zero_info(f"Validation scores the backbone by k-NN (val/knn_acc): {' and '.join(switched)} follow it")


def validation_may_choose(trainer: Trainer, datamodule: LightningDataModule) -> bool:
    """Whether validation may choose when to stop and which checkpoint is tested.

    Only when there is a validation and its images are held out of training. With data.train_on:
    train+val it scores images the model trains on: it soon reaches 100 % and stops improving, which
    early stopping would take for a plateau, and its best checkpoint is no choice. Without one
    (--trainer.limit_val_batches 0) there is nothing to choose by. Then early stopping is removed
    here and train.py tests the last weights.
    """
    if not getattr(datamodule, "validation_held_out", True):
        why = "the validation images are trained on (data.train_on)"
    elif trainer.limit_val_batches == 0:
        why = "there is no validation (--trainer.limit_val_batches 0)"
    else:
        return True
    stoppers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    if stoppers:
        trainer.callbacks = [c for c in trainer.callbacks if c not in stoppers]
        rank_zero_info(f"Early stopping is off: {why}")
    return False


@contextmanager
def no_trace_if_refused(trainer: Trainer, last: Path) -> Iterator[None]:
    """Bad data or settings found before a new run's first checkpoint (a UserError): nothing of the run
    can be resumed, so its TensorBoard folder goes too; a resumed run keeps its old folder."""
    logger = trainer.logger
    log_dir = Path(logger.log_dir) if logger is not None and logger.log_dir else None
    first_new = outermost_missing(log_dir) if log_dir is not None else None  # what this run creates
    try:
        yield
    except UserError:
        if first_new is not None and not last.exists() and trainer.is_global_zero:
            shutil.rmtree(first_new, ignore_errors=True)
        raise


class SayAfterData(Callback):
    """Lines said once, when fit has read and checked the data: Lightning prepares and sets up the
    DataModule before any callback's `setup`, so a run that its data stops says none of them."""

    def __init__(self, *lines: str) -> None:
        self.lines = lines

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for line in self.lines:
            rank_zero_info(line)
        self.lines = ()
