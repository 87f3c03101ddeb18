"""Shared fixtures: small synthetic datasets written in the real on-disk formats, and paths."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
CIFAR_SUBSET = SHARED_DATASETS / "cifar10-subset" / "train"

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def no_compile_probe_in_process(monkeypatch, request):
    """An in-process run long enough for `--model.compile auto` to probe would compile for a minute: a
    test that gets there says which length it meant (--model.compile false, or a fake probe of its own)."""
    from src import compiling

    def probe(*args, **kwargs):
        raise AssertionError(f"{request.node.name} ran the real compile probe")
    monkeypatch.setattr(compiling, "probe", probe)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10(root: Path, per_batch: int = 20, test_size: int = 40, seed: int = 0) -> dict:
    """Write a tiny CIFAR-10 in torchvision's exact layout; return the md5 table to expect.

    Each image is a flat colour that depends on its class (plus noise), so a model can learn it.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, size=n)
        base = (labels[:, None] * 25).astype(np.int16)  # (n, 1) class colour
        data = np.clip(base + rng.integers(-10, 10, size=(n, 3072)), 0, 255).astype(np.uint8)
        return {"batch_label": "synthetic", "labels": labels.tolist(), "data": data,
                "filenames": [f"img_{i}.png" for i in range(n)]}

    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name in names:
        (folder / name).write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test_size)))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072})
    )
    return {
        "train_list": [[name, _md5(folder / name)] for name in names],
        "test_list": [["test_batch", _md5(folder / "test_batch")]],
        "meta_md5": _md5(folder / "batches.meta"),
    }


@pytest.fixture
def synthetic_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 100-image CIFAR-10 archive folder; torchvision's md5 table is pointed at its files."""
    from torchvision.datasets import CIFAR10

    root = tmp_path / "cifar"
    table = write_cifar10(root)
    monkeypatch.setattr(CIFAR10, "train_list", table["train_list"])
    monkeypatch.setattr(CIFAR10, "test_list", table["test_list"])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": table["meta_md5"]})
    return root


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32,
                       seed: int = 0) -> Path:
    """`root/<class_k>/<i>.png`: each class a distinct noisy colour, learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        colour = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 151 + 30) % 256])
        for i in range(per_class):
            noise = rng.integers(-20, 20, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of twelve 32x32 PNGs, no val/ or test/ folder."""
    return write_image_folder(tmp_path / "images")


FLOWERS17 = SHARED_DATASETS / "17flowers"


def write_flowers17(root: Path, width: int = 24, height: int = 16) -> Path:
    """All 1360 Flowers-17 file names as tiny flat-colour JPEGs whose colour encodes k (red steps of
    8, green steps of 6: wider than JPEG's error), so a test can tell which file an image came from."""
    folder = root / "jpg"
    folder.mkdir(parents=True)
    for k in range(1, 1361):
        colour = ((k % 32) * 8, (k // 32) * 6, 128)
        Image.new("RGB", (width, height), colour).save(folder / f"image_{k:04d}.jpg", quality=95)
    return root


def image_number(image) -> int:
    """Which write_flowers17 file a decoded uint8 (3, H, W) image came from."""
    red, green = (float(image[c].float().mean()) for c in (0, 1))
    return round(green / 6) * 32 + round(red / 8)


@pytest.fixture(scope="session")
def flowers17_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flowers17(tmp_path_factory.mktemp("flowers17"))


@pytest.fixture
def flowers17(tmp_path: Path, flowers17_pristine: Path) -> Path:
    """A private copy of the synthetic Flowers-17 folder, free to damage."""
    import shutil

    return Path(shutil.copytree(flowers17_pristine, tmp_path / "flowers17"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 32x32 PNGs in 3 classes (96 to train on: 12 steps of 8), shared by a test module's process tests."""
    return write_image_folder(tmp_path_factory.mktemp("process") / "images", classes=3, per_class=40)
