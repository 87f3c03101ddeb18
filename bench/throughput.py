"""Training-step throughput and peak memory of a config's model on this machine.

    python bench/throughput.py --config configs/cifar10-cpu.yaml
    python bench/throughput.py --config configs/cifar10.yaml --device cuda --precision bf16-mixed

A step is forward + cross entropy + backward + AdamW on random patches of the config's shape, so
the figure is the model's, not the data pipeline's. Several timed windows after warm-up; the median
is reported, with the spread, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.cli import ViTCLI, default_precision  # noqa: E402
from src.models.classifier import param_groups  # noqa: E402


def build(config: str, overrides: list[str]) -> tuple[torch.nn.Module, int, int, int, int, float]:
    """The config's ViT and its input geometry, built by the same CLI that train.py uses."""
    with tempfile.TemporaryDirectory() as scratch:  # never resume from, or write to, data/
        cli = ViTCLI(args=["--config", config, "--trainer.logger", "false",
                           "--checkpoint.dirpath", scratch, *overrides])
    hp, dm = cli.model.hparams, cli.datamodule
    return cli.model.model, dm.batch_size, hp.image_size, hp.patch_size, hp.num_classes, hp.weight_decay


def autocast(device: str, precision: str):
    """The autocast context Lightning would use for `precision`."""
    if precision == "bf16-mixed":
        return torch.autocast(device, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device, dtype=torch.float16)
    return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10-cpu.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: what train.py picks for the device")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra train.py flags, e.g. --model.dim=128")
    args = parser.parse_args()

    model, batch_size, image_size, patch_size, num_classes, weight_decay = build(args.config, args.overrides)
    batch_size = args.batch_size or batch_size
    precision = args.precision or default_precision("cuda" if args.device.startswith("cuda") else "cpu")
    device = torch.device(args.device)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=1e-4)
    if precision == "16-mixed":
        sys.exit("16-mixed needs a GradScaler; benchmark bf16-mixed or 32-true")

    n = (image_size // patch_size) ** 2
    x = torch.randn(batch_size, n, patch_size * patch_size * 3, device=device)  # (B, N, P*P*C)
    y = torch.randint(0, num_classes, (batch_size,), device=device)

    def step() -> None:
        with autocast(device.type, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        rates.append(args.steps * batch_size / (time.perf_counter() - start))

    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated on the GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB process max RSS"
    print(f"config     {args.config} {' '.join(args.overrides)}".rstrip())
    print(f"model      {params / 1e6:.2f} M params, {n} tokens + cls, batch {batch_size}")
    print(f"device     {device} ({torch.get_num_threads()} threads), precision {precision}, torch {torch.__version__}")
    print(f"throughput {statistics.median(rates):.0f} img/s median of {args.windows} windows x {args.steps} steps "
          f"(min {min(rates):.0f}, max {max(rates):.0f})")
    print(f"step       {1000 * batch_size / statistics.median(rates):.1f} ms")
    print(f"memory     {peak}")


if __name__ == "__main__":
    main()
