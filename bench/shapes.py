"""The equal-compute table behind `shape: auto` (src/shapes.py): each shape of the family at each budget,
judged on validation (test reported), on one image folder.

    python bench/shapes.py --data-root ../shared/datasets/cifar10-subset --shapes s32 m32 --budgets 180 600 1200
    python bench/shapes.py --data-root FLOWERS --budgets 180 600 1200 --equivalent --parallel 2

Timed (the default): every run is the product's own command, `python train.py --data ImageFolderDataModule
--data.root DIR --shape NAME --trainer.max_time T`, one after another on the whole machine.

`--equivalent`: only the shortest budget runs timed. Its validation times give each shape's seconds per
epoch on this machine, and every longer budget T runs as the epochs T would give that shape there
(`--trainer.max_epochs`, with the warm-up the budget allows: at most a tenth of it), pinned to one core
with one thread, `--parallel` runs side by side. A run by epochs learns the same whatever the machine's
speed or load, so the long columns can be measured beside other work; it is what the timed run does on a
machine of steady speed.

Prints the table (best validation accuracy, test accuracy, epochs) and the shape `shape: auto` picks for
each budget from this machine's step times; `--json FILE` keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import REPO, max_time, test_accuracy, val_curve  # noqa: E402

sys.path.insert(0, str(REPO))
from src import shapes  # noqa: E402

CONFIG = REPO / "configs/cifar10-cpu.yaml"  # what `python train.py` runs without a GPU


def run(root: Path, shape: str, flags: list[str], folder: Path, core: int | None = None) -> dict:
    """One train.py run in `folder`: its epochs, best validation accuracy, test accuracy and curve."""
    command = [sys.executable, str(REPO / "train.py"), "--config", str(CONFIG), "--data", "ImageFolderDataModule",
               "--data.root", str(root), "--shape", shape, "--fresh", "--trainer.enable_progress_bar", "false", *flags]
    env = dict(os.environ)
    if core is not None:
        command = ["taskset", "-c", str(core), *command, "--data.num_workers", "0"]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    launched, start = time.time(), time.perf_counter()
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    curve = val_curve(folder, launched)
    best = max((acc for _, _, acc in curve), default=0.0)
    return {"shape": shape, "flags": flags, "wall_s": time.perf_counter() - start,
            "epochs": max((epoch for _, epoch, _ in curve), default=-1) + 1, "best_val_acc": best,
            "test_acc": test_accuracy(result.stdout + result.stderr),
            "curve": [{"s": round(s, 1), "epoch": e, "val_acc": a} for s, e, a in curve]}


def epoch_seconds(timed: dict) -> float:
    """Seconds per epoch (training and its validation) over a timed run's validations."""
    (s0, e0), (s1, e1) = [(p["s"], p["epoch"]) for p in (timed["curve"][0], timed["curve"][-1])]
    return (s1 - s0) / max(1, e1 - e0)


def equivalent_flags(timed: dict, budget: float, shortest: float) -> list[str]:
    """The epochs (and the warm-up) `budget` seconds would give the shape of `timed`, a run of `shortest`."""
    epochs = max(1, round(timed["epochs"] + (budget - shortest) / epoch_seconds(timed)))
    return ["--trainer.max_epochs", str(epochs), "--model.warmup_epochs", f"{min(5.0, epochs / 10):g}"]


def flowers_folder(jpg: Path, root: Path) -> None:
    """The 1 360 Flowers-17 photos as an image folder: `root/train/<class>/image_NNNN.jpg`, linked."""
    from src.data.flowers17 import CLASSES, label_of

    for k in range(1, 1361):
        target = root / "train" / CLASSES[label_of(k)] / f"image_{k:04d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(jpg / f"image_{k:04d}.jpg")


