"""Training throughput against timm's VisionTransformer at the same architecture, and end to end.

    python bench/throughput.py --model S                 # dim 48, depth 4, 4 heads, MLP 192
    python bench/throughput.py --model M                 # dim 384, depth 7, 12 heads, MLP 384
    python bench/throughput.py --model config --config configs/cifar10-cpu.yaml
    python bench/throughput.py --model M --precision 32-true --compile
    python bench/throughput.py --model config --no-reference --profile   # where the step's time goes
    python bench/throughput.py --end-to-end --config configs/cifar10-cpu.yaml --augment-on device
    python bench/throughput.py --end-to-end --images 50000 --epochs 2 -- --model.dim 384 ...   # model M

Model mode: a step is forward + cross entropy + backward + AdamW on random images. This project's
model (with the precision train.py picks for the device, or --precision, and optionally
--compile) and timm's `VisionTransformer` as a user runs it by default (float32, eager, AdamW) are
built side by side in one process and timed in alternating windows after warm-up; medians, the
spread and the ratio are printed, with FLOPs, achieved TFLOP/s, the share of the peak (a GPU's bf16 data sheet, else a measured matmul ceiling in the precision run) and
memory. The machines are shared and noisy: read the ratio, not the absolute figures.

End-to-end mode: the real DataModule (an image folder, by default the CIFAR-10 subset in
../shared/datasets) and the real LightningModule in a Lightning Trainer, several training epochs
(no validation, no checkpoints). Between epochs a model-only window of the same model, precision
and compile setting runs on random data, so the two alternate; the ratio epoch time / model-only
time for the same images is the data pipeline's overhead. Also: augmentation alone, the share of
each step the device waits (GPU: CUDA events; CPU: the host between steps), memory after every
epoch (a leak shows as growth after the first).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.cli import ViTCLI  # noqa: E402
from src.data.device import DeviceImages  # noqa: E402
from src.hardware import default_precision  # noqa: E402
from src.hardware import fused_adamw, fused_attention  # noqa: E402
from src.images import patchify  # noqa: E402
from src.models.classifier import compile_features, compile_unavailable, param_groups  # noqa: E402
from src.models.vit import ViT  # noqa: E402

# The reference models: (dim, depth, heads, MLP width), 32 px images, patch 4, 10 classes.
MODELS = {"S": (48, 4, 4, 192), "M": (384, 7, 12, 384)}
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s); other devices are measured.
GPU_BF16_PEAK = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                 "H200": 989.0, "A100": 312.0, "L4": 121.0}


def autocast(device: torch.device, precision: str):
    """The autocast context Lightning uses for `precision`."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "32-true":
        raise SystemExit(f"precision {precision}: benchmark bf16-mixed or 32-true")
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_mib(device: torch.device) -> float:
    """Memory in use now: allocated on the GPU, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured ceiling: the best of a few large square matmuls in `dtype` on `device`."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = 0.0
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def matmul_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """The peak to compare with: a known GPU's bf16 data-sheet figure, else measured here in the
    precision that runs (a CPU without bf16 units multiplies bf16 some 30x slower than float32, so
    its bf16 ceiling says nothing about a float32 run and takes minutes to measure)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return peak, f"bf16, {name} data sheet"
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    return matmul_peak_tflops(device, dtype), f"measured {str(dtype)[6:]} matmul ceiling"


def training_flops(model: nn.Module, patches: torch.Tensor, targets: torch.Tensor) -> int:
    """FLOPs of one forward + backward (matmuls and attention, as PyTorch's counter counts them)."""
    model = copy.deepcopy(model).float()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(patches.float()), targets).backward()
    return counter.get_total_flops()


def timm_vit(num_classes: int, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
             mlp_dim: int, drop_path: float) -> nn.Module:
    """timm's VisionTransformer at this architecture, as a user would build it."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=image_size, patch_size=patch_size, num_classes=num_classes,
                             embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_dim / dim,
                             drop_path_rate=drop_path)


def make_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
              precision: str, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One training step: forward, cross entropy, backward, optimiser step."""
    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build_config(config: str, overrides: list[str]) -> ViTCLI:
    """The config's DataModule and LightningModule, built by the CLI train.py uses."""
    with tempfile.TemporaryDirectory() as scratch:  # never resume from, or write to, data/
        # A recipe's `compile: auto` is this script's --compile here: "auto" would first probe on its own.
        auto = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("compile") == "auto"
        cli = ViTCLI(args=["--config", config, "--trainer.logger", "false", *(["--model.compile", "false"] * auto),
                           "--checkpoint.dirpath", scratch, *overrides])
        cli.build()
        return cli


