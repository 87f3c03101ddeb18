"""Choices that depend on the machine: the training precision and the default recipe.

Each is made once per run, before the Trainer is built, and returned with the reason that
train.py prints in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPU_RECIPE = CONFIGS / "cifar10.yaml"
CPU_RECIPE = CONFIGS / "cifar10-cpu.yaml"


def _cpu_flag(name: str) -> bool:
    """A `torch.cpu._is_*_supported` probe; private, so looked up defensively (False when absent)."""
    probe = getattr(torch.cpu, name, None)
    return bool(probe and probe())


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix hardware, 'AMX' or 'AVX-512 BF16', or None when it has neither.

    Without either, PyTorch multiplies bf16 matrices with scalar code: on a 2-core AVX2 EPYC a
    training step of cifar10-cpu.yaml's network ran 15x slower in bf16 than in float32 (bench/RESULTS.md).
    """
    if _cpu_flag("_is_amx_tile_supported"):
        return "AMX"
    if _cpu_flag("_is_avx512_bf16_supported"):
        return "AVX-512 BF16"
    return None


def _wants_cuda(accelerator: str | Any) -> bool:
    return accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()


def _wants_mps(accelerator: str | Any) -> bool:
    return accelerator in ("auto", "mps") and torch.backends.mps.is_available()


def default_precision(accelerator: str | Any) -> tuple[str, str]:
    """(precision, why) for the device `accelerator` resolves to: the faster one that keeps accuracy.

    CUDA: bf16-mixed, or 16-mixed on GPUs without bf16. CPU: bf16-mixed where the CPU has bf16
    matrix units (AMX: 1.4-2.4x faster than float32; AVX-512 BF16: 1.6-1.9x), else 32-true. Apple
    MPS: 32-true (bf16 was not measured to pay there). Anything else (a plugin accelerator): 32-true.
    """
    if _wants_cuda(accelerator):
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "a CUDA GPU with bf16"
        return "16-mixed", "a CUDA GPU without bf16"
    if _wants_mps(accelerator):
        return "32-true", "Apple MPS, where bf16 was not measured to pay"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator!r}"
    units = cpu_bf16_units()
    if units:
        return "bf16-mixed", f"a CPU with {units} bf16 matrix units"
    return "32-true", "a CPU without AMX or AVX-512 BF16, where bf16 matrix products are many times slower"


def default_recipe(accelerator: str | Any) -> tuple[Path, str]:
    """(config, why) for `python train.py` without --config: the GPU recipe on CUDA, else the CPU one."""
    if _wants_cuda(accelerator):
        return GPU_RECIPE, "a CUDA GPU"
    where = "Apple MPS" if _wants_mps(accelerator) else "no CUDA GPU"
    return CPU_RECIPE, f"{where}; the GPU recipe is configs/{GPU_RECIPE.name}"


def run_device(accelerator: str | Any) -> torch.device:
    """The device a run on `accelerator` trains on (its first one): cuda, mps or cpu."""
    if _wants_cuda(accelerator):
        return torch.device("cuda")
    if _wants_mps(accelerator):
        return torch.device("mps")
    return torch.device("cpu")


def fused_attention(device: torch.device, precision: str | Any) -> bool:
    """Whether attention runs PyTorch's fused kernel on `device` at `precision` (else matmul + softmax).

    Fused everywhere but bf16 on a CPU: there PyTorch's fused kernel is 5-8x slower than two batched
    matmuls and a softmax, which run on the CPU's bf16 matrix units (bench/history/2026-11.md, "Where the speed comes from").
    """
    return not (device.type == "cpu" and "bf16" in str(precision))


def fused_adamw(device: torch.device, precision: str | Any) -> bool:
    """Whether AdamW runs PyTorch's fused kernel, one update for every tensor instead of a dozen small
    operations per tensor: 4.8 -> 1.1 ms a step for cifar10-cpu.yaml's network on a 2-core AVX2 EPYC.

    Wherever PyTorch has the kernel, except under 16-mixed: a fused step unscales the gradients
    itself, so Lightning could not unscale them first for --trainer.gradient_clip_val.
    """
    try:  # private, so looked up defensively
        from torch.optim.optimizer import _get_fused_kernels_supported_devices as devices
        supported = devices()
    except ImportError:
        supported = ["cuda"]
    return device.type in supported and str(precision) not in ("16-mixed", "16")
