"""IDMM pre-training: instance cross entropy on a mixed view + InfoNCE on unmixed views, the k-NN
monitor, and fine-tuning with layer-wise learning-rate decay."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, image_number
from src.data import Flowers17DataModule
from src.data.base import ImageDataModule
from src.errors import ConfigError
from src.images import CIFAR10_MEAN, CIFAR10_STD, patchify, unpatchify
from src.models.classifier import ViTClassifier
from src.models.knn import knn_accuracy, knn_predict
from src.runs import check_start
from helpers import info_nce_reference, train_here

TINY = dict(num_classes=10, image_size=16, patch_size=4, dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
            drop_path=0.0)


def logged_step(model: ViTClassifier, batch, monkeypatch) -> tuple[torch.Tensor, dict]:
    """The training step's loss and what it logged."""
    logged = {}
    monkeypatch.setattr(model, "log_dict", lambda values, **kw: logged.update(values))
    monkeypatch.setattr(model, "log", lambda name, value, **kw: logged.update({name: value}))
    return model.training_step(batch, 0), logged


def idmm_batch(seed: int = 0, batch: int = 6):
    """What the DataModule gives the IDMM step: unmixed views (B, 2, N, P*P*C) with instance targets
    (B,), then mixed first views (B, N, P*P*C) with soft targets (B, K)."""
    generator = torch.Generator().manual_seed(seed)
    views = torch.randn(batch, 2, 16, 48, generator=generator)
    targets = torch.randperm(10, generator=generator)[:batch]
    lam = 0.7
    mixed = lam * views[:, 0] + (1 - lam) * views[:, 0].roll(1, 0)
    soft = lam * F.one_hot(targets, 10).float() + (1 - lam) * F.one_hot(targets.roll(1), 10).float()
    return views, targets, mixed, soft


