"""A user's own images: `root/train/<class>/*` with optional `root/val/` and `root/test/`."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from pytorch_lightning.utilities import rank_zero_info
from tqdm import tqdm

from src.data.base import ImageDataModule, TransformedSubset, stratified_split
from src.data.facts import measure_folder
from src.data.transforms import Crop, crop_scale_for
from src.errors import ConfigError, DataError
from src.images import patch_grid


# torchvision's list plus GIF, which PIL reads as well as any of them.
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")


def is_image_file(path: str) -> bool:
    """Whether a file in an image folder is read as an image (by its extension)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def as_rgb(image: Image.Image) -> Image.Image:
    """Any image PIL reads (grayscale, RGBA, palette, CMYK, 16-bit) as RGB."""
    if image.mode.startswith("I"):
        # 16-bit grayscale: keep the top 8 bits rather than let convert() clip it to white.
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
    return image.convert("RGB")


def reduce_on_decode(image: Image.Image, size: int) -> None:
    """Let a JPEG decode at the smallest scale (1/2, 1/4, 1/8: PIL's draft mode) that keeps both sides at
    least twice `size`, so the antialiased resize to `size` still has the pixels it averages; a no-op for
    other formats. A 4 000 px photo for a 64 px network decodes many times faster."""
    image.draft("RGB", (2 * size, 2 * size))


def load_rgb(path: str, size: int | None = None) -> Image.Image:
    """Open any image PIL reads as RGB, for resizing to `size` px if given (`reduce_on_decode`); name the
    file on failure."""
    try:
        with Image.open(path) as image:
            if size:
                reduce_on_decode(image, size)
            return as_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error


def square(size: int) -> v2.Compose:
    """PIL image -> uint8 (3, size, size): the shorter side resized to `size`, then the centre cropped."""
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])


def sample_image(path: str, size: int) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """An image as evaluation sees it, uint8 (3, size, size), with its native (width, height) and whether
    it is grayscale; JPEGs are decoded at reduced size where that is enough (PIL's draft mode)."""
    try:
        with Image.open(path) as image:
            native, gray = image.size, image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            reduce_on_decode(image, size)
            rgb = as_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    return square(size)(rgb), native, gray


def has_image_header(path: str) -> bool:
    """Whether PIL recognises the file as an image (reads the header only)."""
    try:
        with Image.open(path):
            return True
    except (OSError, UnidentifiedImageError, ValueError):
        return False


