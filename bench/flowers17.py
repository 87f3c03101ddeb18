"""Flowers-17 at equal wall-clock: supervised vs. + contrastive term vs. pre-train + fine-tune.

    python bench/flowers17.py --root ../shared/datasets/17flowers --budget 600

Each method gets the same budget in seconds, all of it spent through the real `train.py` with
`--trainer.max_time`, which fits the warm-up + cosine schedule into it (start-up, about 10 s per run,
comes on top). Pre-train + fine-tune splits the budget (`--pretrain-share`). Every run starts fresh in its own
folder; the test accuracy of the checkpoint chosen on validation (of the last weights with
`-- --data.train_on train+val`) and the wall time are printed per method, then a table.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import yaml

from accuracy import REPO, max_time, test_accuracy, train  # bench/ is the script's folder


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
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per method (max_time)")
    parser.add_argument("--pretrain-share", type=float, default=0.6, help="of the budget, for pre-training")
    parser.add_argument("--methods", nargs="+", default=["supervised", "contrastive", "pretrain+finetune"])
    parser.add_argument("overrides", nargs="*", help="extra flags for every run, e.g. --data.split=2")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="flowers17-bench-"))
    cache = scratch / "cache"
    common = ["--data.root", str(Path(args.root).resolve()), "--data.download", "false",
              "--data.cache_dir", str(cache), "--early_stopping.patience", "100000", *args.overrides]

    rows = []
    for method in args.methods:
        folder = Path(tempfile.mkdtemp(prefix=method.replace("+", "-") + "-", dir=scratch))
        if method == "pretrain+finetune":
            pre_budget = args.budget * args.pretrain_share
            _, pre_seconds, _ = train("configs/flowers17-pretrain.yaml", [*common, *max_time(pre_budget)], folder)
            backbone = last_checkpoint("configs/flowers17-pretrain.yaml", folder)
            _, seconds, output = train("configs/flowers17-finetune.yaml", [
                *common, *max_time(args.budget - pre_budget), "--model.init_from", str(backbone)], folder)
            seconds += pre_seconds
            finetuned = last_checkpoint("configs/flowers17-finetune.yaml", folder)
            epochs = f"{epochs_done(backbone)} + {epochs_done(finetuned)}"
        else:
            config = {"supervised": "configs/flowers17.yaml",
                      "contrastive": "configs/flowers17-contrastive.yaml"}[method]
            _, seconds, output = train(config, [*common, *max_time(args.budget)], folder)
            epochs = str(epochs_done(last_checkpoint(config, folder)))
        split = re.search(r"Flowers-17: (.*?): \d+ train", output)
        rows.append((method, epochs, seconds, test_accuracy(output)))
        print(f"{method}: test acc {rows[-1][3]:.4f} after {epochs} epochs in {seconds:.0f} s "
              f"({split.group(1) if split else 'split not reported'})", flush=True)

    print(f"\n| method | epochs | wall s | test acc |\n|---|---|---|---|")
    for method, epochs, seconds, accuracy in rows:
        print(f"| {method} | {epochs} | {seconds:.0f} | {accuracy:.4f} |")
    print(f"\nruns kept in {scratch}")


if __name__ == "__main__":
    main()
