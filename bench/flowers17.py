"""Flowers-17 at equal wall-clock: supervised vs. + contrastive term vs. pre-train + fine-tune.

    python bench/flowers17.py --root ../shared/datasets/17flowers --budget 600

Each method gets the same budget in seconds, all of it spent through the real `train.py`. The
epochs that fit are calibrated first (a 1-epoch and a 6-epoch timed run per config after an untimed
one; the difference is the cost of an epoch, start-up excluded, and spans one round of TensorBoard
pictures, which come every 5 epochs), so every run completes its warm-up + cosine
schedule instead of being cut off mid-way; `--trainer.max_time` is set as well, as a hard stop.
Pre-train + fine-tune splits the budget (`--pretrain-share`). Every run starts fresh in its own
folder; the test accuracy of the checkpoint chosen on validation (of the last weights with
`-- --data.train_on train+val`) and the wall time are printed per method, then a table.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

import yaml

from accuracy import REPO, test_accuracy, train  # bench/ is the script's folder

PICTURES_EVERY = 5  # the CLI's default --pictures.every_n_epochs


def seconds_per_epoch(config: str, common: list[str], scratch: Path) -> tuple[float, float]:
    """(start-up seconds, seconds per epoch) of a config, from a 1-epoch and a 6-epoch run.

    An untimed 1-epoch run goes first: it fills the caches the timed runs would otherwise fill
    unevenly (decoded images; with --model.compile, the compiled graphs, last partial batch included).
    The 5 epochs between the timed runs hold one round of TensorBoard pictures (every 5 epochs, 1.7 s
    on Flowers-17): a 3-epoch run had none, and under-counted an epoch by 0.3-0.5 s of about 3.
    """
    times = []
    for epochs in (1, 1, 1 + PICTURES_EVERY):
        folder = Path(tempfile.mkdtemp(dir=scratch))
        _, seconds, _ = train(config, [*common, "--trainer.max_epochs", str(epochs)], folder)
        times.append(seconds)
    per_epoch = (times[2] - times[1]) / PICTURES_EVERY
    if per_epoch <= 0:
        sys.exit(f"{config}: calibration failed: {1 + PICTURES_EVERY} epochs took {times[2]:.1f} s, "
                 f"1 epoch {times[1]:.1f} s")
    return times[1] - per_epoch, per_epoch


def last_checkpoint(config: str, folder: Path) -> Path:
    """The last.ckpt a run of `config` in `folder` writes (its `checkpoint.dirpath`, relative to `folder`)."""
    return folder / yaml.safe_load((REPO / config).read_text())["checkpoint"]["dirpath"] / "last.ckpt"


def epochs_done(checkpoint: Path) -> int:
    """How many epochs the run that wrote `checkpoint` (its last.ckpt) completed."""
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/flowers17", help="folder with jpg/ (and datasplits.mat)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per method, start-up included")
    parser.add_argument("--pretrain-share", type=float, default=0.6, help="of the budget, for pre-training")
    parser.add_argument("--methods", nargs="+", default=["supervised", "contrastive", "pretrain+finetune"])
    parser.add_argument("overrides", nargs="*", help="extra flags for every run, e.g. --data.split=2")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="flowers17-bench-"))
    cache = scratch / "cache"
    common = ["--data.root", str(Path(args.root).resolve()), "--data.download", "false",
              "--data.cache_dir", str(cache), "--early_stopping.patience", "100000", *args.overrides]

    def plan(config: str, budget: float) -> list[str]:
        # Calibrating a fine-tune needs no backbone: an epoch costs the same from any weights.
        startup, per_epoch = seconds_per_epoch(config, [*common, "--model.init_from", "null"], scratch)
        epochs = max(1, math.floor((budget - startup) / per_epoch))
        print(f"{config}: start-up {startup:.1f} s, {per_epoch:.2f} s/epoch -> {epochs} epochs in {budget:.0f} s",
              flush=True)
        minutes, seconds = divmod(int(budget), 60)
        return ["--trainer.max_epochs", str(epochs), "--trainer.max_time", f"00:00:{minutes:02d}:{seconds:02d}"]

    rows = []
    for method in args.methods:
        folder = Path(tempfile.mkdtemp(prefix=method.replace("+", "-") + "-", dir=scratch))
        if method == "pretrain+finetune":
            pre_budget = args.budget * args.pretrain_share
            pre_plan = plan("configs/flowers17-pretrain.yaml", pre_budget)
            fine_plan = plan("configs/flowers17-finetune.yaml", args.budget - pre_budget)
            _, pre_seconds, _ = train("configs/flowers17-pretrain.yaml", [*common, *pre_plan], folder)
            backbone = last_checkpoint("configs/flowers17-pretrain.yaml", folder)
            _, seconds, output = train("configs/flowers17-finetune.yaml",
                                    [*common, *fine_plan, "--model.init_from", str(backbone)], folder)
            seconds += pre_seconds
            finetuned = last_checkpoint("configs/flowers17-finetune.yaml", folder)
            epochs = f"{epochs_done(backbone)} + {epochs_done(finetuned)} ({pre_plan[1]} + {fine_plan[1]})"
        else:
            config = {"supervised": "configs/flowers17.yaml",
                      "contrastive": "configs/flowers17-contrastive.yaml"}[method]
            run_plan = plan(config, args.budget)
            _, seconds, output = train(config, [*common, *run_plan], folder)
            epochs = f"{epochs_done(last_checkpoint(config, folder))} ({run_plan[1]})"
        split = re.search(r"Flowers-17: (.*?): \d+ train", output)
        rows.append((method, epochs, seconds, test_accuracy(output)))
        print(f"{method}: test acc {rows[-1][3]:.4f} after {epochs} epochs in {seconds:.0f} s "
              f"({split.group(1) if split else 'split not reported'})", flush=True)

    print(f"\n| method | epochs run (planned) | wall s | test acc |\n|---|---|---|---|")
    for method, epochs, seconds, accuracy in rows:
        print(f"| {method} | {epochs} | {seconds:.0f} | {accuracy:.4f} |")
    print(f"\nruns kept in {scratch}")


if __name__ == "__main__":
    main()
