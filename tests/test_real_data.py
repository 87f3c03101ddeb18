"""Real CIFAR-10 pixels (../shared/datasets/cifar10-subset): a short run must learn."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import CIFAR_SUBSET, REPO
from helpers import train


@pytest.mark.skipif(not CIFAR_SUBSET.is_dir(), reason=f"real CIFAR-10 subset not found at {CIFAR_SUBSET}")
@pytest.mark.slow
def test_small_config_learns_real_cifar10_subset(tmp_path: Path):
    # 5 epochs of the CPU recipe's model on 4136 training images (~40 s on 2 cores); held-out test
    # split. The regularisers that pay only over long runs (MixUp/CutMix, erasing, repeated
    # augmentation, RandAugment) are off: this checks that training learns, bench/accuracy.py the recipe.
    result = train(
        tmp_path,
        "--config", str(REPO / "configs" / "cifar10-cpu.yaml"),
        "--data", "ImageFolderDataModule",
        "--data.root", str(CIFAR_SUBSET),
        "--data.augment", "none",
        "--data.batch_size", "64",
        "--data.views", "1",
        "--data.erase_prob", "0",
        "--model.mixup_alpha", "0",
        "--model.cutmix_alpha", "0",
        "--trainer.max_epochs", "5",
        "--trainer.enable_progress_bar", "false",
    )
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"test/acc = ([0-9.]+)", result.stderr).group(1))
    assert accuracy > 0.25, f"test accuracy {accuracy:.3f} is not clearly above chance (0.10)"
