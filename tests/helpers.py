"""What the test files share besides fixtures (those are in conftest.py): the tiny run, and train.py
run as a real process or, for speed, in this process through the same `train.run`."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from src.models.classifier import param_groups
from src.models.vit import ViT

REPO = Path(__file__).resolve().parents[1]

# A run on the image folder fixtures (folders named `images`) keeps its checkpoints here.
RUN_DIR = Path("data/lightning/images")

TINY_RUN = [
    "--config", str(REPO / "configs" / "cifar10-cpu.yaml"),
    "--data", "ImageFolderDataModule",
    "--data.num_workers", "0",
    "--data.batch_size", "8",
    "--model.dim", "16",
    "--model.depth", "1",
    "--model.num_heads", "2",
    "--model.stem_width", "0",  # the recipe's 32-64-128 stem would cost more than the dim-16 model itself
    "--model.warmup_epochs", "0.5",
    "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1",
]


def train(cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS` as its own process in `cwd` (so its data/ lands there), output captured."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, **kwargs)


@dataclass
class Ran:
    """What `train.run` returned and printed: its exit status, and stdout, stderr and the log in order."""

    returncode: int
    output: str


def train_here(cwd: Path, *args: str) -> Ran:
    """`python train.py ARGS` in this process (`train.run`, what the script's `__main__` calls), in `cwd`:
    the same code path without ~5 s of interpreter start-up."""
    import train as train_script

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric", "lightning")]
    before = os.getcwd()
    os.chdir(cwd)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                code = train_script.run(list(args))
            except SystemExit as exit:  # --print_config, or a stop on a signal
                code = exit.code or 0
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        os.chdir(before)
    return Ran(code, stream.getvalue())


def train_losses(model: ViT, steps: int, precision: str, seed: int = 0, device: str = "cpu") -> list[float]:
    """Losses of `steps` AdamW steps on one fixed random batch, as the benchmark's step does them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 64, 48, generator=generator).to(device)  # (B, N, P*P*C)
    y = torch.randint(0, 10, (64,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def info_nce_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out anchor by anchor, straight from the SimCLR paper's definition."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    B = len(z1)
    losses = []
    for i in range(2 * B):
        positive = (i + B) % (2 * B)
        similarity = [float(z[i] @ z[k]) / temperature for k in range(2 * B)]
        denominator = sum(math.exp(s) for k, s in enumerate(similarity) if k != i)
        losses.append(-math.log(math.exp(similarity[positive]) / denominator))
    return sum(losses) / len(losses)


def read_last(cwd: Path) -> dict:
    return torch.load(cwd / RUN_DIR / "last.ckpt", map_location="cpu", weights_only=True)


def partial_files(cwd: Path) -> list[str]:
    folder = cwd / RUN_DIR
    return [n for n in os.listdir(folder) if n.endswith(".partial")] if folder.is_dir() else []


def wait_for_writes(process: subprocess.Popen, cwd: Path, count: int) -> None:
    """Return the moment the `count`-th checkpoint write of this process has begun (or it has ended)."""
    seen, writing = 0, False
    while process.poll() is None:
        now = bool(partial_files(cwd))
        seen += now and not writing
        writing = now
        if seen >= count:
            return
