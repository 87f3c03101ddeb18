"""What exact resume costs: the bytes it adds to a training checkpoint and the time it adds to a save.

    python bench/resume_cost.py [--config configs/cifar10-cpu.yaml] [--augment-on device|loader] [--workers 2]

Trains the recipe through the real CLI on an image folder (by default the CIFAR-10 subset in
../shared/datasets) for a few steps; then, in the middle of an epoch, times `trainer.save_checkpoint`
(what the step checkpoint and every epoch's last.ckpt do: the whole state, written atomically and
fsynced) against the parts exact resume adds to it: every process's random state
(src.callbacks.ExactResume) and the training loader's position (torchdata's StatefulDataLoader,
stored by Lightning). Prints the sizes and the medians.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src import runs  # noqa: E402
from src.callbacks import ExactResume  # noqa: E402
from src.cli import ViTCLI  # noqa: E402


def size(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def median_ms(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class Measure(Callback):
    def __init__(self, folder: Path, at_step: int, repeats: int) -> None:
        self.folder, self.at_step, self.repeats = folder, at_step, repeats

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step != self.at_step:
            return
        exact = next(c for c in trainer.callbacks if isinstance(c, ExactResume))
        loader = trainer.fit_loop._combined_loader  # what Lightning stores in fit_loop's state
        path = self.folder / "probe.ckpt"
        save = median_ms(lambda: trainer.save_checkpoint(path), self.repeats)
        random_state = median_ms(exact.state_dict, self.repeats * 10)
        position = median_ms(loader._state_dicts, self.repeats * 10)
        checkpoint = torch.load(path, weights_only=True)
        print(f"checkpoint file: {path.stat().st_size / 1e6:.2f} MB, save (atomic, fsynced): {save:.1f} ms median "
              f"of {self.repeats}")
        print(f"  random state of the process: {size(checkpoint['callbacks']['ExactResume']) / 1e3:.1f} kB, "
              f"{random_state * 1000:.0f} us to capture")
        loader_state = size(checkpoint["loops"]["fit_loop"]["state_dict"])  # {"combined_loader": [...]}
        print(f"  training loader's position: {loader_state / 1e3:.1f} kB, "
              f"{position * 1000:.0f} us to capture")
        print(f"  share of the save: {100 * (random_state + position) / save:.1f} %")
        trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10-cpu.yaml")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets" / "cifar10-subset" / "train"))
    parser.add_argument("--augment-on", default="device", choices=["device", "loader"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not Path(args.data_root).is_dir():
        sys.exit(f"error: {args.data_root} not found; pass --data-root FOLDER (one sub-folder of images per class)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cli = ViTCLI(args=["--config", str(REPO / args.config), "--data", "ImageFolderDataModule",
                           "--data.root", args.data_root, "--data.augment_on", args.augment_on,
                           "--data.num_workers", str(args.workers), "--trainer.max_epochs", "1",
                           "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                           "--trainer.default_root_dir", tmp, "--checkpoint.dirpath", f"{tmp}/models",
                           "--trainer.logger.init_args.save_dir", tmp])
        cli.build()
        runs.validation_may_choose(cli.trainer, cli.datamodule)  # as train.py: no validation, no early stopping
        print(f"{args.config}, augment_on {args.augment_on}"
              + (f", {args.workers} loader workers" if args.augment_on == "loader" else ""))
        cli.trainer.callbacks.append(Measure(folder, at_step=5, repeats=args.repeats))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


if __name__ == "__main__":
    main()