def choices(root: Path, budgets: list[int]) -> None:
    """What `shape: auto` picks for `budgets` on the image folder `root` with the plain command, here."""
    from src.cli import ViTCLI, data_class

    cli = ViTCLI(args=["--data", "ImageFolderDataModule", "--data.root", str(root), "--trainer.logger", "false"])
    images, native = data_class(cli.config.data).extent(dict(cli.config.data.init_args))
    step = cli.step_times(native)
    print(f"{images} training images, {native} px; step seconds at batch {cli.batch_size} in "
          f"{cli.config.trainer.precision}: " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in step.items()))
    for budget in budgets:
        choice = shapes.choose(budget, images, native, lambda shape: step[shape.name], cli.batch_size)
        print(f"{budget / 60:g} min: {choice}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="an image folder (class folders, or train/ val/ test/)")
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in shapes.FAMILY], choices=list(shapes.BY_NAME))
    parser.add_argument("--budgets", nargs="+", type=int, default=[180, 600, 1200], help="seconds of training")
    parser.add_argument("--equivalent", action="store_true", help="longer budgets as the epochs they give (above)")
    parser.add_argument("--parallel", type=int, default=2, help="--equivalent runs side by side, one core each")
    parser.add_argument("--cores", type=int, nargs="+", help="the cores they run on (default: the first --parallel)")
    parser.add_argument("--timed", help="a --json file of an earlier run whose timed runs of the shortest "
                        "budget are reused instead of run again")
    parser.add_argument("--flowers-folder", metavar="JPG_DIR", help="first link the Flowers-17 photos of JPG_DIR "
                        "(image_0001.jpg ...) into --data-root as train/<class>/ folders")
    parser.add_argument("--choose", action="store_true", help="train nothing: print what `shape: auto` picks "
                        "for each budget on this machine and data, from step times measured now")
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("overrides", nargs="*", help="extra train.py flags for every run, after --")
    args = parser.parse_args()
    root = Path(args.data_root).resolve()
    if args.flowers_folder:
        flowers_folder(Path(args.flowers_folder).resolve(), root)
    if not root.is_dir():
        parser.error(f"--data-root {root} does not exist")
    if args.choose:
        return choices(root, sorted(args.budgets))
    scratch = Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    budgets = sorted(args.budgets)
    results: list[dict] = []

    def record(result: dict, budget: int, how: str) -> None:
        results.append({**result, "budget_s": budget, "how": how})
        print(f"{result['shape']} {budget} s ({how}): best val {result['best_val_acc']:.4f}, test "
              f"{result['test_acc']:.4f}, {result['epochs']} epochs", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    timed_budgets = budgets[:1] if args.equivalent else budgets
    timed: dict[str, dict] = {}
    for earlier in json.loads(Path(args.timed).read_text()) if args.timed else []:
        if earlier["how"] == "timed" and earlier["budget_s"] == budgets[0] and earlier["shape"] in args.shapes:
            timed[earlier["shape"]] = earlier
            record(earlier, budgets[0], "timed")
    for budget in timed_budgets:
        for shape in args.shapes:
            if budget == budgets[0] and shape in timed:
                continue
            folder = Path(tempfile.mkdtemp(prefix=f"{shape}-{budget}-", dir=scratch))
            result = run(root, shape, [*args.overrides, *max_time(budget)], folder)
            timed.setdefault(shape, result)
            record(result, budget, "timed")
    if args.equivalent:
        jobs = [(shape, budget) for budget in budgets[1:] for shape in args.shapes]
        free = args.cores or sorted(os.sched_getaffinity(0))[:args.parallel]
        with ThreadPoolExecutor(len(free)) as pool:
            def one(job: tuple[str, int]) -> None:
                shape, budget = job
                core = free.pop()
                try:
                    folder = Path(tempfile.mkdtemp(prefix=f"{shape}-{budget}-", dir=scratch))
                    flags = [*args.overrides, *equivalent_flags(timed[shape], budget, budgets[0])]
                    record(run(root, shape, flags, folder, core), budget, "epochs")
                finally:
                    free.append(core)
            list(pool.map(one, jobs))

    print("\n| shape | " + " | ".join(f"{b / 60:g} min" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for shape in args.shapes:
        cells = []
        for budget in budgets:
            r = next((r for r in results if r["shape"] == shape and r["budget_s"] == budget), None)
            cells.append(f"{100 * r['best_val_acc']:.1f} ({100 * r['test_acc']:.1f}), {r['epochs']} ep" if r else "")
        print(f"| {shape} | " + " | ".join(cells) + " |")
    print("\ncells: best validation accuracy (test accuracy), epochs")
    print(f"runs kept in {scratch}")


if __name__ == "__main__":
    main()
