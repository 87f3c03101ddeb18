"""Oxford Flowers-17 (Nilsback and Zisserman, VGG): 1360 photos of 17 flowers, 80 per class.

The archive unpacks to `jpg/image_0001.jpg` ... `jpg/image_1360.jpg` in class order, so the label of
image k is `(k - 1) // 80`, read from the file's number, never from a running counter. The official
splits are in `datasplits.mat`; without it a seeded, stratified 40/20/20-per-class split is used.

Decoding 500 px JPEGs costs more than training a small ViT on them, so every image is decoded once,
centre-cropped to a square and downscaled to `cache_size`, and the uint8 result is cached on disk.
Epochs then augment small in-memory tensors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, download_url
from tqdm.auto import tqdm

from src.data.base import ImageDataModule, TransformedSubset, kept_only_if_done, stratified_split
from src.data.transforms import Crop, crop_scale_for
from src.images import IMAGENET_MEAN, IMAGENET_STD
from src.errors import ConfigError, DataError

URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/17/"
ARCHIVE, ARCHIVE_MD5 = "17flowers.tgz", "b59a65d8d1a99cd66944d474e1289eab"
SPLITS, SPLITS_MD5 = "datasplits.mat", "4828cddfd0d803c5abbdebcb1e148a1e"
CLASSES = ["Daffodil", "Snowdrop", "LilyValley", "Bluebell", "Crocus", "Iris", "Tigerlily", "Tulip",
           "Fritillary", "Sunflower", "Daisy", "ColtsFoot", "Dandelion", "Cowslip", "Buttercup",
           "Windflower", "Pansy"]
PER_CLASS = 80
NUM_IMAGES = PER_CLASS * len(CLASSES)  # 1360
SPLIT_SIZES = {"train": 40 * len(CLASSES), "val": 20 * len(CLASSES), "test": 20 * len(CLASSES)}

Targets = Literal["class", "instance"]
# What the model trains on: the training split, or training + validation (the paper's "2040 images" are
# Flowers-102's train + val), once the settings have been chosen on validation.
TrainOn = Literal["train", "train+val"]


def image_file(root: Path, k: int) -> Path:
    """The file of image k (1-based), as the archive names it."""
    return root / "jpg" / f"image_{k:04d}.jpg"


def label_of(k: int) -> int:
    """Class of image k (1-based): the archive lists 80 images per class, in class order."""
    return (k - 1) // PER_CLASS


def download(root: Path) -> None:
    """Fetch and check 17flowers.tgz (extracting jpg/) and datasplits.mat into `root`, or explain."""
    if not image_file(root, NUM_IMAGES).is_file():
        try:
            download_and_extract_archive(URL + ARCHIVE, str(root), md5=ARCHIVE_MD5)
        except Exception as error:  # URLError, OSError, RuntimeError (md5), tarfile errors, ...
            archive = root / ARCHIVE
            found = ""
            if archive.exists() and not check_integrity(str(archive), ARCHIVE_MD5):
                found = f" The {ARCHIVE} found there is incomplete or corrupt: replace it."
            raise DataError(
                f"Flowers-17 is not in {root}/ and could not be downloaded ({type(error).__name__}: "
                f"{error}).{found} Put {ARCHIVE} (md5 {ARCHIVE_MD5}, from {URL + ARCHIVE}) into {root}/, "
                f"or point --data.root at a folder holding jpg/image_0001.jpg ... image_{NUM_IMAGES}.jpg."
            ) from error
    if not (root / SPLITS).is_file():
        try:
            download_url(URL + SPLITS, str(root), md5=SPLITS_MD5)
        except Exception as error:
            rank_zero_info(f"Flowers-17: could not download {SPLITS} ({type(error).__name__}); the seeded split "
                           "is used instead")


def check_files(root: Path) -> list[Path]:
    """The 1360 image files in order; one error listing what is missing."""
    files = [image_file(root, k) for k in range(1, NUM_IMAGES + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if len(missing) == NUM_IMAGES:
        raise DataError(
            f"no Flowers-17 images in {root}/jpg/: expected image_0001.jpg ... image_{NUM_IMAGES}.jpg. "
            f"Extract {ARCHIVE} (md5 {ARCHIVE_MD5}, from {URL + ARCHIVE}) into {root}/, or use "
            "--data.download true"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"Flowers-17 in {root}/jpg/ is incomplete: {len(missing)} of {NUM_IMAGES} images missing "
            f"({shown}); extract {ARCHIVE} again"
        )
    return files


def decode(path: Path, size: int) -> Tensor:
    """One photo as uint8 (3, size, size): centre square, downscaled; the file is named on failure."""
    try:
        with Image.open(path) as image:
            # JPEG decodes straight at 1/2, 1/4 or 1/8 scale when that still covers `size`: far cheaper.
            image.draft("RGB", (size, size))
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {error}; replace it from {ARCHIVE}") from error
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, size, size)


def fingerprint(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """Name, byte size and mtime of each file: a changed or replaced image invalidates the cache."""
    return [(f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files]


def cache_file(cache_dir: Path, root: Path, size: int) -> Path:
    """Where the decoded images of `root` at `size` px are kept (one file per folder and size)."""
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return cache_dir / f"flowers17-{size}px-{key}.pt"


def decoded_images(files: Sequence[Path], size: int, cache: Path, progress: bool = True) -> Tensor:
    """All images as one uint8 tensor (N, 3, size, size), from the cache when it is current."""
    stamp = fingerprint(files)
    if cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if [tuple(s) for s in saved["files"]] == stamp and saved["images"].shape[-1] == size:
                return saved["images"]
        except Exception:  # an interrupted or foreign file: rebuild it
            pass
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    bar = tqdm(files, desc=f"Decoding Flowers-17 once at {size}px", unit="img", leave=False, disable=not progress)
    for i, path in enumerate(bar):
        images[i] = decode(path, size)
    partial = cache.with_suffix(f".tmp{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"files": stamp, "images": images}, partial)
        os.replace(partial, cache)  # readers see the old file or the whole new one
        rank_zero_info(f"Flowers-17: decoded images cached in {cache}")
    except OSError as error:
        partial.unlink(missing_ok=True)
        rank_zero_warn(f"could not write the Flowers-17 cache {cache} ({error}); decoding again next run")
    return images


def official_split(path: Path, split: int) -> dict[str, list[int]]:
    """0-based image indices of trn/val/tst `split` from datasplits.mat, checked for sanity."""
    from scipy.io import loadmat  # only needed when the official split file is there

    try:
        mat = loadmat(str(path))
        parts = {name: sorted(int(k) - 1 for k in np.asarray(mat[f"{key}{split}"]).ravel())
                 for name, key in [("train", "trn"), ("val", "val"), ("test", "tst")]}
    except Exception as error:
        raise DataError(f"cannot read split {split} from {path} ({type(error).__name__}: {error}); "
                        f"replace it (md5 {SPLITS_MD5}, from {URL + SPLITS}) or delete it to use a seeded split") from error
    every = [i for part in parts.values() for i in part]
    if len(set(every)) != len(every) or min(every) < 0 or max(every) >= NUM_IMAGES:
        raise DataError(f"{path}: split {split} has repeated or out-of-range image numbers; replace the file")
    return parts


class Flowers17(Dataset):
    """The 1360 Flowers-17 images, decoded once: (uint8 image (3, S, S), label)."""

    def __init__(
        self, root: str | Path, size: int, cache_dir: str | Path = "data/cache", progress: bool = True
    ) -> None:
        self.root = Path(root)
        self.files = check_files(self.root)
        self.targets = [label_of(k) for k in range(1, NUM_IMAGES + 1)]
        self.images = decoded_images(self.files, size, cache_file(Path(cache_dir), self.root, size), progress)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, int]:
        return tv_tensors.Image(self.images[i]), self.targets[i]


class Flowers17DataModule(ImageDataModule):
    """Flowers-17 with the official split `split` (1..3) from datasplits.mat, else a seeded one.

    `targets: instance` turns it into the instance-discrimination pre-training task: every training
    image is its own class (680 of them, its position in the sorted training split), and there is no
    test. Validation watches what the backbone has learnt without training on a label: a k-NN
    classifier on its features, fitted on the class-labelled training images, scores the validation
    images (`evaluation` "knn"); the class labels train nothing until fine-tuning.

    `crop` is "resize" (random resized crops of `crop_scale` of a square cached at twice the training
    size) or "pad" (reflect-padded random crops of the photos cached at the training size, as the CPU
    recipe trains small images).

    `train_on: train+val` trains on the 1 020 images of both splits. Validation still runs on the val
    images, but they are no longer held out: it then measures fit, `validation_held_out` is False and
    train.py tests the last weights instead of a checkpoint chosen on it.
    """

    def __init__(
        self,
        root: str = "data/flowers17",
        download: bool = True,
        split: int = 1,
        image_size: int = 64,
        cache_size: int | None = None,
        cache_dir: str = "data/cache",
        crop: Crop = "resize",
        crop_scale: tuple[float, float] = (0.35, 1.0),
        targets: Targets = "class",
        train_on: TrainOn = "train",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        patch_size: int = 8,  # the shared options whose default differs for 64 px photos
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(patch_size=patch_size, batch_size=batch_size, **kwargs)
        if split not in (1, 2, 3):
            raise ConfigError(f"split must be 1, 2 or 3 (the three official splits), got {split}")
        if targets not in ("class", "instance"):
            raise ConfigError(f"targets must be 'class' or 'instance', got {targets!r}")
        if train_on not in ("train", "train+val"):
            raise ConfigError(f"train_on must be 'train' or 'train+val', got {train_on!r}")
        self._downloaded = False
        self.set_image(image_size, mean, std)
        self.choose_hflip(True, "declared for Flowers-17: photos of flowers seen from either side")
        self.crop_scale = crop_scale_for(crop, crop_scale)
        # Random resized crops: twice the training size by default, so the crops of the cached square keep
        # their detail. Padded crops cut the training size itself.
        self.cache_size = (2 if crop == "resize" else 1) * image_size if cache_size is None else cache_size
        if self.cache_size < image_size:
            raise ConfigError(f"cache_size={self.cache_size} is smaller than image_size={image_size}")
        if crop == "pad" and self.cache_size != image_size:
            raise ConfigError(f"crop pad cuts the {image_size} px training images themselves: leave cache_size "
                              f"unset (it was {self.cache_size})")
        self.root = Path(root)
        self.download = download
        self.split = split
        self.cache_dir = Path(cache_dir)
        self.targets = targets
        self.train_on = train_on
        training = SPLIT_SIZES["train"] + (SPLIT_SIZES["val"] if train_on == "train+val" else 0)
        if targets == "class":
            self.num_classes, self.class_names = len(CLASSES), list(CLASSES)
        else:  # one class per training image; both the official and the seeded split have 680 (+ 340)
            self.num_classes, self.class_names = training, None
            self.evaluation = "knn"
        self.split_used: str | None = None
        _ = self.train_transform  # built once now, so a bad crop_scale or augment fails at start-up

    @classmethod
    def extent(cls, settings: dict[str, Any]) -> tuple[int, int]:
        """680 training images (1 020 with train+val); the photos are 500 px on their shorter side."""
        return SPLIT_SIZES["train"] + (SPLIT_SIZES["val"] if settings.get("train_on") == "train+val" else 0), 500

    @property
    def testable(self) -> bool:
        """Instance pre-training has no class-labelled test; fine-tuning tests."""
        return self.targets == "class"

    @property
    def validation_held_out(self) -> bool:
        return self.train_on == "train"

    def prepare_data(self) -> None:
        # One process per node: download, then decode into the on-disk cache that setup() reads.
        if self.download and not self._downloaded:  # fit and test each prepare: fetch once
            with kept_only_if_done(self.root):
                download(self.root)
            self._downloaded = True
        Flowers17(self.root, self.cache_size, self.cache_dir, self.show_progress)

    def splits(self, dataset: Flowers17) -> dict[str, list[int]]:
        """Image indices per split, official when datasplits.mat is there; says which it used."""
        mat = self.root / SPLITS
        if mat.is_file():
            parts = official_split(mat, self.split)
            self.split_used = f"official split {self.split} from {mat}"
        else:
            rest, val, test = stratified_split(
                dataset.targets, [SPLIT_SIZES["val"], SPLIT_SIZES["test"]], seed=self.seed + self.split
            )
            parts = {"train": rest, "val": val, "test": test}
            self.split_used = (f"seeded stratified 40/20/20-per-class split (seed {self.seed + self.split}; "
                               f"no {SPLITS} in {self.root})")
        sizes = {name: len(indices) for name, indices in parts.items()}
        if sizes["train"] != SPLIT_SIZES["train"]:
            raise DataError(f"{mat}: split {self.split} has {sizes['train']} training images, "
                            f"expected {SPLIT_SIZES['train']}")
        rank_zero_info(f"Flowers-17: {self.split_used}: {sizes['train']} train / {sizes['val']} val / "
                       f"{sizes['test']} test images")
        return parts

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        dataset = Flowers17(self.root, self.cache_size, self.cache_dir, self.show_progress)
        parts = self.splits(dataset)
        training = parts["train"]
        if self.train_on == "train+val":
            training = sorted(training + parts["val"])
            rank_zero_info(f"Flowers-17: training on train + val ({len(training)} images); the validation "
                           "metrics score images the model trains on")
        instance = self.targets == "instance"
        if self.augment_on == "device":  # the decoded cache, (N, 3, S, S) uint8, held as (N, S, S, 3)
            labels = range(len(training)) if instance else [dataset.targets[i] for i in training]
            self.train_set = self.device_train_set(dataset.images[training].permute(0, 2, 3, 1), labels)
        else:
            self.train_set = TransformedSubset(dataset, training, self.train_transform, self.views, instance)
        self.val_set = TransformedSubset(dataset, parts["val"], self.eval_transform)
        if instance:  # k-NN references: the training split with its class labels (also under train+val)
            self.knn_reference = TransformedSubset(dataset, parts["train"], self.eval_transform)
        else:
            self.test_set = TransformedSubset(dataset, parts["test"], self.eval_transform)
