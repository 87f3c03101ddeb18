"""Callbacks that the CLI adds to every run."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from src.errors import ConfigError
from src.visualize import attention_rollout, confusion_figure, prediction_figure, to_pixels

# Beyond this a confusion matrix is unreadable and slow to draw.
MAX_CONFUSION_CLASSES = 100


class KeepLoggerVersion(Callback):
    """Store the TensorBoard version in each checkpoint, so a resumed run extends the same curves."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if trainer.logger is not None:
            checkpoint["logger_version"] = trainer.logger.version


class TensorBoardPictures(Callback):
    """Pictures in TensorBoard: every `every_n_epochs` validations, the confusion matrix, a grid of
    validation images with predicted/true labels, and attention rollouts over the same fixed images;
    after testing, the hyperparameters with the final metrics in the HPARAMS tab."""

    def __init__(self, every_n_epochs: int = 5, num_images: int = 16) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ConfigError(
                f"pictures.every_n_epochs and pictures.num_images must be positive, "
                f"got {every_n_epochs} and {num_images}"
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images

    @staticmethod
    def _tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        matrix = pl_module.val_confusion.compute()  # every rank takes part in the sync
        logger = self._tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        hp = pl_module.hparams
        names = hp.class_names or [str(i) for i in range(hp.num_classes)]
        if hp.num_classes <= MAX_CONFUSION_CLASSES:  # e.g. not for 680 pre-training instances
            logger.experiment.add_figure("val/confusion_matrix", confusion_figure(matrix, names), step)

        # The same images every time, so changes are the model's; spread over the split, because
        # folder datasets list one class after another.
        val_set = getattr(trainer.datamodule, "val_set", None)
        if val_set is None:
            return
        picks = torch.linspace(0, len(val_set) - 1, min(self.num_images, len(val_set))).round().long()
        samples = [val_set[i] for i in picks.unique().tolist()]
        patches = torch.stack([patches for patches, _ in samples]).to(pl_module.device)  # (B, N, P*P*C)
        targets = [int(target) for _, target in samples]
        probabilities = pl_module(patches).float().softmax(dim=-1)
        confidence, predicted = probabilities.max(dim=-1)
        pixels = to_pixels(patches, hp.image_size, hp.patch_size, hp.mean, hp.std)
        titles = [f"{names[p]} ({c:.2f})\ntrue: {names[t]}"
                  for p, c, t in zip(predicted.tolist(), confidence.tolist(), targets)]
        correct = [p == t for p, t in zip(predicted.tolist(), targets)]
        logger.experiment.add_figure("val/predictions", prediction_figure(pixels, titles, correct), step)
        rollout = attention_rollout(pl_module.model.attention_maps(patches))
        logger.experiment.add_figure(
            "val/attention", prediction_figure(pixels, titles, correct, heatmaps=rollout), step
        )

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = self._tensorboard(trainer)
        if logger is None or "test/acc" not in trainer.callback_metrics:
            return
        metrics = {"hp/test_acc": float(trainer.callback_metrics["test/acc"])}
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        if best is not None:
            metrics["hp/best_val_acc"] = float(best)
        params = {k: v for k, v in pl_module.hparams.items() if not k.startswith("_")}
        if trainer.datamodule is not None:
            params.update({f"data/{k}": v for k, v in trainer.datamodule.hparams.items() if not k.startswith("_")})
        logger.log_hyperparams(params, metrics)
