"""`--model.compile auto`: torch.compile only where it pays for the run's length, measured on this machine.

A compiled step is cheaper, but compiling takes 10 s to over a minute on 2 cores, inside the run's
time, and more than once: training's graphs first, again at an epoch's last, smaller batch, and
evaluation's at the first validation. So compiling pays when the steps it saves over the run
outweigh that time: `Probe.pays` compares the steps each way fits in the run's seconds. `probe`
times the run's own network on random images, eagerly and compiled, compile times included; the
result is kept per machine, PyTorch version, device, precision, network and batch size in
data/compile-probe.json, so only a network's first run pays for the probe. A run shorter than
PROBE_FROM is not probed at all.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from src.hardware import fused_attention
from src.models.classifier import compile_features
from src.models.vit import ViT
from src.shapes import timed_steps, training_step

CACHE = Path("data") / "compile-probe.json"  # relative to where train.py runs, as data/lightning/ is
# Below this many seconds of training a run is not probed: the probe's own compile would take a tenth
# of it, and on 2 cores a compiled step was only 1.06-1.13x the eager one (bench/RESULTS.md).
PROBE_FROM = 600.0
ROUNDS = 6  # of three eager and three compiled steps, after the first of each (which compiles)


@dataclass(frozen=True)
class Probe:
    eager: float  # seconds of an eager training step
    compiled: float  # of a compiled one
    compile: float  # seconds spent compiling: training's graphs and evaluation's

    def steps(self, seconds: float, compiled: bool) -> float:
        """Training steps in `seconds`, compiling first or not."""
        return max(0.0, seconds - self.compile) / self.compiled if compiled else seconds / self.eager

    def pays(self, seconds: float) -> bool:
        return self.steps(seconds, True) > self.steps(seconds, False)

    def __str__(self) -> str:
        return (f"a compiled step {self.compiled * 1e3:.0f} ms against {self.eager * 1e3:.0f} ms eager, "
                f"after {self.compile:.0f} s compiling")


def machine_key(settings: dict, batch_size: int, precision: str, device: torch.device) -> str:
    """What a probe's result holds for: this machine's processor and threads (or GPU), PyTorch, the network."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{cpu_name()}, {torch.get_num_threads()} threads")
    return json.dumps({"device": f"{device.type}: {where}", "torch": torch.__version__, "precision": precision,
                       "batch_size": batch_size, "network": settings}, sort_keys=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cached(key: str) -> Probe | None:
    try:
        return Probe(**json.loads(CACHE.read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(key: str, result: Probe) -> None:
    """Keep `result` under `key`; written whole to a temporary file first, so a stop leaves no half file."""
    cache = CACHE
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    known[key] = asdict(result)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(known, indent=1))
        partial.replace(cache)
    except OSError:  # a read-only or full disk: the run goes on, and the next one probes again
        partial.unlink(missing_ok=True)


def probe(settings: dict, batch_size: int, precision: str, device: torch.device) -> Probe:
    """Eager and compiled training steps of a ViT with `settings` on random images, and what compiling
    costs a run: training's graphs and evaluation's, each at the run's batch size and again at another
    (an epoch's last, smaller batch makes PyTorch compile a second, shape-general graph). The run's
    random state is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        eager, compiled = (ViT(**settings).to(device) for _ in range(2))
        for model in (eager, compiled):
            model.use_fused_attention(fused_attention(device, precision))
        compile_features(compiled)
        steps = {name: training_step(model, settings, batch_size, precision, device)
                 for name, model in (("eager", eager), ("compiled", compiled))}
        steps["eager"]()  # warm-up
        first = steps["compiled"]()  # compiles
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(ROUNDS):  # alternating, so a change in the machine's load hits both alike
            for name, step in steps.items():
                times[name] += [step() for _ in range(3)]
        eager_s, compiled_s = (statistics.median(times[name]) for name in ("eager", "compiled"))
        other = max(1, batch_size // 2)
        compile_s = first - compiled_s + timed_steps(compiled, settings, other, precision, device, 1)[0]
        compiled.eval()
        tokens = (settings["image_size"] // settings["patch_size"]) ** 2
        for size in (batch_size, other):
            patches = torch.randn(size, tokens, settings["patch_size"] ** 2 * settings.get("in_channels", 3),
                                  device=device)
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in precision):
                compiled(patches)
            compile_s += time.perf_counter() - start
    return Probe(eager_s, compiled_s, compile_s)
