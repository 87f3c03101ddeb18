"""Exact resume: a run killed and resumed any number of times ends with the weights, and logs the
train/loss curve, of the same run never interrupted. Real `train.py` processes on tiny data, on the
CPU (one thread count per machine, so the arithmetic repeats bit for bit)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from conftest import REPO
from helpers import RUN_DIR as MODELS, TINY_RUN, partial_files, read_last, wait_for_writes
from src import rng

EPOCHS = 4
STEPS_PER_EPOCH = 12  # 96 training images / batch 8

# What differs between the runs compared: the path the training images take and the recipe's switches.
SETUPS = {
    "device": [],  # the CPU recipe: uint8 images augmented a batch at a time in the training process
    "loader": ["--data.augment_on", "loader", "--data.num_workers", "2"],  # PIL augmentation in 2 workers
    # The GPU recipe's switches (configs/cifar10.yaml) on the CPU, dropout too.
    "gpu-switches": ["--data.views", "2", "--data.erase_prob", "0.25", "--model.mixup_alpha", "0.8",
                     "--model.cutmix_alpha", "1.0", "--model.stem_width", "8", "--model.drop_path", "0.1",
                     "--model.dropout", "0.1"],
}
ENV = {**os.environ, "PYTHONPATH": str(REPO / "tests")}  # the kill switch callback


def train_args(images: Path, setup: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *TINY_RUN, "--data.root", str(images),
            "--trainer.max_epochs", str(EPOCHS), "--step_checkpoint.every_n_train_steps", "1", *SETUPS[setup],
            *extra]


def kill_at(step: int, stage: str) -> list[str]:
    """Flags that make train.py SIGKILL itself at `step`, in training or inside validation."""
    switch = {"class_path": "kill_switch.KillAt", "init_args": {"step": step, "stage": stage}}
    return ["--trainer.callbacks+", json.dumps(switch)]


def losses(cwd: Path) -> dict[int, list[float]]:
    """Every train/loss value logged at each step, from every event file of the run's TensorBoard folder
    (a resumed run logs again the steps after its checkpoint that the killed one had logged)."""
    logged: dict[int, list[float]] = {}
    folder = cwd / "data/lightning/lightning_logs/version_0"
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    logged.setdefault(event.step, []).append(value.simple_value)
    return logged


def finished(cwd: Path) -> dict:
    checkpoint = read_last(cwd)
    assert checkpoint["global_step"] == EPOCHS * STEPS_PER_EPOCH
    return checkpoint


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """Bit-identical weights and optimiser state, and the same train/loss at every step."""
    a, b = finished(resumed), finished(uninterrupted)
    differ = [k for k in b["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(b['state_dict'])} tensors differ, e.g. {differ[:3]}: " + str(
        max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in differ))
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in b["optimizer_states"][0]["state"].values()]
    resumed_moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in a["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(x, y) for pair, other in zip(moments, resumed_moments) for x, y in zip(pair, other))
    curve, reference = losses(resumed), losses(uninterrupted)
    assert sorted(curve) == sorted(reference) == list(range(EPOCHS * STEPS_PER_EPOCH))
    off = {step: (values, reference[step]) for step, values in curve.items() if set(values) != set(reference[step])}
    assert not off, f"train/loss differs at steps {sorted(off)[:5]}: {list(off.values())[:2]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, images: Path):
    """The folder of the never-interrupted run of each setup, trained once per module."""
    done: dict[str, Path] = {}

    def run(setup: str) -> Path:
        if setup not in done:
            cwd = tmp_path_factory.mktemp(f"uninterrupted-{setup}")
            result = subprocess.run(train_args(images, setup), cwd=cwd, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            done[setup] = cwd
        return done[setup]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
def test_six_sigkills_end_bit_identical(tmp_path: Path, images: Path, uninterrupted, setup: str):
    """SIGKILL mid-epoch, inside validation, at an epoch's start and inside checkpoint writes, resume each
    time: the same
    weights, optimiser state and train/loss curve as the run that never stopped."""
    moments = random.Random(setup)
    plan = [("train", moments.randint(3, 10)),  # mid-epoch 0, before its training batch
            ("validation", STEPS_PER_EPOCH),  # inside the validation that ends epoch 0
            ("train", STEPS_PER_EPOCH),  # before epoch 1's first batch: resumes the checkpoint validation wrote
            ("write", moments.randint(2, 6)),  # inside the n-th checkpoint write of the next run
            ("train", moments.randint(26, 34)),  # mid-epoch 2
            ("write", moments.randint(2, 6))]
    steps, mid_write = [], 0
    for n, (stage, when) in enumerate(plan):
        args = train_args(images, setup, *(kill_at(when, stage) if stage != "write" else []))
        with open(tmp_path / f"run{n}.log", "w") as log:
            process = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=ENV)
            if stage == "write":
                wait_for_writes(process, tmp_path, when)
                process.send_signal(signal.SIGKILL)
                mid_write += bool(partial_files(tmp_path))
            process.wait(timeout=600)
        assert process.returncode == -signal.SIGKILL, (tmp_path / f"run{n}.log").read_text()[-3000:]
        steps.append(read_last(tmp_path)["global_step"])
    assert steps == sorted(steps) and steps[-1] < EPOCHS * STEPS_PER_EPOCH, steps
    assert mid_write >= 1, "no kill landed inside a checkpoint write"

    final = subprocess.run(train_args(images, setup), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Resuming from" in final.stderr and "not exact" not in final.stderr
    print(f"{setup}: {len(plan)} SIGKILLs ({mid_write} inside a checkpoint write), resumed at global steps {steps}")
    assert_same_run(tmp_path, uninterrupted(setup))


@pytest.mark.slow
def test_a_sigterm_mid_epoch_ends_bit_identical(tmp_path: Path, images: Path, uninterrupted):
    args = train_args(images, "device")
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_writes(process, tmp_path, 5)  # training, a few steps in
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143 and "Stopped by SIGTERM" in output, output[-3000:]
    stopped = read_last(tmp_path)["global_step"]
    assert 0 < stopped < EPOCHS * STEPS_PER_EPOCH and stopped % STEPS_PER_EPOCH, stopped  # mid-epoch
    final = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_run(tmp_path, uninterrupted("device"))


DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def run_ddp(cwd: Path, args: list[str]) -> int:
    """Run a 2-process train.py in its own process group; once rank 0 has exited, nothing of it is left."""
    with open(cwd / "ddp.log", "a") as log:
        process = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                   start_new_session=True)
        code = process.wait(timeout=600)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # a rank left waiting on the one that died
    except ProcessLookupError:
        pass
    return code


@pytest.mark.slow
def test_two_process_ddp_killed_and_resumed_ends_bit_identical(tmp_path: Path, images: Path):
    """Each rank's random state is in the checkpoint (gathered from all ranks); the data order of
    every rank is a function of the seed and the epoch."""
    steps_per_epoch = STEPS_PER_EPOCH // 2  # 48 images per rank
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    args = train_args(images, "device", *DDP)
    assert run_ddp(tmp_path / "whole", args) == 0, (tmp_path / "whole/ddp.log").read_text()[-3000:]
    kills = [("train", 4), ("validation", 2 * steps_per_epoch), ("train", 2 * steps_per_epoch),
             ("train", 3 * steps_per_epoch - 2)]
    for stage, step in kills:
        assert run_ddp(tmp_path / "killed", [*args, *kill_at(step, stage)]) == -signal.SIGKILL
    assert read_last(tmp_path / "killed")["global_step"] == 3 * steps_per_epoch - 2
    assert run_ddp(tmp_path / "killed", args) == 0, (tmp_path / "killed/ddp.log").read_text()[-3000:]
    a, b = read_last(tmp_path / "killed"), read_last(tmp_path / "whole")
    assert a["global_step"] == b["global_step"] == EPOCHS * steps_per_epoch
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())
    assert len(a["callbacks"]["ExactResume"]["ranks"]) == 2  # both ranks' random states


def test_random_state_survives_a_weights_only_checkpoint(tmp_path: Path):
    import numpy as np

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    torch.save({"rng": rng.capture()}, tmp_path / "state.pt")
    expected = (torch.rand(4), random.random(), np.random.rand())
    rng.restore(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    again = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_training_batches_depend_on_the_seed_the_epoch_and_the_image_only(image_folder: Path):
    """Resumed mid-epoch from its saved state, or started afresh at an epoch, the training loader gives
    the batches the uninterrupted one gives, augmentations (drawn in loader workers) included,
    whatever the number of workers and whatever the training process has drawn."""
    from src.data import ImageFolderDataModule

    def loader(workers: int, epoch: int = 0):
        data = ImageFolderDataModule(root=str(image_folder), batch_size=4, num_workers=workers, augment_on="loader")
        data.setup("fit")
        train = data.train_dataloader()
        train.sampler.set_epoch(epoch)
        return train

    def same(batches, others) -> bool:
        return len(batches) == len(others) and all(
            torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(batches, others))

    torch.manual_seed(0)
    whole = loader(2)
    batches = iter(whole)
    seen = [next(batches) for _ in range(3)]
    state = whole.state_dict()
    rest = list(batches)
    whole.sampler.set_epoch(1)
    next_epoch = list(whole)  # the same worker processes, on to epoch 1

    torch.manual_seed(1)
    resumed = loader(2)
    resumed.load_state_dict(state)
    assert same(list(resumed), rest)  # mid-epoch: new workers, the same augmentations
    assert same(list(loader(1, epoch=1)), next_epoch)  # an epoch's start, one worker
    assert same(list(loader(0)), seen + rest)  # no workers: the training process itself
    orders = [torch.cat([t for _, t in batches]) for batches in (seen + rest, next_epoch)]
    assert not torch.equal(*orders)  # each epoch its own order
