"""DataModules and transforms; importing this package registers the DataModules with the CLI."""

from src.data.base import ImageDataModule
from src.data.cifar10 import CIFAR10DataModule
from src.data.flowers17 import Flowers17, Flowers17DataModule
from src.data.folder import ImageFolderDataModule
from src.data.transforms import PatchifyTransform

__all__ = [
    "ImageDataModule", "CIFAR10DataModule", "Flowers17", "Flowers17DataModule", "ImageFolderDataModule",
    "PatchifyTransform",
]
