"""ViTClassifier: the LightningModule that owns the loss, metrics, optimiser and schedule."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from src.checkpoints import read_checkpoint
from src.errors import ConfigError, DivergedError
from src.hardware import fused_adamw, fused_attention
from src.models.knn import knn_accuracy
from src.models.losses import ProjectionHead, info_nce
from src.models.vit import ARCHITECTURE, ViT, grid_positions, upgrade_state_dict
from src.images import IMAGENET_MEAN, IMAGENET_STD, hflip_patches, resize_patches
from src.runs import fit_problems


def warmup_cosine(step: int, warmup_steps: int, total_steps: float, min_ratio: float,
                  time_progress: float = 0.0, warmup_time: float = 0.0) -> float:
    """LR multiplier: linear from ~0 to 1 over `warmup_steps`, then cosine down to `min_ratio`.

    Under a time budget the warm-up also ends when `warmup_time` (the share of the warm-up's time
    allowance already used) reaches 1, rising with whichever is further; the cosine ends at
    `total_steps` or when `time_progress` (the share of the post-warm-up time already used) reaches 1,
    whichever comes first; `total_steps` may be inf.
    """
    progress = cosine_progress(step, warmup_steps, total_steps, time_progress, warmup_time)
    if progress is None:
        return max((step + 1) / warmup_steps, warmup_time)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_progress(step: int, warmup_steps: int, total_steps: float, time_progress: float = 0.0,
                    warmup_time: float = 0.0) -> float | None:
    """How far `warmup_cosine`'s cosine has come, from 0 to 1; None while it is still warming up."""
    if step < warmup_steps and warmup_time < 1.0:
        return None
    return min(1.0, max((step - warmup_steps) / max(1, total_steps - warmup_steps), time_progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """`warmup_cosine` as a per-step scheduler. `time_progress` and `warmup_time` are kept current by
    the TimeBudget callback when the run has a --trainer.max_time; without one they stay 0 and the
    steps decide.

    Its length is set by `plan` when training starts (ViTClassifier.on_train_start); until then the
    learning rates are the optimiser's own.
    """

    # Planned from this run's settings; a resumed run restores its position, not an old plan.
    PLAN = ("warmup_steps", "total_steps", "min_ratio")

    def __init__(self, optimizer: torch.optim.Optimizer, min_ratio: float, warmup_steps: int = 0,
                 total_steps: float = math.inf) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.time_progress = 0.0
        self.warmup_time = 0.0
        super().__init__(optimizer)

    def plan(self, warmup_steps: int, total_steps: float) -> None:
        """Set the schedule's length, and the learning rates of the step it is at."""
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(self.last_epoch, self.warmup_steps, self.total_steps, self.min_ratio,
                               self.time_progress, self.warmup_time)
        return [base * factor for base in self.base_lrs]

    def progress(self) -> float | None:
        """The cosine's progress at the current step, from 0 to 1; None during the warm-up."""
        return cosine_progress(self.last_epoch, self.warmup_steps, self.total_steps, self.time_progress,
                               self.warmup_time)

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in self.PLAN}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: decay for weight matrices; none for biases, norms, cls_token and pos_embed.

    With `layer_decay` < 1 (layer-wise learning-rate decay, as BEiT and MAE fine-tune) each of the two is
    split by depth (`ViT.layer_id`): a group `depth + 1 - l` layers below the head learns at
    `layer_decay ** (depth + 1 - l)` times the rate (its `lr_scale`), so the pre-trained early layers move
    least. Parameters outside the ViT (the projector) learn at the full rate.
    """
    # Submodules name their own exceptions (ViT: cls_token, pos_embed), relative to themselves.
    skip = {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if hasattr(module, "no_weight_decay")
            for name in module.no_weight_decay()}
    vits = [(f"{prefix}." if prefix else "", module) for prefix, module in model.named_modules()
            if isinstance(module, ViT)]
    top = max((len(vit.blocks) + 1 for _, vit in vits), default=0)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = top
        if layer_decay != 1.0:
            layer = next((vit.layer_id(name.removeprefix(prefix)) for prefix, vit in vits
                          if name.startswith(prefix)), top)
        groups.setdefault((layer, param.ndim >= 2 and name not in skip), []).append(param)
    if layer_decay == 1.0:  # the two groups every checkpoint before layer decay has
        return [{"params": groups.get((top, True), []), "weight_decay": weight_decay},
                {"params": groups.get((top, False), []), "weight_decay": 0.0}]
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": layer_decay ** (top - layer), "name": f"layer{layer}" + ("" if decay else "-no_decay")}
            for (layer, decay), params in sorted(groups.items())]


def compile_unavailable(device: torch.device) -> str | None:
    """Why `torch.compile` cannot run on `device` here, or None when it can."""
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile is not supported on {device.type}"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed, which torch.compile needs on CUDA"
    # Inductor builds the C++ it writes for the CPU, and Triton its CUDA launchers, with the host compiler.
    compilers = (os.environ.get("CXX"), os.environ.get("CC"), "g++", "c++", "clang++", "gcc", "cc")
    if not any(name and shutil.which(name) for name in compilers):
        return "no C/C++ compiler (gcc or clang) on PATH, which torch.compile needs"
    return None


def compile_features(model: ViT) -> None:
    """Compile `forward_features` (what every step and `forward` run) in place; the weights are untouched."""
    # An instance attribute, not nn.Module.compile(): that would compile only __call__, which
    # training_step does not use (it needs the features for the contrastive term).
    model.forward_features = torch.compile(model.forward_features)


def mirror_tta(hparams: dict) -> bool:
    """Whether evaluation scores each image with its mirror: the recipe asks for it (`flip_tta`) and
    mirror images keep their class in this data (`hflip`, linked from the DataModule; checkpoints from
    before it read as True, as every run then mirrored its training images)."""
    return bool(hparams.get("flip_tta", False) and hparams.get("hflip", True))


def evaluation_logits(model: ViT, patches: Tensor, flip_tta: bool, patch_size: int) -> Tensor:
    """Logits (B, K) for evaluation and prediction: the model's, or with `flip_tta` the mean of the
    logits for each image and for its mirror image (horizontal-flip test-time augmentation)."""
    logits = model(patches)
    if flip_tta:
        logits = (logits + model(hflip_patches(patches, patch_size))) / 2
    return logits


class ViTClassifier(pl.LightningModule):
    """Image classification with a ViT.

    The network's settings (`dim`, `depth`, `tokenizer`, ...) are `ViT`'s arguments, passed through
    `**vit`: the CLI reads them from `ViT`'s signature, so they are declared once. `num_classes`,
    `image_size`, `patch_size`, `class_names`, `mean` and `std` come from the DataModule (linked by
    the CLI); all are saved with every checkpoint, so a checkpoint alone rebuilds the network and its
    evaluation preprocessing.

    With `contrastive_weight` > 0 the training batches hold two augmented views of each image and the
    loss is `CE + contrastive_weight * InfoNCE` between projections of the two views' class tokens.
    `mixup_alpha` / `cutmix_alpha` > 0 mix each training batch with torchvision's MixUp / CutMix (one
    of them per batch when both are set) and train on the soft targets they make: part of the recipe
    here, carried out by the DataModule (linked by the CLI), which mixes images before cutting patches.
    Both together are IDMM (Cao, Yu and Wu 2022): the cross entropy learns from a mixed copy of the
    first views, the contrastive term compares the two unmixed views (`CE_mixed + w * InfoNCE`).
    `init_from` starts a new run from another checkpoint's backbone (e.g. instance-discrimination
    pre-training) with a fresh head; `layer_decay` < 1 then lets the layers nearer the input learn
    slower (`param_groups`). `start_size` > 0 is progressive resizing: until the cosine has come
    `start_share` of its way (the warm-up included), training batches are resized to `start_size` px,
    fewer tokens and so cheaper steps, and the position embeddings to their grid (`grid_positions`);
    then, and for every evaluation, the images keep `image_size`. `compile` runs the ViT through
    `torch.compile` (in place, so checkpoints are unchanged); where that cannot work, training goes on
    uncompiled with a warning. "auto" is resolved by train.py before the model is built: compiled
    where it pays for the run's length on this machine (src/compiling.py).
    `flip_tta` scores validation, test and classify.py on the mean logits of each image and its
    mirror image, when mirror images keep their class in this data (`hflip`, linked from the
    DataModule, which measures or declares it). With `evaluation`
    "knn" (linked from the DataModule: pre-training) validation logs `val/knn_acc` instead, the
    accuracy of a k-NN classifier (`knn_k` neighbours, votes weighted by exp(cosine / `knn_temperature`))
    on the pooled features, fitted on the DataModule's labelled reference images.
    """

    def __init__(
        self,
        # optimiser and schedule
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        layer_decay: float = 1.0,
        start_size: int = 0,  # progressive resizing: the training images' size until start_share
        start_share: float = 0.5,
        # training-loss regularisers (mixing is carried out by the DataModule)
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        # the contrastive term
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
        projection_dim: int = 128,
        # where to start, how to run, how to evaluate
        init_from: str | None = None,
        compile: bool | Literal["auto"] = False,
        flip_tta: bool = False,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        # from the DataModule (linked by the CLI): what the outputs mean, how inputs were normalised
        class_names: list[str] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        evaluation: str = "classify",
        hflip: bool = True,
        **vit: Any,  # the network's settings: ViT's arguments
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
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1] (1 = off), got {layer_decay}")
        if evaluation not in ("classify", "knn") or knn_k < 1 or knn_temperature <= 0:
            raise ConfigError(f"need evaluation 'classify' or 'knn', knn_k >= 1 and knn_temperature > 0; got "
                              f"{evaluation!r}, {knn_k} and {knn_temperature}")
        if contrastive_weight < 0 or temperature <= 0 or projection_dim < 1:
            raise ConfigError(
                f"need contrastive_weight >= 0, temperature > 0 and projection_dim >= 1; got "
                f"{contrastive_weight}, {temperature} and {projection_dim}"
            )
        self.model = ViT(**vit)
        size, patch = self.model.settings["image_size"], self.model.settings["patch_size"]
        if start_size and not (patch <= start_size < size and start_size % patch == 0 and 0 < start_share <= 1):
            raise ConfigError(f"progressive resizing needs a start_size that is a multiple of patch_size={patch} "
                              f"below image_size={size}, and 0 < start_share <= 1; got {start_size} and {start_share}")
        num_classes = self.model.num_classes
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.hparams.update(self.model.settings)  # every network setting, the defaults too
        # Only built when used: a run without the contrastive term pays nothing and saves no extra weights.
        dim = self.model.settings["dim"]
        self.projector = ProjectionHead(dim, dim, projection_dim) if contrastive_weight > 0 else None
        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro")}
        if num_classes > 5:
            metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.train_metrics = MetricCollection(metrics, prefix="train/")
        self.val_metrics = self.train_metrics.clone(prefix="val/")
        self.test_metrics = self.train_metrics.clone(prefix="test/")
        # Drawn into TensorBoard by the TensorBoardPictures callback; updating it is a bincount.
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        # With evaluation "knn": (features (B, D), labels (B,)) of each validation batch, per loader.
        self.knn_batches: tuple[list, list] = ([], [])

    def forward(self, patches: Tensor) -> Tensor:
        return self.model(patches)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        hp = self.hparams
        # (B, [V,] N, P*P*C) with class targets (B,), or mixed by the DataModule: (V*B, N, P*P*C), (V*B, K);
        # or, for the contrastive term with mixing, those two unmixed, then mixed first views (B, N, P*P*C), (B, K).
        patches, targets, *mixed = batch
        size = self.training_size()
        if size != self.hparams.image_size:
            patches = resize_patches(patches, hp.patch_size, size)
            mixed = [resize_patches(mixed[0], hp.patch_size, size), *mixed[1:]] if mixed else mixed
        views = 1
        if patches.ndim == 4:  # (B, V, N, P*P*C): V augmentations of each image
            views = patches.shape[1]
            patches = patches.transpose(0, 1).flatten(0, 1)  # (V*B, N, P*P*C), all first views first
            targets = targets.repeat(views)  # (V*B,)
        # The cross entropy's input: the mixed copy when there is one. Each input has its own forward pass,
        # so the mixed images cannot reach the views' features, not even through the stem's batch statistics.
        features = self.model.forward_features(patches)  # (V*B, N+1, D)
        ce_features, ce_targets = features, targets
        if mixed:
            ce_features, ce_targets = self.model.forward_features(mixed[0]), mixed[1]  # (B, N+1, D), (B, K)
        logits = self.model.forward_head(ce_features)
        # Label smoothing regularises training only; validation and test report the plain loss.
        # cross_entropy takes class indices or, after MixUp/CutMix, class probabilities (B, K).
        loss = F.cross_entropy(logits, ce_targets, label_smoothing=hp.label_smoothing)
        if ce_targets.ndim == 2:
            ce_targets = ce_targets.argmax(dim=1)  # training accuracy counts the larger share of a mix
        if self.projector is not None:
            if views != 2:
                raise ConfigError(
                    f"contrastive_weight > 0 needs two unmixed augmented views per image, the batches hold "
                    f"{views}: set data.views: 2" + (" and data.keep_unmixed: true" if targets.ndim == 2 else "")
                )
            z1, z2 = self.projector(self.model.pool(features)).chunk(2)  # (B, projection_dim) each
            contrastive = info_nce(z1, z2, hp.temperature)
            self.log_dict({"train/ce": loss, "train/contrastive": contrastive}, on_step=True, on_epoch=False)
            loss = loss + hp.contrastive_weight * contrastive
        # One host sync per step, so a diverged run stops at once instead of training (and, worse,
        # checkpointing) on NaN weights until the next validation notices.
        if not torch.isfinite(loss):
            raise DivergedError(
                f"train/loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}): training diverged. The checkpoints saved before this step are kept; lower "
                f"--model.lr (now {hp.lr:g}) or lengthen --model.warmup_epochs and start again with --fresh"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.train_metrics(logits, ce_targets)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def training_size(self) -> int:
        """The training images' size at this step: `start_size` until the cosine has come `start_share` of
        its way (progressive resizing), then `image_size`."""
        hp = self.hparams
        if not hp.start_size:
            return hp.image_size
        progress = self.lr_schedulers().progress()
        size = hp.start_size if progress is None or progress < hp.start_share else hp.image_size
        if size != getattr(self, "_training_size", size):
            rank_zero_info(f"Progressive resizing: training images at {size} px from step {self.global_step}")
        self._training_size = size
        return size

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        patches, targets = batch
        logits = evaluation_logits(self.model, patches, mirror_tta(self.hparams), self.hparams.patch_size)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics(logits, targets)
        if stage == "val":
            self.val_confusion.update(logits, targets)
        # Evaluation losses are epoch means over all ranks.
        self.log(f"{stage}/loss", F.cross_entropy(logits, targets), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()
        self.knn_batches = ([], [])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.hparams.evaluation == "knn":  # loader 0: labelled references, loader 1: the queries
            patches, labels = batch
            self.knn_batches[dataloader_idx].append((self.model.pool(self.model.forward_features(patches)), labels))
            return
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.hparams.evaluation != "knn" or not all(self.knn_batches):
            return
        (reference, reference_labels), (queries, query_labels) = (
            [self.gathered(part) for part in zip(*batches)] for batches in self.knn_batches)
        num_classes = int(max(reference_labels.max(), query_labels.max())) + 1
        accuracy = knn_accuracy(reference, reference_labels, queries, query_labels, num_classes,
                                self.hparams.knn_k, self.hparams.knn_temperature)
        self.log("val/knn_acc", accuracy, prog_bar=True)
        self.knn_batches = ([], [])

    def gathered(self, parts: Sequence[Tensor]) -> Tensor:
        """This process's validation tensors concatenated; under DDP, which splits the loaders between
        processes, every process's, so each scores the whole set."""
        local = torch.cat(list(parts))
        return self.all_gather(local).flatten(0, 1) if self.trainer.world_size > 1 else local  # (W*n, ...)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def setup(self, stage: str) -> None:
        # The attention kernel for this run's device and precision, decided once, here.
        self.model.use_fused_attention(fused_attention(self.trainer.strategy.root_device, self.trainer.precision))
        # Called by every trainer.fit/validate/test; the flag keeps it to one compile. Not in
        # configure_model: weight averaging (EMA) warns that models which override it may be sharded.
        if self.hparams.compile is not True or getattr(self, "_compiled", False):  # "auto": the CLI's to resolve
            return
        self._compiled = True
        reason = compile_unavailable(self.trainer.strategy.root_device)
        if reason:
            rank_zero_warn(f"--model.compile: {reason}; training uncompiled")
            return
        compile_features(self.model)

    def on_fit_start(self) -> None:
        # Only a new run starts from init_from; a resumed one has just restored its own weights.
        if self.hparams.init_from and self.trainer.ckpt_path is None:
            self.load_backbone(self.hparams.init_from)

    def load_backbone(self, path: str | Path) -> None:
        """Copy every weight but the head from a checkpoint of a ViT with the same backbone. A backbone
        trained at another image size (so another token grid) fits too: its position embeddings are
        resized to this grid (`grid_positions`: bicubic, the class token kept)."""
        saved, state, _ = read_checkpoint(Path(path))
        backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
        expected = {k: v for k, v in self.model.state_dict().items() if not k.startswith("head.")}
        resized = ""
        if saved.get("image_size") != self.hparams.image_size and "pos_embed" in backbone:
            size, patch = self.hparams.image_size, self.hparams.patch_size
            backbone["pos_embed"] = grid_positions(backbone["pos_embed"], (size // patch) ** 2)
            resized = (f"; its position embeddings resized from {saved.get('image_size')} px to {size} px "
                       f"({(size // patch) ** 2} tokens)")
        keys = [k for k in ARCHITECTURE if k not in ("num_classes", "image_size")]
        problems = fit_problems(saved, dict(self.hparams), keys, backbone, expected)
        if problems:
            raise ConfigError(f"init_from {path}: its backbone does not fit this model: {'; '.join(problems[:3])}")
        self.model.load_state_dict(backbone, strict=False)
        rank_zero_info(f"Initialised the backbone from {path} ({len(backbone)} tensors{resized}); "
                       f"the {self.hparams.num_classes}-class head starts fresh.")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning loads the weights after this hook: checkpoints from before timm's names load too.
        for key in ("state_dict", "current_model_state"):  # the latter: the raw weights of an --ema run
            if key in checkpoint:
                checkpoint[key] = upgrade_state_dict(checkpoint[key], prefix="model.")

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self, hp.weight_decay, hp.layer_decay)
        for group in groups:
            group["lr"] = hp.lr * group.get("lr_scale", 1.0)  # the schedule scales each group's own rate
        precision = self._trainer.precision if self._trainer is not None else "32-true"
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas, fused=fused_adamw(self.device, precision))
        scheduler = WarmupCosine(optimizer, hp.min_lr / hp.lr)  # its length is planned in on_train_start
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # Planned here, not in configure_optimizers: counting the steps sets up the training data, and
        # set up before a checkpoint is restored, Lightning 2.6 never restores the loader's position
        # (Lightning issue 20550), so a resumed run would not see the batches it left off at.
        total_steps = self.trainer.estimated_stepping_batches  # inf when only --trainer.max_time bounds the run
        steps_per_epoch = max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)
        warmup_steps = int(min(self.hparams.warmup_epochs * steps_per_epoch, total_steps))
        self.lr_schedulers().plan(warmup_steps, total_steps)
