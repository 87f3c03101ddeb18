"""ViTClassifier: the LightningModule that owns the loss, metrics, optimiser and schedule."""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from src.errors import ConfigError
from src.models.vit import ViT


# The hyperparameters that fix the ViT's shape: a checkpoint's weights fit exactly the models built
# with the same values (dropout and drop path change training, not the weights' layout).
ARCHITECTURE = ("num_classes", "image_size", "patch_size", "dim", "depth", "num_heads", "mlp_ratio")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear from ~0 to 1 over `warmup_steps`, then cosine down to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for weight matrices; none for biases, norms, cls_token and pos_embed."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and name not in skip else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class ViTClassifier(L.LightningModule):
    """Image classification with a ViT.

    `num_classes`, `image_size`, `patch_size`, `class_names`, `mean` and `std` come from the
    DataModule (linked by the CLI); they are saved with every checkpoint, so a checkpoint alone
    rebuilds the network and its evaluation preprocessing.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        drop_path: float = 0.1,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        label_smoothing: float = 0.1,
        class_names: list[str] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if lr <= 0 or min_lr < 0 or min_lr > lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0; got lr={lr}, min_lr={min_lr}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be 0 or more, got {weight_decay}")
        if warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be 0 or more, got {warmup_epochs}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.model = ViT(
            num_classes=num_classes,
            image_size=image_size,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            drop_path=drop_path,
        )
        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro")}
        if num_classes > 5:
            metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.train_metrics = MetricCollection(metrics, prefix="train/")
        self.val_metrics = self.train_metrics.clone(prefix="val/")
        self.test_metrics = self.train_metrics.clone(prefix="test/")
        # Drawn into TensorBoard by the TensorBoardPictures callback; updating it is a bincount.
        self.val_confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, patches: Tensor) -> Tensor:
        return self.model(patches)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        patches, targets = batch
        logits = self(patches)
        # Label smoothing regularises training only; validation and test report the plain loss.
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        metrics = {"train": self.train_metrics, "val": self.val_metrics, "test": self.test_metrics}[stage]
        metrics(logits, targets)
        if stage == "val":
            self.val_confusion.update(logits, targets)
        # The training loss is a per-step curve; evaluation losses are epoch means over all ranks.
        training = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=training, on_epoch=not training, prog_bar=True,
                 sync_dist=not training)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=not training)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=hp.betas)
        total_steps = int(self.trainer.estimated_stepping_batches)
        # estimated_stepping_batches has loaded the train loader, so the epoch length is known.
        steps_per_epoch = max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)
        warmup_steps = min(int(hp.warmup_epochs * steps_per_epoch), total_steps)
        schedule = partial(
            warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=hp.min_lr / hp.lr
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
