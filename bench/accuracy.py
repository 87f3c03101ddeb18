"""Accuracy at equal compute: train recipes for a fixed wall-clock budget, report test accuracy and the curve.

    python bench/accuracy.py --budget 1200 --runs tintn cpu          # 20 min each, CIFAR-10 subset
    python bench/accuracy.py --budget 300 --runs all no-conv no-mix no-repeat no-erase plain  # the ablation
    python bench/accuracy.py --data cifar10 --data-root data/cifar --budget 600 --runs gpu

A run is a config plus flags (RECIPES below, or `--config` with `--runs custom`), trained fresh
through the real `train.py` in its own folder with `--trainer.max_time` set to the budget, exactly
as a user would run it: train.py fits its warm-up + cosine schedule into that time and keeps room
for the final validation and test (start-up, about 10 s, comes on top). Reported per run: the test
accuracy of the checkpoint chosen on validation, epochs, wall seconds, and the curve of validation
accuracy against seconds since launch (TensorBoard's event times). `--json FILE` writes all of it.

The default data is the real CIFAR-10 images in ../shared/datasets/cifar10-subset (5 170 PNGs) read
as an image folder with its own seeded 10 % validation and 10 % test split (517 + 517 images), with
the image-folder defaults (its own statistics, mirror flips and crop measured from the images), as
`--data ImageFolderDataModule --data.root` gives a user.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (config, flags). The no-* runs each take one switch out of `all` (the ablation).
CPU = "configs/cifar10-cpu.yaml"
# The CPU recipe as it was in issue 7, before issue 17 moved it to 8x8 px tokens, a wider conv stem,
# the mean-token head and flip test-time augmentation. The issue-7 runs below start from it.
ISSUE7 = ["--data.patch_size", "4", "--model.stem_width", "0", "--model.global_pool", "token",
          "--model.flip_tta", "false"]
# Every issue-7 switch on top of the issue-7 CPU recipe: MixUp / CutMix, random erasing and repeated
# augmentation (64 images x 2 views per step). It was the CPU recipe until the ablation below.
ALL = [*ISSUE7, "--model.mixup_alpha", "0.8", "--model.cutmix_alpha", "1.0", "--data.erase_prob", "0.25",
       "--data.views", "2", "--data.batch_size", "64"]
RECIPES: dict[str, tuple[str, list[str]]] = {
    # The seed tutorial (tintn/vision-transformer-from-scratch): dim 48, depth 4, 4 heads, MLP 4x,
    # AdamW lr 1e-2 with weight decay 1e-2 and no schedule, batch 256, flip + a mild crop (ours: the
    # reflect-padded crop), no policy, no label smoothing, no stochastic depth.
    "tintn": (CPU, ["--model.dim", "48", "--model.depth", "4", "--model.num_heads", "4", "--model.mlp_ratio", "4",
                    "--model.lr", "1e-2", "--model.min_lr", "1e-2", "--model.warmup_epochs", "0",
                    "--model.weight_decay", "1e-2", "--model.label_smoothing", "0", "--model.drop_path", "0",
                    "--model.mixup_alpha", "0", "--model.cutmix_alpha", "0", "--model.tokenizer", "patch",
                    "--data.augment", "none", "--data.erase_prob", "0", "--data.views", "1",
                    "--data.batch_size", "256", "--ema", "0", *ISSUE7]),
    "cpu": (CPU, []),
    "issue7": (CPU, ISSUE7),
    "all": (CPU, ALL),
    "no-conv": (CPU, [*ALL, "--model.tokenizer", "patch"]),
    "no-mix": (CPU, [*ALL, "--model.mixup_alpha", "0", "--model.cutmix_alpha", "0"]),
    "no-erase": (CPU, [*ALL, "--data.erase_prob", "0"]),
    # Same images per step: 128 distinct images once instead of 64 twice.
    "no-repeat": (CPU, [*ALL, "--data.views", "1", "--data.batch_size", "128"]),
    # Every issue-7 switch off: the CPU recipe with the patch projection instead of the conv stem.
    "plain": (CPU, [*ISSUE7, "--model.tokenizer", "patch"]),
    # EMA is off in the recipe; this puts it on (Lightning's EMAWeightAveraging, decay 0.999).
    "ema": (CPU, [*ISSUE7, "--ema", "0.999"]),
    "no-smoothing": (CPU, [*ISSUE7, "--model.label_smoothing", "0"]),
    "gpu": ("configs/cifar10.yaml", []),
}


def train(config: str, args: list[str], workdir: Path) -> tuple[float, float, str]:
    """Run train.py in `workdir`: (launch time, wall seconds, combined output)."""
    command = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / config), *args]
    launched, start = time.time(), time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{config} {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return launched, seconds, result.stdout + result.stderr


def val_curve(workdir: Path, launched: float, tag: str = "val/acc") -> list[tuple[float, int, float]]:
    """(seconds since launch, epoch, `tag`) at every validation of the newest run in `workdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted((workdir / "data/lightning/lightning_logs").glob("version_*"))
    if not logs:
        sys.exit(f"no TensorBoard log under {workdir}")
    events = EventAccumulator(str(logs[-1])).Reload()
    epochs = {e.step: e.value for e in events.Scalars("epoch")} if "epoch" in events.Tags()["scalars"] else {}
    return [(e.wall_time - launched, int(epochs.get(e.step, -1)), e.value) for e in events.Scalars(tag)]


def max_time(seconds: float) -> list[str]:
    """train.py's budget flag for `seconds`: the run fits its schedule into it (src.callbacks.TimeBudget)."""
    seconds = int(seconds)
    return ["--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]


def test_accuracy(output: str) -> float:
    match = re.search(r"test/acc = ([0-9.]+)", output)
    if not match:
        sys.exit(f"no test/acc in the output:\n{output[-3000:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["tintn", "cpu"], help=f"any of {', '.join(RECIPES)}, custom")
    parser.add_argument("--config", help="the config of --runs custom")
    parser.add_argument("--budget", type=int, default=1200, help="seconds per run: train.py's --trainer.max_time")
    parser.add_argument("--data", choices=["folder", "cifar10"], default="folder",
                        help="folder: an image folder (--data-root), normalised with its own statistics; cifar10: the archive")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared/datasets/cifar10-subset"),
                        help="the images (default: ../shared/datasets/cifar10-subset beside the repository)")
    parser.add_argument("--json", help="write the results and curves here")
    parser.add_argument("overrides", nargs="*", help="extra flags for every run, after --, e.g. -- --seed_everything 1")
    args = parser.parse_args()
    if not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root} does not exist: pass the folder that holds the images")

    scratch = Path(tempfile.mkdtemp(prefix="accuracy-bench-"))
    data = (["--data", "ImageFolderDataModule", "--data.root", str(Path(args.data_root).resolve())]
            if args.data == "folder" else ["--data.root", str(Path(args.data_root).resolve())])
    # What a user types, plus a fresh start and no progress bar in the captured output.
    common = [*data, "--fresh", "--trainer.enable_progress_bar", "false"]
    rows, results = [], []
    for name in args.runs:
        if name == "custom":
            if not args.config:
                sys.exit("--runs custom needs --config")
            config, flags = args.config, []
        else:
            config, flags = RECIPES[name]
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
        launched, wall, output = train(config, [*common, *flags, *args.overrides, *max_time(args.budget)], folder)
        accuracy, curve = test_accuracy(output), val_curve(folder, launched)
        best = max(curve, key=lambda point: point[2]) if curve else (0.0, -1, 0.0)
        epochs = max((epoch for _, epoch, _ in curve), default=-1) + 1
        rows.append((name, epochs, wall, best[2], accuracy))
        results.append({"name": name, "config": config, "flags": [*flags, *args.overrides], "budget_s": args.budget,
                        "epochs": epochs, "wall_s": wall,
                        "best_val_acc": best[2], "test_acc": accuracy,
                        "curve": [{"s": round(s, 1), "epoch": e, "val_acc": a} for s, e, a in curve]})
        shown = ", ".join(f"{s:.0f}s {a:.3f}" for s, _, a in curve)
        print(f"{name}: test acc {accuracy:.4f} (best val {best[2]:.4f}) after {epochs} epochs in {wall:.0f} s\n"
              f"  val acc by seconds since launch: {shown}", flush=True)
        if args.json:  # after every run, so a long series interrupted keeps what it finished
            Path(args.json).write_text(json.dumps(results, indent=1))

    print(f"\n| run | epochs | wall s | best val acc | test acc |\n|---|---|---|---|---|")
    for name, epochs, wall, val, accuracy in rows:
        print(f"| {name} | {epochs} | {wall:.0f} | {val:.4f} | {accuracy:.4f} |")
    print(f"\nruns kept in {scratch}")


if __name__ == "__main__":
    main()
