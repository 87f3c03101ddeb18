"""Bad input, one table: each case is one actionable line on stderr and exit status 2, no traceback,
nothing written half-way. The images that merely look unusual (grayscale, RGBA, 16-bit) just work.

The cases run `train.run()` in this process (a fresh LightningCLI each time): the same code path as
`python train.py`, minus ~5 s of interpreter start-up per case.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_script
from conftest import REPO, write_cifar10, write_image_folder
from helpers import RUN_DIR

IMAGES = "images"  # each case's image folder, relative to its working directory
FAST = [
    "--config", str(REPO / "configs" / "cifar10-cpu.yaml"),
    "--data.num_workers", "0", "--data.batch_size", "8",
    "--model.dim", "16", "--model.depth", "1", "--model.num_heads", "2", "--model.stem_width", "0",
    "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]
FOLDER = [*FAST, "--data", "ImageFolderDataModule", "--data.root", IMAGES]
CIFAR = [*FAST, "--data", "CIFAR10DataModule", "--data.root", "cifar", "--data.download", "false"]
FLOWERS = [*FAST, "--data", "Flowers17DataModule", "--data.root", "flowers", "--data.download", "false",
           "--data.image_size", "16", "--data.patch_size", "4"]


def images(cwd: Path) -> None:
    write_image_folder(cwd / IMAGES, classes=3, per_class=10, size=16)


def trained(cwd: Path) -> None:
    """A finished one-epoch run in cwd, so the next command resumes from its last.ckpt."""
    images(cwd)
    assert train_script.run([*FOLDER, "--model.dim", "16"]) == 0


def also(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        for step in steps:
            step(cwd)
    return setup


def write(relative: str, content: bytes) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        path = cwd / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return setup


def truncate(relative: str) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        path = cwd / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return setup


def remove(relative: str) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        path = cwd / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def cifar(cwd: Path) -> None:
    """The synthetic CIFAR-10 files, checked against torchvision's real md5 table (so they fail it)."""
    write_cifar10(cwd / "cifar")


FLOWERS_SOURCE: Path  # a pristine synthetic Flowers-17 folder, written once per session (flowers_source)


def flowers(cwd: Path) -> None:
    shutil.copytree(FLOWERS_SOURCE, cwd / "flowers")


