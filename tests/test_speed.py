"""The fast paths give the float32 reference's results (bf16 attention, torch.compile, device augmentation),
and `--model.compile auto` compiles only where it pays."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, write_image_folder
from src import compiling
from src.cli import ViTCLI
from src.data.device import BatchAugment, DeviceImages, reflect
from src.data.transforms import PatchifyTransform
from src.hardware import fused_attention
from src.images import patchify
from src.models import classifier
from helpers import train_losses
from src.models.classifier import ViTClassifier, compile_features, compile_unavailable
from src.models.vit import Attention, ViT

SMALL = dict(num_classes=10, image_size=32, patch_size=4, dim=48, depth=2, num_heads=4, mlp_ratio=4.0)


def test_bf16_cpu_attention_takes_the_matmul_path_and_agrees_with_float32():
    # Decided once per run from the device and the precision, not per call.
    assert not fused_attention(torch.device("cpu"), "bf16-mixed")
    assert fused_attention(torch.device("cpu"), "32-true") and fused_attention(torch.device("cuda"), "bf16-mixed")
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=4)
    x = torch.randn(8, 65, 64)
    reference = attn(x)  # float32: the fused SDPA kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = attn(x)
        attn.fused_attn = False
        fast = attn(x)  # bf16 on the CPU: two matmuls and a softmax
    assert fast.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: agreement to ~1% of the output's scale is what it can give.
    scale = reference.abs().max()
    assert (fast.float() - reference).abs().max() < 0.02 * scale
    assert (fast.float() - fused.float()).abs().max() < 0.02 * scale


def test_bf16_mixed_training_follows_the_float32_loss_curve():
    torch.manual_seed(0)
    model = ViT(**SMALL)
    fp32 = train_losses(copy.deepcopy(model), 8, "32-true")
    bf16 = train_losses(copy.deepcopy(model), 8, "bf16-mixed")
    assert fp32[-1] < fp32[0] - 0.3  # the batch is being learned, so the curves have a shape to match
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.02 * a, (fp32, bf16)


@pytest.mark.slow  # compiling takes ~25 s on 2 cores
@pytest.mark.skipif(compile_unavailable(torch.device("cpu")) is not None,
                    reason=f"torch.compile cannot run here: {compile_unavailable(torch.device('cpu'))}")
def test_compile_gives_the_eager_results():
    torch.manual_seed(0)
    model = ViT(**{**SMALL, "depth": 1})
    eager = copy.deepcopy(model)
    compiled = copy.deepcopy(model)
    compile_features(compiled)
    assert train_losses(eager, 3, "32-true") == pytest.approx(train_losses(compiled, 3, "32-true"), rel=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # checkpoints are unchanged


def test_compile_falls_back_with_a_warning_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(classifier.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    assert "C/C++ compiler" in compile_unavailable(torch.device("cpu"))
    assert "not supported on mps" in compile_unavailable(torch.device("mps"))

    module = ViTClassifier(**{k: v for k, v in SMALL.items()}, compile=True)
    module.trainer = type("T", (), {"strategy": type("S", (), {"root_device": torch.device("cpu")})(), "precision": "32-true"})()
    forward = module.model.forward_features
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup("fit")
    assert any("training uncompiled" in str(w.message) for w in caught)
    assert module.model.forward_features == forward  # left as it was


def test_compiling_pays_only_when_the_steps_it_saves_outweigh_its_compile_time():
    probe = compiling.Probe(eager=0.10, compiled=0.08, compile=40.0)  # 20 % off a step after 40 s
    assert probe.steps(1200, compiled=True) == pytest.approx((1200 - 40) / 0.08)
    assert not probe.pays(180) and not probe.pays(199)  # break-even: 40 s / 0.2 = 200 s of training
    assert probe.pays(201) and probe.pays(3600)
    assert not compiling.Probe(eager=0.10, compiled=0.11, compile=1.0).pays(1e6)  # slower compiled: never


@pytest.fixture
def compile_cli(monkeypatch, tmp_path):
    """A CLI on a small image folder, compile "auto", with a fake probe that counts its calls."""
    monkeypatch.chdir(tmp_path)  # data/compile-probe.json lands here
    monkeypatch.setattr(compiling, "CACHE", tmp_path / "data" / "compile-probe.json")
    monkeypatch.setattr(classifier, "compile_unavailable", lambda device: None)
    monkeypatch.setattr("src.cli.compile_unavailable", lambda device: None)
    calls = []

    def probe(settings, batch_size, precision, device):
        calls.append(settings["dim"])
        return compiling.Probe(eager=0.10, compiled=0.05, compile=30.0)
    monkeypatch.setattr(compiling, "probe", probe)
    folder = write_image_folder(tmp_path / "images")

    def make(*flags):
        run = ViTCLI(args=["--config", str(REPO / "configs/cifar10-cpu.yaml"), "--data", "ImageFolderDataModule",
                           "--data.root", str(folder), "--shape", "recipe", "--trainer.logger", "false", *flags])
        run.choose_compile()
        return run.config.model.compile
    return make, calls


def test_compile_auto_probes_once_per_network_and_machine_then_reads_the_cache(compile_cli, caplog):
    make, calls = compile_cli
    assert make("--model.compile", "auto", "--trainer.max_time", "00:00:20:00") is True
    assert calls == [128]  # the recipe's network, measured once
    assert "Compile: on (a compiled step 50 ms against 100 ms eager, after 30 s compiling: +95 % steps" in caplog.text
    assert make("--model.compile", "auto", "--trainer.max_time", "00:01:00:00") is True and calls == [128]  # cached
    saved = json.loads(compiling.CACHE.read_text())
    assert [json.loads(key)["network"]["dim"] for key in saved] == [128]
    assert make("--model.compile", "auto", "--trainer.max_time", "00:00:00:45") is False  # cached: 45 s < 30 s + ...
    assert make("--model.compile", "auto", "--trainer.max_time", "00:00:20:00", "--model.dim", "64",
                "--model.num_heads", "2") is True and calls == [128, 64]  # another network: probed


def test_compile_auto_skips_the_probe_for_a_short_run_and_a_typed_value_wins(compile_cli, caplog):
    make, calls = compile_cli
    assert make("--model.compile", "auto", "--trainer.max_time", "00:00:05:00") is False
    assert calls == [] and "Compile: off (5 minutes of training, under 10 minutes" in caplog.text
    assert make("--model.compile", "false", "--trainer.max_time", "00:01:00:00") is False and calls == []
    assert make("--model.compile", "true", "--trainer.max_time", "00:00:01:00") is True and calls == []


def test_compile_auto_without_a_budget_reads_the_runs_length_from_its_epochs(compile_cli, caplog):
    make, calls = compile_cli
    assert make("--model.compile", "auto") is False and calls == []  # the recipe's 30 epochs of 1 batch
    assert "s of training, under 10 minutes" in caplog.text
    assert make("--model.compile", "auto", "--trainer.max_epochs", "100000") is True and calls == [128]


def test_a_probe_that_cannot_be_saved_does_not_stop_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr(compiling, "CACHE", tmp_path / "data" / "compile-probe.json")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    compiling.remember("key", compiling.Probe(eager=0.1, compiled=0.05, compile=30.0))  # no error
    assert compiling.cached("key") is None and not list((tmp_path / "data").iterdir())  # nothing half-written


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable(torch.device("cpu")) is not None, reason="torch.compile cannot run here")
def test_the_compile_probe_times_real_steps_and_leaves_the_random_state(monkeypatch):
    monkeypatch.undo()  # the real probe, which conftest keeps out of the quick tier
    settings = dict(SMALL, in_channels=3, tokenizer="conv", stem_width=8, patch_size=8)
    state = torch.random.get_rng_state()
    probe = compiling.probe(settings, 16, "32-true", torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert 0 < probe.eager < 1 and 0 < probe.compiled < 1  # a tiny network's step
    assert probe.compile > 0.2  # traced and built (a second or more even with a warm Inductor cache)


def test_batched_patchify_matches_the_per_image_transform():
    images = torch.randn(5, 3, 32, 32)
    one_by_one = torch.stack([PatchifyTransform(4)(image) for image in images])
    assert torch.equal(patchify(images, 4), one_by_one)
    assert torch.equal(PatchifyTransform(4).inverse(patchify(images, 4)[2], 32), images[2])


def test_reflect_matches_torch_reflect_padding():
    line = torch.arange(7.0).view(1, 1, 7)
    padded = F.pad(line, (3, 3), mode="reflect").flatten()
    assert torch.equal(line.flatten()[reflect(torch.arange(-3, 10), 7)], padded)


def test_device_crop_and_flip_are_per_image_reflect_crops_with_uniform_offsets():
    torch.manual_seed(0)
    B, H, W, p = 3000, 8, 8, 2
    images = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8)
    out = BatchAugment(mean=(0.5,) * 3, std=(0.5,) * 3, augment="none", padding=p).crop_and_flip(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images.float(), (p, p, p, p), mode="reflect")  # (B, C, H+2p, W+2p)
    # Every candidate window (dy, dx) with and without a mirror; each output must be one of them.
    candidates = torch.stack([padded[:, :, dy:dy + H, dx:dx + W] for dy in range(2 * p + 1) for dx in range(2 * p + 1)])
    candidates = torch.cat([candidates, candidates.flip(-1)])  # (2*(2p+1)^2, B, C, H, W)
    match = (candidates == out.float()).flatten(2).all(-1)  # (candidates, B)
    assert match.any(0).all(), "an output is not a reflect-padded crop (or its mirror) of its input"
    chosen = match.float().argmax(0)  # random pixels: the matching window is unique
    flipped = (chosen >= (2 * p + 1) ** 2).float().mean().item()
    assert abs(flipped - 0.5) < 0.04
    counts = torch.bincount(chosen % (2 * p + 1) ** 2, minlength=(2 * p + 1) ** 2).float()
    assert counts.min() > 0.6 * B / 25 and counts.max() < 1.4 * B / 25, counts  # every offset, ~uniform
    assert (out != images).flatten(1).any(1).float().mean() > 0.9  # and images do move


def test_device_resized_crop_is_an_antialiased_resize_of_a_torchvision_box():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    whole = BatchAugment((0.5,) * 3, (0.5,) * 3, "none", crop_scale=(1.0, 1.0), size=16)
    out = whole.resized_crop_and_flip(images)
    assert out.shape == (64, 3, 16, 16) and out.dtype == torch.uint8
    # The whole image at half size is the mean of each 2x2 block (an area resize), maybe mirrored.
    halved = F.avg_pool2d(images.float(), 2).round()
    same = (out.float() == halved).flatten(1).all(1)
    mirrored = (out.float() == halved.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 0.3 < mirrored.float().mean() < 0.7
    # A coordinate image shows each box: its area share stays in crop_scale, its place varies.
    x = torch.arange(64.0).expand(64, 64)
    coords = torch.stack([x, x.T, torch.zeros(64, 64)]).expand(300, 3, 64, 64).to(torch.uint8)  # R = column, G = row
    part = BatchAugment((0.5,) * 3, (0.5,) * 3, "none", crop_scale=(0.3, 0.5), size=16).resized_crop_and_flip(coords)
    cols, rows = part[:, 0].float(), part[:, 1].float()
    width = (cols.amax((1, 2)) - cols.amin((1, 2))) * 16 / 15  # span of the sampled columns, ~ box width
    height = (rows.amax((1, 2)) - rows.amin((1, 2))) * 16 / 15
    share = width * height / 64**2
    assert share.min() > 0.25 and share.max() < 0.56, (share.min(), share.max())
    assert cols.amin((1, 2)).std() > 3  # boxes start in different places


def test_device_augmentation_output_is_normalised_valid_images():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    pixels = images.float() / 255
    mean, std = pixels.mean((0, 2, 3)).tolist(), pixels.std((0, 2, 3)).tolist()
    plain = BatchAugment(mean, std, augment="none")(images)
    assert plain.shape == (512, 3, 32, 32) and plain.dtype == torch.float32  # patches are cut per batch later
    channels = plain.transpose(0, 1).flatten(1).T  # (pixels, C)
    assert channels.mean(0).abs().max() < 0.01 and (channels.std(0) - 1).abs().max() < 0.01

    policy = BatchAugment(mean, std, augment="randaugment")
    out = policy(images)
    assert out.shape == (512, 3, 32, 32) and torch.isfinite(out).all()
    restored = out.transpose(0, 1).flatten(1).T * torch.tensor(std) + torch.tensor(mean)  # back to [0, 1] pixels
    assert restored.min() > -1e-5 and restored.max() < 1 + 1e-5
    # RandAugment (2 of 14 ops, one of them identity) changes nearly every image beyond the crop.
    cropped = BatchAugment(mean, std, augment="none")
    torch.manual_seed(1)
    crop_only = cropped(images)
    torch.manual_seed(1)
    augmented = policy(images)
    changed = (augmented != crop_only).flatten(1).any(1).float().mean()
    assert changed > 0.7, changed


def test_device_images_move_once_and_feed_the_training_hook():
    from src.data.base import ImageDataModule

    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    store = DeviceImages(images, list(range(10)))
    assert store[3] == (3, 3)
    assert torch.equal(store.take(torch.tensor([3, 1])), images[[3, 1]].permute(0, 3, 1, 2))

    data = ImageDataModule(patch_size=4, batch_size=2, views=2, augment_on="device")
    data.set_image(32, (0.5,) * 3, (0.5,) * 3)
    data.train_set = data.device_train_set(images, list(range(10)))
    data.trainer = type("T", (), {"training": True})()
    patches, targets = data.on_after_batch_transfer((torch.tensor([0, 5]), torch.tensor([0, 5])), 0)
    assert patches.shape == (2, 2, 64, 48) and targets.tolist() == [0, 5]  # (B, V, N, P*P*C)
    assert not torch.equal(patches[:, 0], patches[:, 1])  # two independent augmentations
    data.trainer = type("T", (), {"training": False})()
    batch = (torch.randn(2, 64, 48), torch.tensor([0, 1]))
    assert data.on_after_batch_transfer(batch, 0) is batch  # evaluation batches pass untouched