@pytest.mark.parametrize("tokenizer", ["patch", "conv"])
def test_idmm_loss_is_mixed_cross_entropy_plus_weighted_info_nce(monkeypatch, tokenizer: str):
    torch.manual_seed(0)
    model = ViTClassifier(**TINY, tokenizer=tokenizer, contrastive_weight=0.5, temperature=0.2,
                          mixup_alpha=0.8, cutmix_alpha=1.0)
    views, targets, mixed, soft = batch = idmm_batch()
    loss, logged = logged_step(model, batch, monkeypatch)
    # Each part computed directly, in the same (training) mode, from the inputs it should see.
    ce = F.cross_entropy(model.model(mixed), soft, label_smoothing=0.1)
    flat = views.transpose(0, 1).flatten(0, 1)  # (2B, N, P*P*C): first views, then second views
    z1, z2 = model.projector(model.model.pool(model.model.forward_features(flat))).chunk(2)
    contrastive = info_nce_reference(z1.detach().double(), z2.detach().double(), 0.2)
    assert logged["train/ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert logged["train/contrastive"].item() == pytest.approx(contrastive, rel=1e-5)
    assert loss.item() == pytest.approx(ce.item() + 0.5 * contrastive, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_mixed_copy_reaches_only_the_cross_entropy(monkeypatch):
    torch.manual_seed(0)
    model = ViTClassifier(**TINY, tokenizer="conv", contrastive_weight=0.5, mixup_alpha=0.8)
    views, targets, mixed, soft = idmm_batch()
    _, first = logged_step(model, (views, targets, mixed, soft), monkeypatch)
    other_mixed, other_soft = 3 * torch.randn_like(mixed), soft.roll(2, 0)
    _, other = logged_step(model, (views, targets, other_mixed, other_soft), monkeypatch)
    # Even through the conv stem's batch statistics, the mixed images do not reach the views' features.
    assert other["train/contrastive"].item() == first["train/contrastive"].item()
    assert other["train/ce"].item() != first["train/ce"].item()
    expected = F.cross_entropy(model.model(other_mixed), other_soft, label_smoothing=0.1)
    assert other["train/ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def mixing_data(**options) -> ImageDataModule:
    data = ImageDataModule(patch_size=4, batch_size=8, views=2, **options)
    data.set_image(16, CIFAR10_MEAN, CIFAR10_STD)
    data.num_classes = 10
    return data


def test_the_data_side_mixes_a_copy_of_the_first_views_and_keeps_both_views_unmixed():
    torch.manual_seed(0)
    views, targets = torch.randn(8, 2, 3, 16, 16), torch.arange(8)  # (B, V, C, H, W) from the loader
    unmixed, hard, mixed, soft = mixing_data(mixup_alpha=0.8, keep_unmixed=True).training_batch((views, targets))
    assert torch.equal(unmixed, patchify(views, 4)) and torch.equal(hard, targets)  # (B, V, N, P*P*C), untouched
    lam = soft[0, 0].item()  # MixUp of the first views: image 0 is lam * image 0 + (1 - lam) * image 7
    assert 0 < lam < 1 and soft[0, 7].item() == pytest.approx(1 - lam, abs=1e-6)
    first = views[:, 0]
    assert torch.allclose(unpatchify(mixed, 4), lam * first + (1 - lam) * first.roll(1, 0), atol=1e-5)
    # Without keep_unmixed every view is mixed, as repeated augmentation with MixUp wants.
    all_mixed, _ = mixing_data(mixup_alpha=0.8).training_batch((views, targets))
    assert all_mixed.shape == (16, 16, 48)


def test_contrastive_term_with_mixing_needs_the_unmixed_views(monkeypatch):
    model = ViTClassifier(**TINY, contrastive_weight=0.5, mixup_alpha=0.8)  # allowed together now
    views, targets, _, soft = idmm_batch()
    everything_mixed = (views.transpose(0, 1).flatten(0, 1), soft.repeat(2, 1))  # (2B, N, P*P*C), (2B, K)
    with pytest.raises(ConfigError, match="keep_unmixed"):
        logged_step(model, everything_mixed, monkeypatch)
    with pytest.raises(ConfigError, match="keep_unmixed"):
        check_start(model, mixing_data(mixup_alpha=0.8))
    check_start(model, mixing_data(mixup_alpha=0.8, keep_unmixed=True))


def test_instance_targets_stay_the_dataset_positions_through_the_idmm_batch(flowers17: Path):
    dm = Flowers17DataModule(root=str(flowers17), download=False, image_size=16, patch_size=8, num_workers=0,
                             cache_dir=str(flowers17.parent / "cache"), targets="instance", views=2,
                             augment="none", augment_on="device", mixup_alpha=0.8, keep_unmixed=True)
    dm.setup("fit")
    dm.trainer = type("T", (), {"training": True})()
    indices = torch.tensor([3, 0, 679, 42])
    unmixed, targets, mixed, soft = dm.on_after_batch_transfer((indices, dm.train_set.targets[indices]), 0)
    assert torch.equal(targets, indices) and soft.shape == (4, 680)  # one class per training image
    assert set(soft.nonzero()[:, 1].tolist()) <= set(indices.tolist())  # mixes only the batch's own images
    # The unmixed views are crops of the images their targets name (colour encodes the file number).
    files = [i + 1 for i in dm.knn_reference.indices]  # the training split, sorted: position = target
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    pixels = ((unpatchify(unmixed[:, 1], 8) * std + mean) * 255).round()
    assert [image_number(image) for image in pixels] == [files[i] for i in indices]
    # k-NN validation: the labelled training images as references, the validation images as queries.
    assert dm.evaluation == "knn" and len(dm.knn_reference) == 680 and len(dm.val_set) == 340
    assert len(dm.val_dataloader()) == 2


def test_knn_is_perfect_on_separable_features_and_chance_on_shuffled_labels():
    generator = torch.Generator().manual_seed(0)
    classes, per_class, dim = 10, 50, 32
    centres = torch.randn(classes, dim, generator=generator) * 5
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    queries = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    assert knn_accuracy(features, labels, queries, labels, classes).item() == 1.0
    shuffled = labels[torch.randperm(len(labels), generator=generator)]
    chance = knn_accuracy(features, shuffled, queries, labels, classes).item()
    assert abs(chance - 1 / classes) < 0.06


def test_knn_votes_are_similarity_weighted_among_the_k_nearest():
    reference = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(reference, labels, query, 2, k=2).item() == 0  # its two nearest are class 0
    assert knn_predict(reference, labels, query, 2, k=5, temperature=10.0).item() == 1  # flat votes: majority
    assert knn_predict(reference, labels, query, 2, k=5, temperature=0.01).item() == 0  # sharp: the nearest win
    with pytest.raises(ValueError):
        knn_predict(reference, labels, query, 2, k=0)


def test_layer_decay_gives_each_depth_its_learning_rate():
    model = ViTClassifier(**TINY, tokenizer="conv", contrastive_weight=0.5, lr=1e-3, layer_decay=0.5)
    optimizer = model.configure_optimizers()["optimizer"]
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter, once
    names = dict(model.named_parameters())
    expected = {  # depth 2: embedding 0.5^3, blocks.0 0.5^2, blocks.1 0.5, norm/head/projector 1
        "model.patch_embed.convs.0.0.weight": 1e-3 * 0.5 ** 3, "model.cls_token": 1e-3 * 0.5 ** 3,
        "model.pos_embed": 1e-3 * 0.5 ** 3, "model.blocks.0.attn.qkv.weight": 1e-3 * 0.5 ** 2,
        "model.blocks.1.mlp.fc2.bias": 1e-3 * 0.5, "model.norm.weight": 1e-3, "model.head.weight": 1e-3,
        "projector.fc1.weight": 1e-3,
    }
    for name, lr in expected.items():
        assert lr_of[id(names[name])] == pytest.approx(lr), name
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(names["model.blocks.0.attn.qkv.weight"]) in decay and id(names["model.pos_embed"]) not in decay
    # Off (1.0): the two groups of every earlier checkpoint, so those still resume.
    plain = ViTClassifier(**TINY).configure_optimizers()["optimizer"]
    assert len(plain.param_groups) == 2 and {g["lr"] for g in plain.param_groups} == {1e-3}
    with pytest.raises(ConfigError, match="layer_decay"):
        ViTClassifier(**TINY, layer_decay=0.0)


def test_layer_decay_scales_the_whole_schedule():
    model = ViTClassifier(**TINY, lr=1e-3, min_lr=1e-5, layer_decay=0.5)
    configured = model.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    schedule.plan(warmup_steps=2, total_steps=10)
    for _ in range(10):
        ratios = {g["name"]: g["lr"] / (1e-3 * g["lr_scale"]) for g in optimizer.param_groups}
        assert max(ratios.values()) == pytest.approx(min(ratios.values()))  # one shape, scaled per depth
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * optimizer.param_groups[0]["lr_scale"])


def test_idmm_pretraining_logs_knn_accuracy_and_chooses_checkpoints_by_it(tmp_path: Path, flowers17: Path):
    run = train_here(tmp_path, "--config", str(REPO / "configs/flowers17-pretrain.yaml"),
                     "--data.root", str(flowers17), "--data.download", "false", "--data.image_size", "16",
                     "--data.num_workers", "0", "--model.dim", "16", "--model.depth", "1", "--model.num_heads", "2",
                     "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "2",
                     "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
                     "--trainer.enable_progress_bar", "false")
    assert run.returncode == 0, run.output
    output = run.output
    assert "the best checkpoint follow it" in output or "best checkpoint follow it" in output
    events = EventAccumulator(str(tmp_path / "data/lightning/lightning_logs/version_0")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/knn_acc", "train/ce", "train/contrastive"} <= tags and "val/acc" not in tags
    knn = [s.value for s in events.Scalars("val/knn_acc")]
    assert len(knn) == 2 and all(0.0 <= value <= 1.0 for value in knn)
    for ce, contrastive, loss in zip(*(events.Scalars(t) for t in ("train/ce", "train/contrastive", "train/loss"))):
        assert loss.value == pytest.approx(ce.value + 0.5 * contrastive.value, rel=1e-4)
    best = list((tmp_path / "data/lightning/flowers17-pretrain").glob("epoch*-knn*.ckpt"))
    assert len(best) == 1
    saved = torch.load(best[0], weights_only=True)
    assert saved["hyper_parameters"]["num_classes"] == 680
    assert math.isclose(float(best[0].stem.split("knn")[1]), max(knn), abs_tol=1e-4)
