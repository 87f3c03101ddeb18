"""--trainer.max_time: the warm-up + cosine schedule fills the budget, on a fake clock.

The clock moves one second per training step and one per validation batch, and nowhere else, so
every run here is exactly reproducible and a resumed run can be compared step for step.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytorch_lightning as pl
import pytest
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import src.callbacks
from conftest import REPO
from src.callbacks import AnnealedEarlyStopping, TimeBudget, warmup_cosine_of
from src.cli import ViTCLI
from src.models.classifier import ViTClassifier, warmup_cosine

LR, MIN_LR = 1e-3, 1e-5
STEPS_PER_EPOCH = 10  # 40 images, batch 4
VAL_BATCHES = 2


class FakeClock:
    """time.monotonic for Lightning's Timer and TimeBudget, advanced only by the Tick callback."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Tick(Callback):
    """One second per training step and per validation batch; records each step's learning rate."""

    def __init__(self, clock: FakeClock, save_at: int | None = None, path: Path | None = None,
                 seconds: float = 1.0) -> None:
        self.clock, self.save_at, self.path = clock, save_at, path
        self.seconds = seconds  # per step and per validation batch: 2.0 is a machine at half the speed
        self.lrs: dict[int, float] = {}  # global step -> the learning rate that step used

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.clock.now += self.seconds
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)

    def on_validation_batch_end(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            self.clock.now += self.seconds


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    patches, targets = torch.randn(40, 16, 48, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    train = DataLoader(TensorDataset(patches, targets), batch_size=4)  # no shuffling: the same batches every run
    val = DataLoader(TensorDataset(patches[:8], targets[:8]), batch_size=4)  # VAL_BATCHES
    return train, val


def fit(monkeypatch, tmp_path: Path, max_time: int | None, max_epochs: int = -1, warmup_epochs: float = 1.0,
        save_at: int | None = None, resume: Path | None = None, seconds: float = 1.0,
        warmup_share: float | None = TimeBudget.WARMUP_SHARE, model_args: dict | None = None,
        **trainer_args) -> tuple[pl.Trainer, Tick]:
    clock = FakeClock()
    fake_time = types.SimpleNamespace(monotonic=clock.monotonic)
    monkeypatch.setattr(pl.callbacks.timer, "time", fake_time)
    monkeypatch.setattr(src.callbacks, "time", fake_time)
    torch.manual_seed(0)
    model = ViTClassifier(num_classes=3, image_size=16, patch_size=4, dim=16, depth=1, num_heads=2,
                          lr=LR, min_lr=MIN_LR, warmup_epochs=warmup_epochs, drop_path=0.0, **(model_args or {}))
    tick = Tick(clock, save_at, tmp_path / "mid.ckpt", seconds)
    budget = TimeBudget()
    budget.warmup_share = warmup_share
    trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, max_time={"seconds": max_time} if max_time else None,
                        callbacks=[tick, budget, *trainer_args.pop("callbacks", [])], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        **{"enable_checkpointing": False, **trainer_args})
    trainer.fit(model, *loaders(), ckpt_path=resume, weights_only=True if resume else None)
    return trainer, tick


def test_the_schedule_fills_the_budget(monkeypatch, tmp_path: Path):
    # Budget 200 s; an epoch is 10 steps + 2 s of validation, so the reserve for the final validation
    # and the test is 3 x 2 = 6 s and the cosine must end at 194 s of training time.
    trainer, tick = fit(monkeypatch, tmp_path, max_time=200)
    lrs = [tick.lrs[step] for step in sorted(tick.lrs)]
    warmup = STEPS_PER_EPOCH  # warmup_epochs 1
    assert lrs[0] == pytest.approx(LR / warmup) and lrs[warmup - 1] == pytest.approx(LR)  # warm-up first
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then the cosine, never rising
    # Training stopped at the deadline, not at max_time and not before: 194 s of training clock is
    # 16 epochs (192 s) + 2 steps, so the last step trained is global step 161 (0-based).
    assert trainer.global_step == 162
    assert lrs[-1] == pytest.approx(MIN_LR, abs=0.01 * LR)  # the cosine's floor, reached at the deadline
    # Every rate after warm-up is the cosine at the share of time used between the end of warm-up
    # (12 s: one epoch and its validation) and the deadline, read when the step before began.
    for step in range(warmup + 1, 162):
        began = (step - 1) + 2 * ((step - 1) // STEPS_PER_EPOCH)  # training clock at that step's start
        expected = LR * warmup_cosine(step, warmup, math.inf, MIN_LR / LR, (began - 12) / (194 - 12))
        assert tick.lrs[step] == pytest.approx(expected, rel=1e-6), step


def test_a_slow_machine_warms_up_within_its_share_of_the_budget(monkeypatch, tmp_path: Path):
    # Five epochs of warm-up (50 steps) on a machine at half the speed (2 s a step) would fill half of
    # a 200 s budget; the warm-up gets at most 10 % of the time to the deadline, and the run anneals.
    trainer, tick = fit(monkeypatch, tmp_path, max_time=200, warmup_epochs=5.0, seconds=2.0)
    lrs = [tick.lrs[step] for step in sorted(tick.lrs)]
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(LR) and peak * 2.0 <= 0.1 * 200 + 2.0  # warm: by 10 % of the budget
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rising until then, never flat
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then only the cosine
    assert lrs[-1] <= 0.05 * LR  # annealed
    assert trainer.global_step * 2.0 >= 0.7 * 200  # and trained most of the budget
    # Without the cap it would still be warming up at a fifth of the budget (step 20 of 50).
    assert warmup_cosine(20, 50, math.inf, MIN_LR / LR) < 0.5


def test_a_typed_warmup_is_not_capped(monkeypatch, tmp_path: Path, image_folder: Path):
    # The same slow machine with the cap lifted, as a typed --model.warmup_epochs lifts it: all 50 steps.
    trainer, tick = fit(monkeypatch, tmp_path, max_time=200, warmup_epochs=5.0, seconds=2.0, warmup_share=None)
    lrs = [tick.lrs[step] for step in sorted(tick.lrs)]
    assert max(range(len(lrs)), key=lrs.__getitem__) == 49
    for flags, share in [([], TimeBudget.WARMUP_SHARE), (["--model.warmup_epochs", "5"], None)]:
        cli = ViTCLI(args=["--config", str(REPO / "configs/cifar10-cpu.yaml"), "--data", "ImageFolderDataModule",
                           "--data.root", str(image_folder), "--trainer.logger", "false", "--shape", "recipe",
                           "--trainer.max_time", "00:00:05:00", *flags])
        monkeypatch.chdir(tmp_path)
        cli.build()
        assert next(c for c in cli.trainer.callbacks if isinstance(c, TimeBudget)).warmup_share == share


def test_steps_and_time_together_end_at_whichever_comes_first(monkeypatch, tmp_path: Path):
    # max_epochs 5 (50 steps, about 60 s with validation) inside a 200 s budget: the steps decide.
    trainer, tick = fit(monkeypatch, tmp_path, max_time=200, max_epochs=5)
    assert trainer.global_step == 5 * STEPS_PER_EPOCH
    assert tick.lrs[49] == pytest.approx(MIN_LR, abs=0.01 * LR)  # the step-based cosine ended with the epochs
    # max_epochs 50 (500 steps) in the same budget: the time decides, as without max_epochs.
    trainer, tick = fit(monkeypatch, tmp_path, max_time=200, max_epochs=50)
    assert trainer.global_step == 162
    assert tick.lrs[161] == pytest.approx(MIN_LR, abs=0.01 * LR)


def test_without_a_budget_the_epochs_decide(monkeypatch, tmp_path: Path):
    trainer, tick = fit(monkeypatch, tmp_path, max_time=None, max_epochs=3)
    lrs = [tick.lrs[step] for step in sorted(tick.lrs)]
    assert trainer.global_step == 30 and lrs[29] == pytest.approx(MIN_LR, abs=0.01 * LR)


def test_a_resumed_budget_continues_the_same_schedule(monkeypatch, tmp_path: Path):
    _, whole = fit(monkeypatch, tmp_path, max_time=200, save_at=75)  # mid-epoch 8, after warm-up
    trainer, resumed = fit(monkeypatch, tmp_path, max_time=200, resume=tmp_path / "mid.ckpt")
    assert min(resumed.lrs) == 75  # it went on from the checkpoint
    assert trainer.global_step == 162  # and stopped at the same deadline
    assert resumed.lrs == {step: lr for step, lr in whole.lrs.items() if step >= 75}  # at the same rates


def test_the_final_weights_are_saved_when_no_validation_ends_the_last_epoch(monkeypatch, tmp_path: Path):
    # Validation every 5 epochs (as flowers17-pretrain.yaml has it): the deadline falls in an epoch
    # without one, and fine-tuning reads the final weights from last.ckpt.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "models", filename="last", monitor=None)
    trainer, _ = fit(monkeypatch, tmp_path, max_time=90, check_val_every_n_epoch=5, callbacks=[checkpoint],
                     enable_checkpointing=True)
    # Deadline 84 s: 5 epochs and a validation (52 s), 3 more epochs, 2 steps: it stopped in epoch 8 (0-based),
    # which has no validation.
    assert trainer.global_step == 8 * STEPS_PER_EPOCH + 2
    saved = torch.load(tmp_path / "models/last.ckpt", weights_only=True)
    assert saved["global_step"] == trainer.global_step
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in trainer.lightning_module.state_dict().items())


@pytest.mark.parametrize("max_time, max_epochs", [(None, 20), (240, -1)])  # 20 epochs, by steps or by time
def test_early_stopping_waits_for_the_learning_rate_to_fall(monkeypatch, tmp_path: Path, max_time, max_epochs):
    # A metric that never improves after the first validation (an improvement must beat it by 10): Lightning's
    # EarlyStopping stops after `patience` validations, at the peak learning rate; ours counts its patience
    # only once the cosine is past its midpoint, the learning rate below half its peak.
    stopped = {}
    for stopper in (EarlyStopping("val/loss", min_delta=10.0, patience=2),
                    AnnealedEarlyStopping("val/loss", min_delta=10.0, patience=2)):
        trainer, tick = fit(monkeypatch, tmp_path, max_time=max_time, max_epochs=max_epochs, callbacks=[stopper])
        assert trainer.should_stop and stopper.stopped_epoch > 0
        stopped[type(stopper)] = (stopper.stopped_epoch, tick.lrs[max(tick.lrs)])
    (plain, plain_lr), (annealed, annealed_lr) = stopped[EarlyStopping], stopped[AnnealedEarlyStopping]
    assert plain == 2 and plain_lr > 0.9 * LR
    assert 10 <= annealed <= 14 and annealed_lr < 0.5 * LR  # the midpoint is epoch 10.5 of 20; 2 more validations
    # The key of Lightning's class: checkpoints saved with EarlyStopping resume its count.
    assert AnnealedEarlyStopping("val/loss").state_key == EarlyStopping("val/loss").state_key


class TokenCount(Callback):
    """The tokens each training step's batch reached the network with, and those of every validation batch."""

    def __init__(self) -> None:
        self.train: dict[int, int] = {}
        self.val: set[int] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        def record(module, inputs):
            (self.train.setdefault(trainer.global_step, inputs[0].shape[-2]) if trainer.training
             else self.val.add(inputs[0].shape[-2]))
        pl_module.model.patch_embed.register_forward_pre_hook(record)


@pytest.mark.parametrize("max_time, max_epochs", [(None, 6), (160, -1)])  # 60 steps, by steps or by time
def test_progressive_resizing_trains_small_images_first(monkeypatch, tmp_path: Path, max_time, max_epochs):
    # 16 px images, 4 px patches: 16 tokens; at start_size 8 px, 4. The warm-up is 1 epoch (10 steps) and the
    # switch comes when the cosine is 60 % of its way: by steps at step 10 + 0.6 x 50 = 40; by time (1 s a
    # step, 2 s a validation) 60 % of the time between the warm-up's end and the deadline.
    tokens = TokenCount()
    trainer, _ = fit(monkeypatch, tmp_path, max_time=max_time, max_epochs=max_epochs, callbacks=[tokens],
                     model_args={"start_size": 8, "start_share": 0.6})
    switch = min(step for step, n in tokens.train.items() if n == 16)
    assert set(tokens.train.values()) == {4, 16} and all(n == 4 for step, n in tokens.train.items() if step < switch)
    assert all(n == 16 for step, n in tokens.train.items() if step >= switch)
    assert tokens.val == {16}  # evaluation always sees the full images
    schedule = warmup_cosine_of(trainer)
    if max_time is None:
        assert switch == 40
    else:
        assert 0.55 < switch / trainer.global_step < 0.75  # of the steps: validations take some of the time
    assert schedule.progress() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("flags, max_epochs", [
    (["--trainer.max_time", "00:00:20:00"], -1),  # the budget alone: the recipe's 30 epochs stop capping it
    (["--trainer.max_time", "00:00:20:00", "--trainer.max_epochs", "7"], 7),  # both typed: whichever first
    ([], 30),  # no budget: the recipe's epochs
])
def test_a_typed_budget_lifts_the_recipes_epochs(monkeypatch, tmp_path: Path, image_folder: Path, flags, max_epochs):
    monkeypatch.chdir(tmp_path)
    cli = ViTCLI(args=["--config", str(REPO / "configs/cifar10-cpu.yaml"), "--data", "ImageFolderDataModule",
                       "--data.root", str(image_folder), "--trainer.logger", "false", "--shape", "recipe",
                       "--model.compile", "false", *flags])
    cli.build()
    assert cli.trainer.max_epochs == max_epochs
    assert any(isinstance(c, TimeBudget) for c in cli.trainer.callbacks)