def all_checkpoints(transform: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        for path in (cwd / RUN_DIR).glob("*.ckpt"):
            path.write_bytes(transform(path.read_bytes()))
    return setup


def unusual_images(cwd: Path) -> None:
    """Grayscale, RGBA, palette and 16-bit PNGs, plus a README.txt among them."""
    images(cwd)
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = cwd / IMAGES / f"class_{c}"
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(folder / "gray.png")
        Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
        Image.new("P", (16, 16), 3).save(folder / "palette.png")
        Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(folder / "deep.png")
        (folder / "README.txt").write_text("not an image, and not named like one")


# (id, setup, arguments, regular expression the one error line must match); None = must succeed
CASES = [
    # --- datasets: CIFAR-10 ---
    ("cifar-missing", None, CIFAR, r"CIFAR-10 is not in cifar/ and could not be read"),
    ("cifar-corrupt-archive", write("cifar/cifar-10-python.tar.gz", b"<html>not a tarball</html>"), CIFAR,
     r"CIFAR-10 is not in cifar/.*cifar-10-python\.tar\.gz"),
    ("cifar-wrong-md5", cifar, CIFAR, r"CIFAR-10 is not in cifar/.*(corrupted|md5)"),
    ("cifar-truncated-batch", also(cifar, truncate("cifar/cifar-10-batches-py/data_batch_1")), CIFAR,
     r"CIFAR-10 is not in cifar/"),
    # --- datasets: Flowers-17 ---
    ("flowers-missing", None, FLOWERS, r"flowers"),
    ("flowers-photo-missing", also(flowers, remove("flowers/jpg/image_0042.jpg")), FLOWERS, r"image_0042\.jpg"),
    ("flowers-photo-truncated", also(flowers, truncate("flowers/jpg/image_0007.jpg")), FLOWERS,
     r"image_0007\.jpg"),
    ("flowers-photo-not-a-jpeg", also(flowers, write("flowers/jpg/image_0100.jpg", b"GIF89a junk")), FLOWERS,
     r"image_0100\.jpg"),
    ("flowers-corrupt-splits", also(flowers, write("flowers/datasplits.mat", b"MATLAB 5.0 garbage")), FLOWERS,
     r"datasplits\.mat"),
    # --- datasets: an image folder ---
    ("folder-missing", None, FOLDER, r"image folder images does not exist"),
    ("folder-one-class", lambda cwd: write_image_folder(cwd / IMAGES, classes=1), FOLDER,
     r"images has 1 class folder\(s\); a classifier needs at least 2"),
    ("folder-empty-class", also(images, lambda cwd: (cwd / IMAGES / "class_9").mkdir()), FOLDER,
     r"class_9"),
    ("folder-fake-png", also(images, write(f"{IMAGES}/class_1/fake.png", b"this is text")), FOLDER,
     r"cannot read image images/class_1/fake\.png"),
    ("folder-truncated-png", also(images, truncate(f"{IMAGES}/class_2/003.png")), FOLDER,
     r"images/class_2/003\.png"),
    ("folder-truncated-png-in-a-worker", also(images, truncate(f"{IMAGES}/class_2/003.png")),
     [*FOLDER, "--data.num_workers", "1"], r"^error: cannot read image images/class_2/003\.png"),
    ("folder-unusual-images-work", unusual_images, FOLDER, None),
    # --- settings ---
    ("patch-does-not-divide", images, [*FOLDER, "--data.patch_size", "5"], r"patch_size=5 does not divide"),
    ("dim-not-divisible-by-heads", images, [*FOLDER, "--model.num_heads", "3"],
     r"dim=16 is not divisible by num_heads=3"),
    ("negative-lr", images, [*FOLDER, "--model.lr", "-0.001"], r"lr > 0"),
    ("batch-size-zero", images, [*FOLDER, "--data.batch_size", "0"], r"batch_size must be a positive integer"),
    ("unknown-key", images, [*FOLDER, "--model.dimension", "64"], r"model\.dimension"),
    ("wrong-type", images, [*FOLDER, "--trainer.max_epochs", "ten"], r"max_epochs"),
    ("missing-config-file", images, ["--config", "configs/nope.yaml"], r"nope\.yaml"),
    ("broken-yaml", also(images, write("bad.yaml", b"model:\n  dim: [16\n")), [*FOLDER, "--config", "bad.yaml"],
     r"bad\.yaml: Problems parsing config"),
    ("bad-max-time", images, [*FOLDER, "--trainer.max_time", "ten minutes"], r"max_time"),
    ("label-smoothing-out-of-range", images, [*FOLDER, "--model.label_smoothing", "1.5"],
     r"label_smoothing must be in \[0, 1\)"),
    ("val-fraction-out-of-range", images, [*FOLDER, "--data.val_fraction", "1.5"],
     r"val_fraction must be between 0 and 1"),
    ("contrastive-needs-two-views", images, [*FOLDER, "--model.contrastive_weight", "0.5", "--data.views", "1",
                                             "--model.mixup_alpha", "0", "--model.cutmix_alpha", "0"],
     r"set data\.views: 2"),
    ("unmixed-views-on-the-data", images, [*FOLDER, "--data.keep_unmixed", "true"],
     r"--data\.keep_unmixed is set by --model\.contrastive_weight"),
    ("layer-decay-out-of-range", images, [*FOLDER, "--model.layer_decay", "1.5"], r"layer_decay must be in \(0, 1\]"),
    ("knn-k-zero", images, [*FOLDER, "--model.knn_k", "0"], r"knn_k >= 1"),
    ("ema-decay-out-of-range", images, [*FOLDER, "--ema", "1"], r"--ema is a decay in \[0, 1\)"),
    ("erase-prob-out-of-range", images, [*FOLDER, "--data.erase_prob", "2"], r"erase_prob must be in \[0, 1\]"),
    ("conv-tokenizer-odd-patch", images, [*FOLDER, "--model.tokenizer", "conv", "--data.patch_size", "6",
                                          "--data.image_size", "24"], r"needs a patch_size that is a power of 2"),
    ("negative-mixup", images, [*FOLDER, "--model.mixup_alpha", "-1"], r"mixup_alpha and cutmix_alpha must be 0"),
    ("mixup-on-the-data", images, [*FOLDER, "--data.cutmix_alpha", "1"], r"--data\.cutmix_alpha is set by --model\.cutmix_alpha"),
    ("init-from-missing", images, [*FOLDER, "--model.init_from", "nope.ckpt"], r"init_from: nope\.ckpt does not exist"),
    # --- checkpoints and folders ---
    ("resume-another-model", trained, [*FOLDER, "--model.dim", "32"], r"different model or data: dim=16"),
    ("resume-another-dataset", also(trained, remove(IMAGES), lambda cwd: write_image_folder(
        cwd / IMAGES, classes=4, per_class=10, size=16)), FOLDER, r"different model or data: num_classes=3"),
    ("resume-corrupt-checkpoints", also(trained, all_checkpoints(lambda b: b[: len(b) // 3])), FOLDER,
     r"cannot read data/lightning/images/last\.ckpt .* no other checkpoint .* is readable; pass --fresh"),
    ("resume-pickled-code", also(trained, all_checkpoints(lambda b: pickle.dumps(print))), FOLDER,
     r"cannot read data/lightning/images/last\.ckpt"),
    ("data-is-a-file", also(images, write("data", b"")), FOLDER, r"data"),
    ("checkpoint-dir-unwritable", also(images, write("blocked", b"")),
     [*FOLDER, "--checkpoint.dirpath", "blocked/models"], r"blocked/models"),
]


def snapshot(cwd: Path) -> dict[str, bytes | None]:
    """Every file and folder under cwd, with the files' bytes (folders: None); the inputs aside."""
    inputs = {IMAGES, "cifar", "flowers"}
    return {str(p.relative_to(cwd)): p.read_bytes() if p.is_file() else None for p in cwd.rglob("*")
            if p.relative_to(cwd).parts[0] not in inputs}


@pytest.fixture(autouse=True)
def flowers_source(flowers17_pristine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(globals(), "FLOWERS_SOURCE", flowers17_pristine)


@pytest.mark.parametrize("name, setup, args, expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_clear_line(name, setup, args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = train_script.run(list(args))
    except SystemExit as exit:  # what the command line would see
        code = exit.code
    err = capsys.readouterr().err
    if expected is None:
        assert code == 0, err
        return
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err and "usage:" not in err
    assert len(lines) == 1 and len(lines[0]) < 600, err
    assert __import__("re").search(expected, lines[0]), lines[0]
    # Nothing half-way: no new or changed file or folder (no run folder, no checkpoint, no dataset
    # folder). A decode cache (written whole, atomically) is finished work the next run reuses, so it
    # may appear.
    after = snapshot(tmp_path)
    cache = ("data", "data/cache")
    changed = sorted(k for k, v in after.items() if (k not in before or before[k] != v)
                     and k not in cache and not k.startswith("data/cache/"))
    assert changed == []


def test_the_table_is_long_enough():
    assert sum(case[3] is not None for case in CASES) >= 25
