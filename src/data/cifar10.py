"""CIFAR-10 through torchvision, with a seeded held-out validation split from the training set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from src.data.base import ImageDataModule, TransformedSubset, kept_only_if_done, stratified_split
from src.images import CIFAR10_MEAN, CIFAR10_STD
from src.errors import DataError


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 45 000 train / 5 000 validation images from the official training set, 10 000 test."""

    def __init__(
        self,
        root: str = "data/cifar",
        val_size: int = 5000,
        download: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.val_size = val_size
        self.download = download
        self.num_classes = 10
        self.class_names = ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]
        self.set_image(32, CIFAR10_MEAN, CIFAR10_STD)
        self.choose_hflip(True, "declared for CIFAR-10: photos of things seen from either side")

    @classmethod
    def extent(cls, settings: dict[str, Any]) -> tuple[int, int]:
        """The official training set less the validation images; 32 px."""
        return 50_000 - settings.get("val_size", 5000), 32

    def _open(self, train: bool, download: bool = False) -> CIFAR10:
        """The torchvision dataset, or one error that says exactly which file to put where."""
        try:
            return CIFAR10(str(self.root), train=train, download=download)
        except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ...
            archive = self.root / CIFAR10.filename
            found = ""
            if archive.exists() and not check_integrity(str(archive), CIFAR10.tgz_md5):
                found = f" The {archive.name} found there is incomplete or corrupt: replace it."
            # torchvision's own advice ("use download=True") names no flag of ours.
            why = f"{type(error).__name__}: {error}" if download else "its files are missing or fail their md5 check"
            raise DataError(
                f"CIFAR-10 is not in {self.root}/ and could not be "
                f"{'downloaded' if download else 'read'} ({why}).{found} "
                f"Put {CIFAR10.filename} (md5 {CIFAR10.tgz_md5}, from {CIFAR10.url}) into "
                f"{self.root}/ and run again."
            ) from error

    def prepare_data(self) -> None:
        # Runs on one process per node before setup: the only place that may download.
        with kept_only_if_done(self.root):
            self._open(train=True, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            full = self._open(train=True)
            train_idx, val_idx = stratified_split(full.targets, [self.val_size], self.seed)
            if self.augment_on == "device":  # the archive is already uint8 (N, 32, 32, 3)
                targets = [full.targets[i] for i in train_idx]
                self.train_set = self.device_train_set(torch.from_numpy(full.data[train_idx]), targets)
            else:
                self.train_set = TransformedSubset(full, train_idx, self.train_transform, self.views)
            self.val_set = TransformedSubset(full, val_idx, self.eval_transform)
        if stage in ("test", "predict", None) and self.test_set is None:
            test = self._open(train=False)
            self.test_set = TransformedSubset(test, range(len(test)), self.eval_transform)
