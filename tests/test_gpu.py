"""The GPU tier: the CUDA paths the default recipe takes. Each test skips, saying why, without CUDA.

Run them alone with `python -m pytest -m gpu`; bench/gpu_check.sh runs them and records the result.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_image_folder
from helpers import train_losses
from src.data.device import BatchAugment, DeviceImages
from src.hardware import default_precision
from src.models.classifier import ViTClassifier, compile_features, compile_unavailable

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found by torch.cuda)"),
]

CUDA = torch.device("cuda")
# configs/cifar10.yaml's network (the default recipe on a GPU).
GPU_RECIPE = dict(num_classes=10, image_size=32, patch_size=4, dim=256, depth=8, num_heads=8, mlp_ratio=2.0,
                  tokenizer="conv", drop_path=0.0)


def test_cuda_picks_bf16_and_follows_the_float32_loss_curve():
    assert default_precision("auto")[0] == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed")
    torch.manual_seed(0)
    model = ViTClassifier(**GPU_RECIPE).model.to(CUDA)
    fp32 = train_losses(copy.deepcopy(model), 8, "32-true", device="cuda")
    bf16 = train_losses(copy.deepcopy(model), 8, "bf16-mixed", device="cuda")
    assert fp32[-1] < fp32[0] - 0.3  # learning, so the curves have a shape to match
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.03 * a, (fp32, bf16)


def test_compile_on_cuda_gives_the_eager_results():
    reason = compile_unavailable(CUDA)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    eager = ViTClassifier(**GPU_RECIPE).model.to(CUDA).eval()
    compiled = copy.deepcopy(eager)
    compile_features(compiled)
    x = torch.randn(16, 64, 48, device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.allclose(compiled(x).float(), eager(x).float(), atol=5e-2, rtol=5e-2)


def test_device_augmentation_runs_on_cuda_like_on_the_cpu():
    images = torch.randint(0, 256, (512, 32, 32, 3), dtype=torch.uint8)
    data = DeviceImages(images, [0] * 512)
    augment = BatchAugment(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "randaugment", padding=4)
    indices = torch.arange(512, device=CUDA)
    patches = augment(data.take(indices))
    assert patches.device.type == "cuda" and patches.shape == (512, 64, 48) and torch.isfinite(patches).all()
    assert data.take(indices).device.type == "cuda"  # the split moved to the GPU once and stays there
    on_cpu = augment(data.take(torch.arange(512)))
    # Same images, same policy: the batch statistics agree (the random draws differ by device).
    assert abs(patches.mean().item() - on_cpu.mean().item()) < 0.05
    assert abs(patches.std().item() - on_cpu.std().item()) < 0.05


def test_train_py_on_cuda_with_the_default_recipe(tmp_path: Path):
    folder = write_image_folder(tmp_path / "images", classes=3, per_class=40)
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--data", "ImageFolderDataModule", "--data.root", str(folder),
         "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Recipe: configs/cifar10.yaml (a CUDA GPU)" in result.stderr
    assert "Precision: bf16-mixed" in result.stderr or "Precision: 16-mixed" in result.stderr
    assert "test/acc =" in result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_ddp(tmp_path: Path):
    folder = write_image_folder(tmp_path / "images", classes=3, per_class=40)
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/cifar10-cpu.yaml"),
         "--data", "ImageFolderDataModule", "--data.root", str(folder), "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "data/lightning/models/last.ckpt", weights_only=True)
    # 96 training images, batch 128 per GPU: one step per epoch, with both GPUs' halves in it.
    assert state["global_step"] == 2 and state["epoch"] == 1
