"""Issue 7's recipe switches: conv tokenizer, MixUp/CutMix, random erasing, repeated augmentation, EMA."""

from __future__ import annotations

import copy

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from conftest import REPO
from helpers import RUN_DIR, train_here
from src.checkpoints import read_checkpoint
from src.data import ImageFolderDataModule
from src.data.base import ImageDataModule
from src.data.device import BatchAugment
from src.data.transforms import batch_mix, train_transform
from src.errors import ConfigError
from src.images import CIFAR10_MEAN, CIFAR10_STD, hflip_patches, patchify, unpatchify
from src.inference import Classifier, load_classifier
from src.models.classifier import ViTClassifier, evaluation_logits
from src.models.vit import ConvStem, ViT
from src.runs import Resume, resume_from

TINY = dict(num_classes=10, image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, drop_path=0.0,
            label_smoothing=0.0)


def quiet(model, monkeypatch):
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    return model


def test_unpatchify_inverts_patchify():
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(images, 4), 4), images)
    assert torch.equal(unpatchify(patchify(images, 8), 8), images)
    laid_out = unpatchify(patchify(images, 8), 8, channels_last=True)  # the conv stem's layout
    assert torch.equal(laid_out, images) and laid_out.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_stem_computes_what_the_plain_layout_does():
    torch.manual_seed(0)
    stem = ViT(num_classes=10, image_size=32, patch_size=8, dim=64, depth=1, num_heads=2, tokenizer="conv",
               stem_width=16).patch_embed.train()
    plain = copy.deepcopy(stem).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in stem.parameters() if p.ndim == 4)
    patches = patchify(torch.randn(4, 3, 32, 32), 8)
    images = unpatchify(patches, 8)  # (B, C, H, W), plain layout
    expected = plain.proj(plain.convs(images)).flatten(2).transpose(1, 2)
    tokens = stem(patches)
    assert tokens.is_contiguous() and torch.allclose(tokens, expected, atol=1e-5)
    tokens.square().sum().backward()
    expected.square().sum().backward()
    for mine, theirs in zip(stem.parameters(), plain.parameters()):
        scale = theirs.grad.abs().max()  # float32 sums in another order: equal to a 1e-4 of the largest
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4 * scale)


def test_conv_tokenizer_gives_one_token_per_patch_and_trains_every_weight():
    torch.manual_seed(0)
    model = ViT(num_classes=10, image_size=32, patch_size=4, dim=32, depth=1, num_heads=2, tokenizer="conv")
    assert isinstance(model.patch_embed, ConvStem)
    patches = torch.randn(2, 64, 48)
    features = model.forward_features(patches)
    assert features.shape == (2, 65, 32)
    model(patches).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_conv_tokens_are_local_and_in_patch_order():
    # A change inside one patch moves its own token and (through the 3x3 receptive field) only
    # its neighbours', never a token on the far side of the image.
    torch.manual_seed(0)
    stem = ConvStem(patch_size=4, dim=16).eval()
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., 0:4, 0:4] += 1.0  # the top-left patch: token 0
    moved = (stem(patchify(changed, 4)) - stem(patchify(images, 4))).abs().sum(-1)[0].view(8, 8)
    assert moved[0, 0] > 0
    assert moved[2:, :].sum() == 0 and moved[:, 2:].sum() == 0


def test_conv_tokenizer_needs_a_power_of_two_patch():
    with pytest.raises(ConfigError, match="power of 2"):
        ViT(num_classes=10, image_size=30, patch_size=6, tokenizer="conv")
    with pytest.raises(ConfigError, match="tokenizer"):
        ViT(num_classes=10, tokenizer="hexagons")


@pytest.mark.parametrize("base, option, old, new", [
    ({}, "tokenizer", "patch", "conv"),
    ({}, "global_pool", "token", "avg"),
    ({"tokenizer": "conv"}, "stem_width", 0, 32),
])
def test_checkpoints_from_before_an_architecture_option_still_fit(tmp_path: Path, base, option, old, new):
    model = ViTClassifier(**TINY, **base)
    hparams = {k: v for k, v in model.hparams.items() if k != option}
    checkpoint = {"hyper_parameters": hparams, "state_dict": model.state_dict()}
    resume_from(model, Resume(tmp_path / "old.ckpt", checkpoint))  # read with the option's old value
    torch.save(checkpoint, tmp_path / "old.ckpt")
    rebuilt = load_classifier(tmp_path / "old.ckpt")
    assert rebuilt.hparams[option] == old
    assert all(torch.equal(rebuilt.model.state_dict()[k], v) for k, v in model.model.state_dict().items())
    ViTClassifier(**TINY, **base).load_backbone(tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=f"{option}={old!r}"):
        resume_from(ViTClassifier(**TINY, **{**base, option: new}), Resume(tmp_path / "old.ckpt", checkpoint))
    with pytest.raises(ConfigError, match=f"{option}={old!r}"):
        ViTClassifier(**TINY, **{**base, option: new}).load_backbone(tmp_path / "old.ckpt")


