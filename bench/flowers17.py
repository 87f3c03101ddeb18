"""Flowers-17 at equal wall-clock: supervised vs. + contrastive term vs. IDMM pre-train + fine-tune.

    python bench/flowers17.py --root ../shared/datasets/17flowers --budget 180 --seeds 0 1 \
        --train-on train train+val --json flowers17.json

Every run goes through the real `train.py` as a user types it, fresh, in its own folder, with
`--trainer.max_time` set to its budget, which fits the warm-up + cosine schedule into it (start-up,
about 10 s per train.py, comes on top). Methods:

- supervised: configs/flowers17.yaml
- contrastive: configs/flowers17-contrastive.yaml (CE + 0.5 InfoNCE between two views)
- idmm: configs/flowers17-pretrain.yaml for `--pretrain-share` of the budget (no class label; its k-NN
  curve val/knn_acc is reported), then configs/flowers17-finetune.yaml from its last.ckpt for the rest

each with `--data.train_on` train (validation held out: the checkpoint is chosen on it) and train+val
(the last weights are tested), for every `--seed_everything` in `--seeds`. The split is the one
train.py uses: official split 1 when datasplits.mat is in --root, else its seeded split (printed).
Printed per run: test accuracy, best validation accuracy, epochs, wall seconds; then a table of
mean and spread per method and training set.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

import yaml

from accuracy import REPO, max_time, test_accuracy, train, val_curve  # bench/ is the script's folder

CONFIGS = {"supervised": "configs/flowers17.yaml", "contrastive": "configs/flowers17-contrastive.yaml"}
PRETRAIN, FINETUNE = "configs/flowers17-pretrain.yaml", "configs/flowers17-finetune.yaml"


def last_checkpoint(config: str, folder: Path) -> Path:
    """The last.ckpt a run of `config` in `folder` writes (its `checkpoint.dirpath`, relative to `folder`)."""
    return folder / yaml.safe_load((REPO / config).read_text())["checkpoint"]["dirpath"] / "last.ckpt"


def epochs_done(checkpoint: Path) -> int:
    """How many epochs the run that wrote `checkpoint` (its last.ckpt) completed."""
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]) + 1


def run_method(method: str, common: list[str], budget: float, share: float, folder: Path) -> dict:
    """Train `method` for `budget` seconds in `folder`; its figures."""
    result: dict = {}
    if method == "idmm":
        launched, pre_seconds, _ = train(PRETRAIN, [*common, *max_time(budget * share)], folder)
        backbone = last_checkpoint(PRETRAIN, folder)
        result["knn_curve"] = [{"s": round(s, 1), "epoch": e, "knn_acc": round(a, 4)}
                               for s, e, a in val_curve(folder, launched, "val/knn_acc")]
        launched, seconds, output = train(FINETUNE, [*common, *max_time(budget * (1 - share)),
                                                     "--model.init_from", str(backbone)], folder)
        result["epochs"] = f"{epochs_done(backbone)} + {epochs_done(last_checkpoint(FINETUNE, folder))}"
        seconds += pre_seconds
        config = FINETUNE
    else:
        config = CONFIGS[method]
        launched, seconds, output = train(config, [*common, *max_time(budget)], folder)
        result["epochs"] = str(epochs_done(last_checkpoint(config, folder)))
    curve = val_curve(folder, launched)
    split = re.search(r"Flowers-17: (.*?): \d+ train", output)
    result.update(wall_s=round(seconds, 1), test_acc=test_accuracy(output),
                  best_val_acc=max((a for _, _, a in curve), default=float("nan")),
                  split=split.group(1) if split else "not reported")
    return result


def spread(values: list[float]) -> str:
    """Mean ± standard deviation in percent (± 0 for one value)."""
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * deviation:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/flowers17", help="folder with jpg/ (and datasplits.mat)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per method (max_time)")
    parser.add_argument("--pretrain-share", type=float, default=0.4,
                        help="of IDMM's budget, for pre-training (0.4 beat 0.7 on validation at 240 s)")
    parser.add_argument("--methods", nargs="+", default=["supervised", "contrastive", "idmm"],
                        choices=["supervised", "contrastive", "idmm"])
    parser.add_argument("--train-on", nargs="+", default=["train", "train+val"], choices=["train", "train+val"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="--seed_everything of each run")
    parser.add_argument("--json", help="write every run's figures here (after each run)")
    parser.add_argument("overrides", nargs="*", help="extra flags for every run, after --, e.g. -- --data.split=2")
    args = parser.parse_args()
    if not 0 < args.pretrain_share < 1:
        parser.error(f"--pretrain-share must be between 0 and 1, got {args.pretrain_share}")

    scratch = Path(tempfile.mkdtemp(prefix="flowers17-bench-"))
    common = ["--data.root", str(Path(args.root).resolve()), "--data.download", "false",
              "--data.cache_dir", str(scratch / "cache"), "--early_stopping.patience", "100000",
              "--trainer.enable_progress_bar", "false", *args.overrides]
    results = []
    for train_on in args.train_on:
        for method in args.methods:
            for seed in args.seeds:
                folder = Path(tempfile.mkdtemp(prefix=f"{method}-{train_on}-{seed}-", dir=scratch))
                flags = [*common, "--data.train_on", train_on, "--seed_everything", str(seed)]
                result = {"method": method, "train_on": train_on, "seed": seed, "budget_s": args.budget,
                          **({"pretrain_share": args.pretrain_share} if method == "idmm" else {}),
                          **run_method(method, flags, args.budget, args.pretrain_share, folder)}
                results.append(result)
                knn = ", ".join(f"{p['epoch']}: {p['knn_acc']:.3f}" for p in result.get("knn_curve", []))
                print(f"{method} on {train_on}, seed {seed}: test acc {result['test_acc']:.4f} (best val "
                      f"{result['best_val_acc']:.4f}) after {result['epochs']} epoch(s) in {result['wall_s']:.0f} s"
                      + (f"; pre-training's k-NN val acc by epoch: {knn}" if knn else "")
                      + f" [{result['split']}]", flush=True)
                if args.json:  # after every run: a long series interrupted keeps what it finished
                    Path(args.json).write_text(json.dumps(results, indent=1))

    print(f"\nbudget {args.budget:.0f} s per run, seeds {args.seeds}, mean ± std over seeds (%)\n"
          "| method | trained on | epochs | test acc | best val acc |\n|---|---|---|---|---|")
    for train_on in args.train_on:
        for method in args.methods:
            runs = [r for r in results if r["method"] == method and r["train_on"] == train_on]
            print(f"| {method} | {train_on} | {', '.join(r['epochs'] for r in runs)} | "
                  f"{spread([r['test_acc'] for r in runs])} | {spread([r['best_val_acc'] for r in runs])} |")
    print(f"\nruns kept in {scratch}")


if __name__ == "__main__":
    main()