def ours(args: argparse.Namespace, device: torch.device, precision: str):
    """This project's ViT, its geometry and drop path, per --model."""
    if args.model in MODELS:
        dim, depth, heads, mlp_dim = MODELS[args.model]
        geometry = dict(num_classes=10, image_size=32, patch_size=4)
        model = ViT(**geometry, dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_dim / dim, drop_path=0.0)
        return model, geometry, (dim, depth, heads, mlp_dim), 0.0, args.batch_size or 128, 0.05
    cli = build_config(args.config, args.overrides)
    hp = cli.model.hparams
    geometry = dict(num_classes=hp.num_classes, image_size=hp.image_size, patch_size=hp.patch_size)
    arch = (hp.dim, hp.depth, hp.num_heads, int(hp.dim * hp.mlp_ratio))
    return (cli.model.model, geometry, arch, hp.drop_path, args.batch_size or cli.datamodule.batch_size,
            hp.weight_decay)


def compile_if_asked(model: nn.Module, args: argparse.Namespace, device: torch.device) -> str:
    """Compile in place when --compile and it can work here; say what was done."""
    if not args.compile:
        return "eager"
    reason = compile_unavailable(device)
    if reason:
        return f"eager ({reason})"
    compile_features(model)
    return "torch.compile"


def model_mode(args: argparse.Namespace, device: torch.device, precision: str) -> None:
    model, geo, (dim, depth, heads, mlp_dim), drop_path, batch, decay = ours(args, device, precision)
    model.use_fused_attention(fused_attention(device, precision))  # as ViTClassifier.setup decides it
    torch.manual_seed(0)
    images = torch.randn(batch, 3, geo["image_size"], geo["image_size"], device=device)  # (B, C, H, W)
    patches = patchify(images, geo["patch_size"])  # (B, N, P*P*C)
    targets = torch.randint(0, geo["num_classes"], (batch,), device=device)
    flops = training_flops(model.to(device), patches, targets) / batch

    model = model.to(device).train()
    mode = compile_if_asked(model, args, device)
    contenders = {f"ours ({precision}, {mode})": make_step(
        model, patches, targets, device, precision,
        torch.optim.AdamW(param_groups(model, decay), lr=1e-4, fused=fused_adamw(device, precision)))}
    if not args.no_reference:
        reference = timm_vit(geo["num_classes"], geo["image_size"], geo["patch_size"], dim, depth, heads,
                             mlp_dim, drop_path).to(device).train()
        contenders["timm (32-true, eager)"] = make_step(
            reference, images, targets, device, "32-true", torch.optim.AdamW(reference.parameters(), lr=1e-4))

    warm = {}
    for name, step in contenders.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        warm[name] = time.perf_counter() - start
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    peaks: dict[str, float] = {name: 0.0 for name in contenders}
    in_use: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.windows):  # alternate, so drifting machine load hits both alike
        for name, step in contenders.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            rates[name].append(args.steps * batch / (time.perf_counter() - start))
            peaks[name] = max(peaks[name], peak_memory_mib(device))
            in_use[name].append(memory_mib(device))

    peak, peak_source = matmul_peak(device, precision)
    params = sum(p.numel() for p in model.parameters())
    print(f"model      {args.model}: dim {dim}, depth {depth}, {heads} heads, MLP {mlp_dim}, {params / 1e6:.2f} M "
          f"params, {patches.shape[1]} patches + cls, batch {batch}")
    print(f"device     {describe(device)}, torch {torch.__version__}")
    print(f"work       {flops / 1e9:.3f} GFLOP per image per training step (forward + backward)")
    print(f"peak       {peak:.2f} TFLOP/s ({peak_source})")
    print(f"timing     {args.windows} alternating windows x {args.steps} steps after {args.warmup} warm-up steps")
    for name, r in rates.items():
        median = statistics.median(r)
        memory = "GPU peak allocated" if device.type == "cuda" else "process peak RSS"
        print(f"{name:34s} {median:8.1f} img/s (min {min(r):.1f}, max {max(r):.1f})  "
              f"{flops * median / 1e12:.3f} TFLOP/s = {100 * flops * median / 1e12 / peak:.1f}% of peak  "
              f"{memory} {peaks[name]:.0f} MiB, in use first/last window {in_use[name][0]:.0f}/{in_use[name][-1]:.0f}"
              f" MiB, warm-up {warm[name]:.1f} s")
    if len(rates) == 2:
        ours_rate, timm_rate = (statistics.median(r) for r in rates.values())
        print(f"ratio      ours / timm = {ours_rate / timm_rate:.2f}x")
    if args.profile:
        profile_step(next(iter(contenders.values())), args.steps, device)