def test_stem_width_sets_the_conv_stems_channels():
    widths = lambda model: [stage[0].out_channels for stage in model.patch_embed.convs]  # noqa: E731
    assert widths(ViT(num_classes=10, patch_size=8, dim=128, num_heads=4, tokenizer="conv")) == [16, 32, 64]  # dim / P up
    assert widths(ViT(num_classes=10, patch_size=8, dim=128, num_heads=4, tokenizer="conv", stem_width=32)) == [32, 64, 128]
    with pytest.raises(ConfigError, match="stem_width"):
        ViT(num_classes=10, stem_width=32)  # the patch projection has no stem


def test_average_pooling_classifies_the_mean_patch_token():
    torch.manual_seed(0)
    model = ViT(num_classes=10, image_size=32, patch_size=8, dim=32, depth=1, num_heads=2, global_pool="avg")
    features = model.forward_features(torch.randn(3, 16, 192))  # (B, 1+16, D)
    assert torch.allclose(model.forward_head(features), model.head(features[:, 1:].mean(dim=1)))
    with pytest.raises(ConfigError, match="global_pool"):
        ViT(num_classes=10, global_pool="max")


def test_flip_tta_scores_the_mean_of_each_image_and_its_mirror(tmp_path: Path, monkeypatch):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    assert torch.equal(hflip_patches(patchify(images, 4), 4), patchify(images.flip(-1), 4))
    model = quiet(ViTClassifier(**TINY, flip_tta=True), monkeypatch).eval()
    plain, mirrored = model(patchify(images, 4)), model(patchify(images.flip(-1), 4))
    assert not torch.allclose(plain, mirrored)  # the network itself is not flip-invariant
    expected = (plain + mirrored) / 2
    seen = []
    monkeypatch.setattr(model.val_metrics, "forward", lambda logits, targets: seen.append(logits))
    model.validation_step((patchify(images, 4), torch.zeros(4, dtype=torch.long)), 0)
    assert torch.allclose(seen[0], expected, atol=1e-6)
    # classify.py scores an image as the run's validation did.
    hparams = dict(model.hparams)
    classifier = Classifier(model.model, hparams, None, tmp_path / "x.ckpt")
    assert torch.allclose(classifier.probabilities(patchify(images, 4)), expected.softmax(-1), atol=1e-6)
    hparams["flip_tta"] = False
    assert torch.allclose(classifier.probabilities(patchify(images, 4)), plain.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("mixup, cutmix, kind", [(0.8, 0.0, v2.MixUp), (0.0, 1.0, v2.CutMix),
                                                 (0.8, 1.0, v2.RandomChoice), (0.0, 0.0, type(None))])
def test_batch_mix_is_torchvisions(mixup, cutmix, kind):
    assert isinstance(batch_mix(mixup, cutmix, 10), kind)


def mixing_data(**options) -> ImageDataModule:
    data = ImageDataModule(patch_size=4, batch_size=8, **options)
    data.set_image(16, CIFAR10_MEAN, CIFAR10_STD)
    data.num_classes = 10
    return data


def test_batches_are_mixed_on_the_data_side_before_patches_are_cut(monkeypatch):
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 16, 16), torch.arange(8)
    patches, soft = mixing_data(mixup_alpha=0.8).training_batch((images, targets))
    assert patches.shape == (8, 16, 48) and soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    lam = soft[0, 0].item()  # MixUp: image 0 is lam * image 0 + (1 - lam) * image 7
    assert 0 < lam < 1 and soft[0, 7].item() == pytest.approx(1 - lam, abs=1e-6)
    assert torch.allclose(patches, patchify(lam * images + (1 - lam) * images.roll(1, 0), 4), atol=1e-5)
    # CutMix's box is cut in the image, before the patches: a box that crosses patch borders.
    torch.manual_seed(1)
    patches, soft = mixing_data(cutmix_alpha=1.0).training_batch((images, targets))
    pasted = (unpatchify(patches, 4) == images.roll(1, 0)).all(1)[0]  # (H, W): pixels from image 7
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
    assert soft[0, 7].item() == pytest.approx(pasted.float().mean().item(), abs=1e-6)
    # Views are mixed as one batch, all first views first; unmixed, they stay (B, V, N, P*P*C).
    views = torch.randn(8, 2, 3, 16, 16)
    patches, soft = mixing_data(mixup_alpha=0.8, views=2).training_batch((views, targets))
    assert patches.shape == (16, 16, 48) and soft.shape == (16, 10)
    patches, hard = mixing_data(views=2).training_batch((views, targets))
    assert torch.equal(patches, patchify(views, 4)) and torch.equal(hard, targets)


def test_mixed_step_trains_on_soft_targets(monkeypatch):
    torch.manual_seed(0)
    model = quiet(ViTClassifier(**TINY), monkeypatch)
    patches = torch.randn(8, 16, 48)
    soft = F.one_hot(torch.arange(8), 10).float() * 0.7 + F.one_hot(torch.arange(8).roll(1), 10).float() * 0.3
    loss = model.training_step((patches, soft), 0)
    assert loss.item() == pytest.approx(F.cross_entropy(model(patches), soft).item(), rel=1e-5)