EVAL_CACHE_BYTES = 512 * 2**20  # evaluation samples (float32) a split's loader keeps in memory, at most
PHOTO = 2  # with "resize" and augment_on: device, photos are kept at this many times the training size


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders, resized to `image_size`, split into train/val/test.

    `root` holds `train/<class>/...` and optionally `val/<class>/...` and `test/<class>/...`; a split
    that is missing is held out of `train` (seeded, stratified, `val_fraction` / `test_fraction`).
    A `root` with no `train/` folder is read as the class folders themselves.

    What is not given is measured on a sample of the training images (src/data/facts.py) and said in
    one line: `mean` / `std` (None: the training images' own statistics), `hflip: auto` (whether a
    pixel classifier trained on the images still recognises their mirror images). `crop` is "pad" (a
    reflect-padded random crop) or "resize" (a random resized crop of `crop_scale` of the image); with
    `augment_on: device` a "resize" run keeps its training images at twice `image_size` and crops
    them on the device.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop: Crop = "pad",
        crop_scale: tuple[float, float] = (0.35, 1.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        self.split_dirs = {
            split: self.root / split for split in ("train", "val", "test") if (self.root / split).is_dir()
        }
        self.split_dirs.setdefault("train", self.root)
        for name, fraction in [("val_fraction", val_fraction), ("test_fraction", test_fraction)]:
            if not 0.0 < fraction < 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {fraction}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.crop = crop
        self.crop_scale = crop_scale_for(crop, crop_scale)
        self.class_names = self._class_names(self.split_dirs["train"])
        self.num_classes = len(self.class_names)
        for split in ("val", "test"):
            if split in self.split_dirs and self._class_names(self.split_dirs[split]) != self.class_names:
                raise DataError(
                    f"{self.split_dirs[split]} must have the same class folders as "
                    f"{self.split_dirs['train']}: {', '.join(self.class_names)}"
                )
        if mean is None or std is None or self.hparams.get("hflip", "auto") == "auto":
            patch_grid(image_size, self.patch_size)  # an impossible setting stops before any decoding
            mean, std = self._measure(image_size, mean, std)
        self.set_image(image_size, mean, std)

    @classmethod
    def run_name(cls, root: str | None = None) -> str:
        """The image folder's own name (its parent's, for a `.../train` root), as a file name."""
        path = Path(os.path.abspath(root or "."))  # as typed: a symlinked folder keeps the name it was given
        name = path.parent.name if path.name == "train" else path.name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "images"

    @classmethod
    def extent(cls, settings: dict[str, Any]) -> tuple[int, int] | None:
        """The training folder's image count less what is held out of it, and the median shorter side of
        up to 25 of its images (headers only); None when the folder cannot be read (__init__ says why)."""
        root = Path(settings["root"])
        train = root / "train" if (root / "train").is_dir() else root
        try:
            files = [path for path, _ in ImageFolder(str(train), is_valid_file=is_image_file).samples]
        except (FileNotFoundError, OSError):
            return None
        held_out = sum(settings.get(f"{split}_fraction", 0.1) for split in ("val", "test")
                       if not (root / split).is_dir())
        sides = []
        for path in files[::max(1, len(files) // 25)]:
            try:
                with Image.open(path) as image:
                    sides.append(min(image.size))
            except (OSError, UnidentifiedImageError, ValueError):
                continue
        if not sides:
            return None
        return round(len(files) * (1 - held_out)), int(np.median(sides))

    def _measure(self, image_size: int, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> tuple[Sequence[float], Sequence[float]]:
        """Measure the training folder (src/data/facts.py): resolve `hflip: auto`, and the normalisation
        statistics not given, which the checkpoints' data settings then keep. One line says what."""
        train = self._scan("train", check_headers=False)
        facts = measure_folder(train.targets, self.num_classes,
                               lambda i: sample_image(train.samples[i][0], image_size), self.seed)
        statistics = "the given mean and std"
        if mean is None or std is None:
            mean, std = mean or facts.mean, std or facts.std
            self.hparams.update(mean=tuple(mean), std=tuple(std))
            statistics = (f"the training images' mean {' '.join(f'{m:.3f}' for m in mean)} and std "
                          f"{' '.join(f'{s:.3f}' for s in std)} (--data.mean / --data.std override)")
        rank_zero_info(f"Data: {facts}; normalised with {statistics}")
        self.choose_hflip(facts.mirror.mirror_safe, str(facts.mirror))
        return mean, std

    @staticmethod
    def _class_names(folder: Path) -> list[str]:
        names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if len(names) < 2:
            raise DataError(
                f"{folder} has {len(names)} class folder(s); a classifier needs at least 2, "
                f"laid out as {folder}/<class>/<image>"
            )
        return names

    def _scan(self, split: str, check_headers: bool = True, size: int | None = None) -> ImageFolder:
        """The split's files, read by `load_rgb` (for resizing to `size` px, if given)."""
        try:
            loader = functools.partial(load_rgb, size=size)
            dataset = ImageFolder(str(self.split_dirs[split]), loader=loader, is_valid_file=is_image_file)
        except FileNotFoundError as error:  # a class folder without a single image file
            raise DataError(f"{self.split_dirs[split]}: {error}") from error
        if not check_headers:
            return dataset
        # Reading each header (not the pixels) finds files that are not images before training starts.
        bad = [path for path, _ in dataset.samples if not has_image_header(path)]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DataError(f"cannot read image {bad[0]}{more}: not an image PIL can open; remove or replace it")
        return dataset

    @property
    def decoded_size(self) -> int:
        """The largest size the run keeps its images at: `image_size`, or for the device's resized crops of
        photos (`crop: resize`) PHOTO times that."""
        return self.image_size * (PHOTO if self.crop == "resize" else 1)

    def _decode(self, dataset: ImageFolder, indices: Sequence[int]) -> torch.Tensor:
        """The images at `indices`, resized and centre-cropped to `image_size` (photos: to twice that,
        for the device's resized crops), as uint8 (N, H, W, 3)."""
        size = self.decoded_size
        resize = square(size)
        images = torch.empty(len(indices), size, size, 3, dtype=torch.uint8)
        for n, i in enumerate(tqdm(indices, desc="Decoding training images", leave=False,
                                   disable=not self.show_progress)):
            images[n] = resize(dataset.loader(dataset.samples[i][0])).permute(1, 2, 0)  # (H, W, 3)
        return images

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self._scan("train", size=self.decoded_size)
        held_out = {
            split: max(1, round(fraction * len(train)))
            for split, fraction in [("val", self.val_fraction), ("test", self.test_fraction)]
            if split not in self.split_dirs
        }
        rest, *parts = stratified_split(train.targets, list(held_out.values()), self.seed)
        sets = {split: (train, indices) for split, indices in zip(held_out, parts)}
        for split in ("val", "test"):
            if split not in sets:
                dataset = self._scan(split, size=self.decoded_size)
                sets[split] = (dataset, range(len(dataset)))
        if self.augment_on == "device":
            self.train_set = self.device_train_set(self._decode(train, rest), [train.targets[i] for i in rest])
        else:
            self.train_set = TransformedSubset(train, rest, self.train_transform, self.views)
        # Evaluation images are decoded (and resized) once when they fit EVAL_CACHE_BYTES: decoding 136
        # photos of 500 px again at every validation was a fifth of a Flowers-17 folder's epoch.
        self.val_set, self.test_set = (
            TransformedSubset(dataset, indices, self.eval_transform,
                              cache=len(indices) * 4 * 3 * self.image_size ** 2 <= EVAL_CACHE_BYTES)
            for dataset, indices in (sets["val"], sets["test"]))
