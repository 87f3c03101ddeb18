"""A callback that SIGKILLs the training process at a chosen moment, for tests that interrupt the real
train.py (`--trainer.callbacks+ '{"class_path": "kill_switch.KillAt", ...}'`, tests/ on PYTHONPATH).
It changes nothing else: no state, no random draws."""

from __future__ import annotations

import os
import signal

from pytorch_lightning import Callback, Trainer


class KillAt(Callback):
    """SIGKILL this process once `global_step` reaches `step`: before that training batch
    (`stage="train"`, mid-epoch) or inside the validation that follows it (`stage="validation"`)."""

    def __init__(self, step: int, stage: str = "train") -> None:
        self.step, self.stage = step, stage

    def _maybe_kill(self, trainer: Trainer, stage: str) -> None:
        if stage == self.stage and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer: Trainer, *args) -> None:
        self._maybe_kill(trainer, "train")

    def on_validation_batch_end(self, trainer: Trainer, *args) -> None:
        if not trainer.sanity_checking:
            self._maybe_kill(trainer, "validation")