def test_mixing_refuses_negative_alphas():
    with pytest.raises(ConfigError, match="mixup_alpha"):
        ImageDataModule(cutmix_alpha=-1.0)


def test_repeated_augmentation_is_the_mean_loss_over_every_view(monkeypatch):
    torch.manual_seed(0)
    model = quiet(ViTClassifier(**TINY), monkeypatch)
    views, targets = torch.randn(4, 3, 16, 48), torch.tensor([1, 2, 3, 4])  # (B, V, N, P*P*C)
    loss = model.training_step((views, targets), 0)
    flat = views.transpose(0, 1).flatten(0, 1)  # every image's first view, then its second, ...
    assert loss.item() == pytest.approx(F.cross_entropy(model(flat), targets.repeat(3)).item(), rel=1e-5)


def erased(images: torch.Tensor, size: int) -> torch.Tensor:
    """Per image (B, C, H, W), whether some 2x2 block of pixels is exactly 0 (the normalised mean colour)."""
    zero = (images == 0).all(1).float()  # (B, H, W)
    return F.max_pool2d(F.avg_pool2d(zero[:, None], 2, 1), size - 1).flatten() == 1


def test_device_random_erasing_hits_about_its_share_of_images():
    torch.manual_seed(0)
    images = torch.randint(1, 255, (2000, 3, 16, 16), dtype=torch.uint8)
    none = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, "none", padding=0)
    assert not erased(none(images), 16).any()
    quarter = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, "none", padding=0, erase_prob=0.25)
    share = erased(quarter(images), 16).float().mean().item()
    assert 0.21 < share < 0.29  # 0.25, minus the few boxes narrower than 2 px


def test_loader_random_erasing_is_torchvisions_and_checked():
    transform = train_transform(32, CIFAR10_MEAN, CIFAR10_STD, "none", erase_prob=0.25)
    assert any(isinstance(t, v2.RandomErasing) and t.p == 0.25 for t in transform.transforms)
    assert not any(isinstance(t, v2.RandomErasing) for t in train_transform(32, CIFAR10_MEAN, CIFAR10_STD).transforms)
    with pytest.raises(ConfigError, match="erase_prob"):
        train_transform(32, CIFAR10_MEAN, CIFAR10_STD, erase_prob=1.5)


EMA_RUN = [
    "--config", str(REPO / "configs" / "cifar10-cpu.yaml"),
    "--data", "ImageFolderDataModule", "--data.num_workers", "0", "--data.batch_size", "8",
    "--model.dim", "16", "--model.depth", "1", "--model.num_heads", "2", "--model.stem_width", "0",
    "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
    # The GPU recipe's switches, which the CPU recipe leaves off: one CLI run goes through all of them.
    "--model.mixup_alpha", "0.8", "--model.cutmix_alpha", "1.0", "--data.views", "2", "--data.erase_prob", "0.25",
]


def test_ema_run_checkpoints_and_tests_the_average_and_resumes(tmp_path: Path, image_folder: Path):
    run = [*EMA_RUN, "--data.root", str(image_folder), "--ema", "0.9"]
    first = train_here(tmp_path, *run, "--trainer.max_epochs", "1")
    assert first.returncode == 0, first.output
    second = train_here(tmp_path, *run, "--trainer.max_epochs", "3")  # resumes from last.ckpt
    assert second.returncode == 0, second.output
    assert "Resuming from" in second.output

    models = tmp_path / RUN_DIR
    best = next(p for p in models.glob("epoch*.ckpt"))
    raw = torch.load(best, weights_only=True)
    assert "averaging_state" in raw and "current_model_state" in raw
    average, current = raw["state_dict"], raw["current_model_state"]
    assert any(not torch.equal(average[k], current[k]) for k in average if k.startswith("model."))

    # The logged test loss is that of the average (the checkpoint's state_dict), not the raw weights.
    hparams, _, data_hparams = read_checkpoint(best)
    data = ImageFolderDataModule(**{k: v for k, v in data_hparams.items() if not k.startswith("_")})
    data.setup("test")
    samples = [data.test_set[i] for i in range(len(data.test_set))]
    patches, targets = torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples])
    model = ViTClassifier(**{k: v for k, v in hparams.items() if not k.startswith("_")}).eval()

    def loss_of(state: dict) -> float:
        model.load_state_dict(state)
        with torch.no_grad():
            # Scored as the run scored its test: with the recipe's flip test-time augmentation.
            logits = evaluation_logits(model.model, patches, hparams["flip_tta"], hparams["patch_size"])
            return F.cross_entropy(logits, targets).item()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logs = sorted((tmp_path / "data/lightning/lightning_logs").glob("version_*"))[-1]
    logged = EventAccumulator(str(logs)).Reload().Scalars("test/loss")[-1].value
    assert logged == pytest.approx(loss_of(average), rel=1e-4)
    assert logged != pytest.approx(loss_of(current), rel=1e-4)
