"""Callbacks that the CLI adds to every run."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, Timer
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from src import rng
from src.errors import ConfigError
from src.models.classifier import WarmupCosine, evaluation_logits, mirror_tta
from src.visualize import attention_rollout, confusion_figure, prediction_figure, to_pixels

# Beyond this a confusion matrix is unreadable and slow to draw.
MAX_CONFUSION_CLASSES = 100


class KeepLoggerVersion(Callback):
    """Store the TensorBoard version in each checkpoint, so a resumed run extends the same curves."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if trainer.logger is not None:
            checkpoint["logger_version"] = trainer.logger.version


def at_epochs_last_batch(trainer: Trainer) -> bool:
    """Whether the batch just trained is its epoch's last: no place for a checkpoint to resume from.

    Lightning 2.6 mis-counts epochs when it resumes from a state saved after an epoch's last batch
    but before (or during) its validation: a later resume replays a whole epoch, or stops for want
    of validation metrics. The checkpoint written after validation covers that moment instead.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches


class StepCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint for `every_n_train_steps` / `train_time_interval` that skips an epoch's last
    batch (see `at_epochs_last_batch`)."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        if at_epochs_last_batch(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class Interrupted(SystemExit):
    """Training stopped on a signal after saving last.ckpt; exits with status 128 + the signal number."""


class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) or SIGTERM (cluster preemption, `kill`): finish the batch, save last.ckpt, exit.

    The stop waits for the end of a batch that is not an epoch's last (see `at_epochs_last_batch`):
    from there Lightning 2.6 resumes exactly, as it does from a step checkpoint. last.ckpt is saved
    there; the run exits at the start of the next batch, once Lightning has logged the batch saved,
    so the resumed run's curves have no gap. Under DDP the ranks agree on the stop at every step, so
    they stop together. A second Ctrl-C stops at once, unsaved.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._saved: tuple[int, str] | None = None  # (signal, message) once last.ckpt holds the stop
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requested, self._saved = None, None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = {number: signal.getsignal(number) for number in self.SIGNALS}
        for number in self.SIGNALS:
            signal.signal(number, self._request)

    def _request(self, number: int, frame: object) -> None:
        if self.requested is not None:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = number
        rank_zero_info(f"\n{signal.Signals(number).name} received: stopping after this batch to save last.ckpt "
                       "(press Ctrl-C again to stop at once without saving) ...")

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        if self._saved is not None:
            return
        stop = self.requested is not None
        if trainer.world_size > 1:  # every rank must take the same decision at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        # An epoch of a single batch has no other place to stop; its resume may repeat that epoch.
        if not stop or (at_epochs_last_batch(trainer) and trainer.num_training_batches > 1):
            return
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)  # the full state, to resume from
        number = self.requested or signal.SIGTERM  # another rank was signalled
        self._saved = (number, f"Stopped by {signal.Signals(number).name} in epoch {trainer.current_epoch}, global "
                               f"step {trainer.global_step}: saved {last}. Run the same command to resume from it.")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        self._exit_if_saved()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._exit_if_saved()  # the batch saved was the run's last

    def _exit_if_saved(self) -> None:
        if self._saved is None:
            return
        number, message = self._saved
        rank_zero_info(f"\n{message}")  # after the progress bar's line
        self._restore()
        raise Interrupted(128 + number)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()


class ExactResume(Callback):
    """Every training checkpoint holds each process's random state; a resumed run restores it just
    before its first batch, so from there on it draws what the uninterrupted run draws (augmentation,
    MixUp/CutMix, erasing, stochastic depth, dropout). The data order resumes with the training
    loader (StatefulDataLoader), and what loader workers draw is seeded per sample (src.data.base).

    Restored in `on_train_start`: after the sanity check (which Lightning runs on an isolated random
    state) and after the training loader is set up, and before any batch. Loaders draw nothing from
    this state (they have their own generators), so nothing else moves it in between, in this run
    or in the one that saved it.
    """

    def __init__(self) -> None:
        self._trainer: Trainer | None = None
        self._saved: list[dict[str, Any]] | None = None  # one per rank, from the checkpoint resumed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        state = rng.capture()
        trainer = self._trainer
        ranks = [state]
        # Every rank writes its checkpoint's contents (rank 0 alone writes the file): gather them all.
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, state)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("ranks")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        saved, self._saved = self._saved, None
        if not saved:
            return
        if len(saved) != trainer.world_size:
            rank_zero_info(f"The checkpoint was saved by {len(saved)} processes, this run has {trainer.world_size}: "
                           "training goes on from it, with random draws an uninterrupted run would not make")
            return
        rng.restore(saved[trainer.global_rank])


def warmup_cosine_of(trainer: Trainer) -> WarmupCosine | None:
    """The run's warm-up + cosine schedule, if its optimiser has one."""
    configs = trainer.lr_scheduler_configs
    return configs[0].scheduler if configs and isinstance(configs[0].scheduler, WarmupCosine) else None


class AnnealedEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, whose patience counts only once the warm-up + cosine schedule is past its
    midpoint: the learning rate below half its peak.

    On a small dataset the validation loss often stops improving while the learning rate is high and
    improves again as the cosine anneals. Stopped at such a plateau, a 20-minute Flowers-17 run ended at
    270 of the 730 epochs its budget planned, its learning rate still at 70 % of its peak and never
    annealed (bench/RESULTS.md). Before the midpoint an improvement still sets the best score, and a
    non-finite metric or a `stopping_threshold` / `divergence_threshold` still stops at once. Without the
    schedule (another optimiser setup) it is Lightning's EarlyStopping.
    """

    COUNT_FROM = 0.5  # of the cosine's progress: the learning rate at half its peak

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counting = True

    @property
    def state_key(self) -> str:
        # Lightning's EarlyStopping's key, so a checkpoint saved before this class resumes its state.
        return "EarlyStopping" + repr({"monitor": self.monitor, "mode": self.mode})

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        schedule = warmup_cosine_of(trainer)
        progress = schedule.progress() if schedule is not None else 1.0
        self._counting = progress is not None and progress >= self.COUNT_FROM
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        waited = self.wait_count
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if not self._counting and self.wait_count > waited:  # no improvement, at a high learning rate
            self.wait_count = waited
            if self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
                self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
                should_stop, reason = False, None
        return should_stop, reason


class TimeBudget(Callback):
    """With --trainer.max_time, fit the learning-rate schedule to the time: warm-up as configured but
    never longer than `WARMUP_SHARE` of the budget, then the cosine reaches min_lr at the deadline and
    training stops there.

    The deadline is max_time on Lightning's training clock (its Timer, which a resumed run restores)
    less a reserve for the final validation and the test: three times the longest of the recent
    validations, each timed from its start to its last batch (the pictures and checkpoints written
    after it are not validation). The warm-up ends after its epochs or at `WARMUP_SHARE` of the time to
    the deadline, whichever comes first, so a slow or busy machine does not spend a short budget warming
    up; a typed --model.warmup_epochs is the user's word and lifts that cap. The cosine's progress is the share of the time between the end of warm-up and the deadline
    already used; with max_epochs too, it ends at whichever comes first.
    """

    RECENT = 5  # validations that set the reserve
    WARMUP_SHARE = 0.1  # of the training time to the deadline, at most, for the warm-up

    def __init__(self) -> None:
        self.warmup_share: float | None = self.WARMUP_SHARE  # None: the configured warm-up (a typed flag)
        self.warmup_end: float | None = None  # training-clock seconds when warm-up ended
        self.validations: list[float] = []  # seconds of the recent validations
        self._timer: Timer | None = None
        self._validation_start = 0.0
        self._validation_batches_end: float | None = None

    @property
    def reserve(self) -> float:
        """Seconds kept after the deadline: the final validation and a test up to twice its size."""
        return 3 * max(self.validations, default=0.0)

    def deadline(self) -> float:
        """When the cosine ends and training stops, in training-clock seconds."""
        return self._timer.time_elapsed() + self._timer.time_remaining() - self.reserve

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None),
                           None)
        if self._timer is not None:
            warmup = ("the warm-up takes the --model.warmup_epochs given" if self.warmup_share is None else
                      f"the warm-up takes at most {self.warmup_share:.0%} of it, so a slow machine does not spend "
                      "the budget warming up")
            rank_zero_info(f"Time budget: the learning rate reaches min_lr at the deadline, "
                           f"{self._timer.time_remaining() / 60:.1f} min of training from now less the time the "
                           f"final validation and test will take; {warmup}")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        schedule = warmup_cosine_of(trainer)
        if self._timer is None or schedule is None:
            return
        elapsed, deadline = self._timer.time_elapsed(), self.deadline()
        # The share of the warm-up's time allowance used (none: a typed warm-up ends by its steps alone).
        warmup_time = 0.0 if self.warmup_share is None else elapsed / max(1e-9, self.warmup_share * deadline)
        if self.warmup_end is None and (trainer.global_step >= schedule.warmup_steps or warmup_time >= 1.0):
            self.warmup_end = elapsed
        progress = 0.0
        if self.warmup_end is not None:
            progress = (elapsed - self.warmup_end) / max(1e-9, deadline - self.warmup_end)
            warmup_time = 1.0
        # Every rank must step with the same learning rate, so rank 0's clock decides.
        schedule.time_progress, schedule.warmup_time = trainer.strategy.broadcast(
            (min(1.0, max(0.0, progress)), min(1.0, max(0.0, warmup_time))))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._timer is None or not trainer.strategy.broadcast(self._timer.time_elapsed() >= self.deadline()):
            return
        trainer.should_stop = True
        every = trainer.check_val_every_n_epoch
        if every and (trainer.current_epoch + 1) % every and trainer.checkpoint_callback is not None:
            # No validation ends this epoch, so no checkpoint would hold the schedule's final weights
            # (init_from reads them from last.ckpt): save them, as a stop on a signal does.
            trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_start, self._validation_batches_end = time.monotonic(), None

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._validation_batches_end = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            end = self._validation_batches_end or time.monotonic()
            self.validations = [*self.validations, end - self._validation_start][-self.RECENT:]

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_end": self.warmup_end, "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warmup_end = state_dict.get("warmup_end")
        self.validations = list(state_dict.get("validations", []))


class TensorBoardPictures(Callback):
    """Pictures in TensorBoard: at a run's first validation, every `every_n_epochs` epochs and at its
    last validation, the confusion matrix, a grid of validation images with predicted/true labels, and
    attention rollouts over the same fixed images; after testing, the hyperparameters with the final
    metrics in the HPARAMS tab.

    `every_n_epochs` None (the default) draws as often as keeps the drawing within `SHARE` of the run's
    time: a drawing takes about 2 s on a 2-core CPU, which every 5 epochs of a small dataset (3 s an
    epoch) was 12 % of the training time (bench/RESULTS.md)."""

    SHARE = 0.02  # of the time since the latest drawing, at most, for the next
    UNTIMED_EVERY = 5  # epochs between drawings until one has been timed in this process

    def __init__(self, every_n_epochs: int | None = None, num_images: int = 16) -> None:
        if (every_n_epochs is not None and every_n_epochs < 1) or num_images < 1:
            raise ConfigError(
                f"pictures.every_n_epochs and pictures.num_images must be positive, "
                f"got {every_n_epochs} and {num_images}"
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self._validated: int | None = None  # global step of this run's latest validation
        self._drawn: int | None = None  # global step of the latest validation drawn
        self._drawing = (0.0, 0.0)  # when the latest drawing in this process ended, and its seconds

    @staticmethod
    def _tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validated = None

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self._drawn}  # a resumed run goes on with the same pictures, not a new first one

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._drawn = state_dict.get("drawn")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or pl_module.hparams.get("evaluation") == "knn":
            return  # pre-training's head predicts no class to draw
        self._validated = trainer.global_step
        # Whether this validation is the run's last is known only after it (early stopping decides
        # then): a last one not drawn here is drawn when training ends (on_train_end).
        if self._drawn is None or self._due(trainer):
            self._draw(trainer, pl_module)

    def _due(self, trainer: Trainer) -> bool:
        """Whether this validation is drawn: every `every_n_epochs`, or by the time share (rank 0's clock)."""
        ended, seconds = self._drawing
        if self.every_n_epochs is not None or not ended:  # (a resumed run: every 5 until it has timed one)
            return (trainer.current_epoch + 1) % (self.every_n_epochs or self.UNTIMED_EVERY) == 0
        return bool(trainer.strategy.broadcast(time.monotonic() - ended >= seconds / self.SHARE))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The model still holds the weights of the last validation when no training step followed it.
        if self._validated is not None and self._validated != self._drawn and self._validated == trainer.global_step:
            self._draw(trainer, pl_module)

    def _draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The latest validation's pictures, logged at its global step."""
        start = time.monotonic()
        try:
            self._log_pictures(trainer, pl_module)
        finally:
            self._drawing = (time.monotonic(), time.monotonic() - start)

    def _log_pictures(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drawn = trainer.global_step
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
        was_training = pl_module.training
        pl_module.eval()  # on_train_end comes after Lightning has put the model back in training mode
        with torch.no_grad():
            logits = evaluation_logits(pl_module.model, patches, mirror_tta(hp), hp.patch_size)
            rollout = attention_rollout(pl_module.model.attention_maps(patches), pl_module.model.global_pool)
        pl_module.train(was_training)
        probabilities = logits.float().softmax(dim=-1)  # as validation scored them
        confidence, predicted = probabilities.max(dim=-1)
        pixels = to_pixels(patches, hp.image_size, hp.patch_size, hp.mean, hp.std)
        titles = [f"{names[p]} ({c:.2f})\ntrue: {names[t]}"
                  for p, c, t in zip(predicted.tolist(), confidence.tolist(), targets)]
        correct = [p == t for p, t in zip(predicted.tolist(), targets)]
        logger.experiment.add_figure("val/predictions", prediction_figure(pixels, titles, correct), step)
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