def profile_step(step: Callable[[], None], steps: int, device: torch.device, top: int = 12) -> None:
    """Where our step's time goes: torch.profiler over `steps` steps, the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    print(f"profile    {steps} steps, {total / steps / 1e3:.1f} ms of {'device' if device.type == 'cuda' else 'CPU'} "
          f"self time a step; the top {top} operators:")
    for event in events[:top]:
        share = getattr(event, attr) / total
        print(f"  {100 * share:5.1f}%  {getattr(event, attr) / steps / 1e3:6.2f} ms  {event.count // steps:4d} calls  {event.key}")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"cpu, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def end_to_end_mode(args: argparse.Namespace, device: torch.device, precision: str) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    overrides = ["--data", "ImageFolderDataModule", "--data.root", args.data_root,
                 "--data.augment_on", args.augment_on, *args.overrides]
    if args.batch_size:
        overrides += ["--data.batch_size", str(args.batch_size)]
    cli = build_config(args.config, overrides)
    module, data = cli.model, cli.datamodule
    args.compile = module.hparams.compile = args.compile or module.hparams.compile  # flag or config
    data.prepare_data()
    data.setup("fit")
    if args.images:  # e.g. a full CIFAR-10 epoch (50 000) from the 5 170-image subset, repeated
        if not isinstance(data.train_set, DeviceImages):
            sys.exit("--images needs --augment-on device (the split as one uint8 tensor)")
        repeats = -(-args.images // len(data.train_set))
        data.train_set = DeviceImages(data.train_set.images.repeat(repeats, 1, 1, 1)[:args.images],
                                      data.train_set.targets.repeat(repeats)[:args.images])
    batch, images = data.batch_size, len(data.train_set)

    # Augmentation alone, over one epoch's worth of batches at most 20.
    loader = data.train_dataloader()
    batches = min(20, len(loader))
    start = time.perf_counter()
    for i, (inputs, targets) in zip(range(batches), loader):
        if data.batch_augment is not None:  # what on_after_batch_transfer does, here on the device
            data.training_batch((inputs.to(device), targets.to(device)))
    sync(device)
    augment_rate = batches * batch / (time.perf_counter() - start)
    del loader

    # The model-only reference: the same network, precision and compile setting, on random data.
    hp = module.hparams
    reference = copy.deepcopy(module.model).to(device).train()
    reference.use_fused_attention(fused_attention(device, precision))
    n = (hp.image_size // hp.patch_size) ** 2
    patches = torch.randn(batch, n, hp.patch_size**2 * 3, device=device)  # (B, N, P*P*C)
    targets = torch.randint(0, hp.num_classes, (batch,), device=device)
    flops = training_flops(reference, patches, targets) / batch  # counted before compiling
    compiled = compile_if_asked(reference, args, device)
    reference_step = make_step(reference, patches, targets, device, precision,
                               torch.optim.AdamW(param_groups(reference, hp.weight_decay), lr=1e-4,
                                                 fused=fused_adamw(device, precision)))
    for _ in range(args.warmup):
        reference_step()
    steps_per_window = max(1, images // batch)
    peak, peak_source = matmul_peak(device, precision)

    class Clock(Callback):
        """Epoch times, device-waiting share per step, memory per epoch; a model-only window after each epoch."""

        def __init__(self) -> None:
            self.epochs, self.model_only, self.idle, self.memory = [], [], [], []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sync(device)
            self.start = self.last_end = time.perf_counter()
            self.waiting, self.events = 0.0, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if device.type == "cuda":
                self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
                self.events[-1][0].record()
            else:
                self.waiting += time.perf_counter() - self.last_end

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if device.type == "cuda":
                self.events[-1][1].record()
            self.last_end = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            sync(device)
            seconds = time.perf_counter() - self.start
            self.epochs.append(seconds)
            if device.type == "cuda":  # GPU time inside steps vs the epoch's wall time
                busy = sum(a.elapsed_time(b) for a, b in self.events) / 1000
                self.idle.append(max(0.0, 1 - busy / seconds))
            else:
                self.idle.append(self.waiting / seconds)
            self.memory.append(memory_mib(device))
            start = time.perf_counter()
            for _ in range(steps_per_window):
                reference_step()
            sync(device)
            self.model_only.append(steps_per_window * batch / (time.perf_counter() - start))

    clock = Clock()
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision=precision, max_epochs=args.epochs,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[clock])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no validation" and similar notices are expected here
        trainer.fit(module, datamodule=data)

    seen = trainer.num_training_batches * batch if trainer.num_training_batches else images
    e2e = [images / s for s in clock.epochs[1:]]  # the first epoch holds compile and warm-up
    model_only = clock.model_only[1:]
    ratios = [m / e for m, e in zip(model_only, e2e)]
    print(f"data       {args.data_root} ({images} training images, batch {batch}, ~{seen} per epoch), "
          f"augment_on {args.augment_on}, augment {data.augment}, loader workers "
          f"{0 if data.batch_augment is not None else data.num_workers}")
    print(f"device     {describe(device)}, precision {precision}, {compiled}, torch {torch.__version__}")
    print(f"augment    {augment_rate:.0f} img/s alone ({'batched, on the device' if data.batch_augment is not None else 'per image, PIL, in the loader'})")
    print(f"epochs     {args.epochs} (the first is warm-up): "
          + ", ".join(f"{s:.2f} s" for s in clock.epochs))
    print(f"end-to-end {statistics.median(e2e):.1f} img/s median (min {min(e2e):.1f}, max {max(e2e):.1f}); "
          f"an epoch of {images} images in {statistics.median(clock.epochs[1:]):.2f} s")
    print(f"work       {flops / 1e9:.3f} GFLOP per image per training step: end to end "
          f"{flops * statistics.median(e2e) / 1e12:.3f} TFLOP/s = {100 * flops * statistics.median(e2e) / 1e12 / peak:.1f}% "
          f"of the peak, {peak:.2f} TFLOP/s ({peak_source})")
    print(f"model only {statistics.median(model_only):.1f} img/s median, alternating with the epochs "
          f"(min {min(model_only):.1f}, max {max(model_only):.1f})")
    print(f"ratio      epoch time / model-only time = {statistics.median(ratios):.3f} median "
          f"(per epoch: {', '.join(f'{r:.3f}' for r in ratios)})")
    what = "GPU idle" if device.type == "cuda" else "host between steps (data + Lightning)"
    print(f"waiting    {what}: " + ", ".join(f"{100 * s:.1f}%" for s in clock.idle))
    unit = "GPU allocated" if device.type == "cuda" else "process RSS"
    print(f"memory     {unit} after each epoch: " + ", ".join(f"{m:.0f}" for m in clock.memory)
          + f" MiB; growth after the first: {clock.memory[-1] - clock.memory[0]:+.0f} MiB; "
          f"peak {peak_memory_mib(device):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="config", choices=["S", "M", "config"])
    parser.add_argument("--config", default="configs/cifar10-cpu.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="ours; default: what train.py picks for the device")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (timm stays eager)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 for S/M, else the config's")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--no-reference", action="store_true", help="skip timm")
    parser.add_argument("--profile", action="store_true", help="model mode: then profile our step (top operators)")
    parser.add_argument("--end-to-end", action="store_true", help="through the real DataModule and Trainer")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets" / "cifar10-subset"),
                        help="the images (default: ../shared/datasets/cifar10-subset beside the repository)")
    parser.add_argument("--augment-on", default="device", choices=["device", "loader"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=None,
                        help="end to end: repeat the training split to this many images (device augmentation)")
    parser.add_argument("overrides", nargs="*", help="extra train.py flags, e.g. --model.dim=128")
    args = parser.parse_args()
    if args.end_to_end and args.epochs < 2:
        parser.error("--epochs must be at least 2 end to end (the first is the warm-up)")

    device = torch.device(args.device)
    precision = args.precision or default_precision(device.type)[0]
    if args.end_to_end and not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root} does not exist: pass the folder that holds the images")
    if args.end_to_end:
        end_to_end_mode(args, device, precision)
    else:
        model_mode(args, device, precision)


if __name__ == "__main__":
    main()
