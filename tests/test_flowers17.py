"""Flowers-17: labels from file numbers, splits, the decode cache, errors, views and instance targets."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from conftest import FLOWERS17, REPO, image_number
import src.data.flowers17 as flowers
from src.data import Flowers17, Flowers17DataModule
from src.errors import ConfigError, DataError
from src.images import unpatchify
from helpers import train, train_here


def datamodule(root: Path, **kwargs) -> Flowers17DataModule:
    settings = dict(root=str(root), download=False, image_size=16, patch_size=8,
                    cache_dir=str(root.parent / "cache"), num_workers=0)
    return Flowers17DataModule(**{**settings, **kwargs})


def test_labels_come_from_the_file_number(flowers17: Path):
    data = Flowers17(flowers17, size=16, cache_dir=flowers17.parent / "cache")
    assert len(data) == 1360
    for i in [0, 79, 80, 81, 639, 640, 1279, 1359]:
        image, label = data[i]
        assert image_number(image) == i + 1  # sample i is file image_{i+1:04d}.jpg
        assert label == i // 80
    assert flowers.CLASSES[data[80][1]] == "Snowdrop" and flowers.CLASSES[data[1359][1]] == "Pansy"
    assert Counter(data.targets) == {c: 80 for c in range(17)}


def test_seeded_split_is_stratified_disjoint_deterministic_and_reported(flowers17: Path):
    dm = datamodule(flowers17)
    dm.setup("fit")
    parts = {name: getattr(dm, f"{name}_set").indices for name in ("train", "val", "test")}
    assert {name: len(p) for name, p in parts.items()} == {"train": 680, "val": 340, "test": 340}
    assert set(parts["train"]).isdisjoint(parts["val"]) and set(parts["val"]).isdisjoint(parts["test"])
    assert set(parts["train"]) | set(parts["val"]) | set(parts["test"]) == set(range(1360))
    for name, per_class in [("train", 40), ("val", 20), ("test", 20)]:
        assert Counter(i // 80 for i in parts[name]) == {c: per_class for c in range(17)}
    assert "seeded stratified 40/20/20" in dm.split_used and "datasplits.mat" in dm.split_used

    again = datamodule(flowers17)
    again.setup("fit")
    assert again.train_set.indices == parts["train"]
    other = datamodule(flowers17, split=2)
    other.setup("fit")
    assert other.train_set.indices != parts["train"]


def test_official_split_is_read_from_datasplits_mat(flowers17: Path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    mat = {}
    for s in (1, 2, 3):
        order = np.concatenate([rng.permutation(80) + 80 * c for c in range(17)]).reshape(17, 80)
        # 1-based image numbers, as in the real file, stored as doubles in 1 x n rows.
        mat[f"trn{s}"] = (order[:, :40].ravel() + 1.0)[None]
        mat[f"val{s}"] = (order[:, 40:60].ravel() + 1.0)[None]
        mat[f"tst{s}"] = (order[:, 60:].ravel() + 1.0)[None]
    savemat(flowers17 / "datasplits.mat", mat)

    dm = datamodule(flowers17, split=2)
    dm.setup("fit")
    assert dm.split_used.startswith("official split 2")
    assert dm.train_set.indices == sorted(int(k) - 1 for k in mat["trn2"].ravel())
    assert dm.test_set.indices == sorted(int(k) - 1 for k in mat["tst2"].ravel())
    _, label = dm.test_set.dataset[dm.test_set.indices[0]]
    assert label == dm.test_set.indices[0] // 80

    mat["val1"] = mat["trn1"]  # overlapping parts: a damaged file
    savemat(flowers17 / "datasplits.mat", mat)
    with pytest.raises(DataError, match="repeated or out-of-range"):
        datamodule(flowers17, split=1).setup("fit")
    (flowers17 / "datasplits.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(DataError, match="cannot read split 1 from .*datasplits.mat"):
        datamodule(flowers17, split=1).setup("fit")


def test_images_are_decoded_once_then_read_from_the_cache(flowers17: Path, monkeypatch):
    cache = flowers17.parent / "cache"
    first = Flowers17(flowers17, size=16, cache_dir=cache)
    assert len(list(cache.glob("flowers17-16px-*.pt"))) == 1

    def no_decoding(path, size):
        raise AssertionError(f"decoded {path} again")

    with monkeypatch.context() as patch:
        patch.setattr(flowers, "decode", no_decoding)
        second = Flowers17(flowers17, size=16, cache_dir=cache)
    assert torch.equal(first.images, second.images)

    # A replaced image invalidates the cache: its new pixels are what the dataset returns.
    replaced = flowers17 / "jpg" / "image_0005.jpg"
    replaced.write_bytes((flowers17 / "jpg" / "image_0700.jpg").read_bytes())
    os.utime(replaced, ns=(1, 1))
    third = Flowers17(flowers17, size=16, cache_dir=cache)
    assert image_number(third[4][0]) == 700


def test_missing_truncated_and_absent_images_are_named(flowers17: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    truncated = flowers17 / "jpg" / "image_0100.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DataError, match="image_0100.jpg"):
        Flowers17(flowers17, size=16, cache_dir=cache)
    (flowers17 / "jpg" / "image_0033.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 1360 images missing \(image_0033.jpg\)"):
        Flowers17(flowers17, size=16, cache_dir=cache)
    with pytest.raises(DataError, match="no Flowers-17 images in .*17flowers.tgz"):
        Flowers17(tmp_path / "empty", size=16, cache_dir=cache)


def test_download_failure_says_what_to_put_where(tmp_path: Path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(flowers, "download_and_extract_archive", offline)
    dm = datamodule(tmp_path / "flowers17", download=True)
    with pytest.raises(DataError, match=r"17flowers.tgz \(md5 b59a65d8d1a99cd66944d474e1289eab"):
        dm.prepare_data()


def test_grayscale_and_cmyk_photos_decode_to_rgb(tmp_path: Path):
    from PIL import Image

    for mode in ("L", "CMYK"):
        path = tmp_path / f"{mode}.jpg"
        Image.new(mode, (40, 30)).save(path)
        assert flowers.decode(path, 16).shape == (3, 16, 16)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="split must be 1, 2 or 3"):
        Flowers17DataModule(split=4)
    with pytest.raises(ConfigError, match="targets must be"):
        Flowers17DataModule(targets="pixels")
    with pytest.raises(ConfigError, match="does not divide"):
        Flowers17DataModule(image_size=60, patch_size=8)
    with pytest.raises(ConfigError, match="crop_scale"):
        Flowers17DataModule(crop_scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="mean and std need 3 values"):
        Flowers17DataModule(std=(0.2, 0.2))
    with pytest.raises(ConfigError, match="train_on must be 'train' or 'train\\+val'"):
        Flowers17DataModule(train_on="all")


def test_train_on_train_and_val_trains_on_both_and_says_validation_is_not_held_out(flowers17: Path):
    held_out = datamodule(flowers17)
    held_out.setup("fit")
    assert held_out.validation_held_out
    both = datamodule(flowers17, train_on="train+val")
    both.setup("fit")
    assert not both.validation_held_out
    assert both.train_set.indices == sorted(held_out.train_set.indices + held_out.val_set.indices)
    assert Counter(i // 80 for i in both.train_set.indices) == {c: 60 for c in range(17)}
    # Validation and test are the same images as before; the test stays unseen.
    assert both.val_set.indices == held_out.val_set.indices
    assert both.test_set.indices == held_out.test_set.indices
    assert set(both.train_set.indices).isdisjoint(both.test_set.indices)
    # Instance pre-training on train + val: one class per image, 1 020 of them; its k-NN monitor still
    # fits on the training split's labels and scores the validation images.
    instances = datamodule(flowers17, train_on="train+val", targets="instance")
    instances.setup("fit")
    assert instances.num_classes == len(instances.train_set) == 1020
    assert instances.knn_reference.indices == held_out.train_set.indices
    assert instances.val_set.indices == held_out.val_set.indices


def test_two_views_are_two_different_augmentations(flowers17: Path):
    dm = datamodule(flowers17, views=2)
    dm.setup("fit")
    views, label = dm.train_set[0]
    assert views.shape == (2, 3, 16, 16)  # (V, C, H, W): patches are cut per batch
    assert not torch.equal(views[0], views[1])
    patches, _ = dm.val_set[0]
    assert patches.shape == (4, 8 * 8 * 3)  # evaluation: one view
    batch, _ = dm.training_batch(next(iter(dm.train_dataloader())))
    assert batch.shape == (dm.batch_size, 2, 4, 192)  # (B, V, N, P*P*C)


@pytest.mark.parametrize("targets", ["class", "instance"])
def test_device_augmentation_of_the_cached_photos(flowers17: Path, targets: str):
    dm = datamodule(flowers17, augment_on="device", views=2, targets=targets, augment="none")
    dm.setup("fit")
    assert len(dm.train_set) == 680 and dm.batch_augment.size == 16  # crops of the 32 px cache, to 16 px
    files = [k + 1 for k in dm.splits(Flowers17(flowers17, 32, flowers17.parent / "cache"))["train"]]
    indices = torch.tensor([0, 5, 679])
    labels = dm.train_set.targets[indices]
    expected = indices if targets == "instance" else torch.tensor([flowers.label_of(files[i]) for i in indices])
    assert torch.equal(labels, expected)
    dm.trainer = type("T", (), {"training": True})()
    patches, out = dm.on_after_batch_transfer((indices, labels), 0)
    assert patches.shape == (3, 2, 4, 8 * 8 * 3) and torch.equal(out, labels)  # (B, V, N, P*P*C)
    # Each view is a crop of the right photo (the synthetic photos' colour encodes their number).
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    for view in (0, 1):
        pixels = ((unpatchify(patches[:, view], 8) * std + mean) * 255).round()  # (B, C, H, W)
        assert [image_number(image) for image in pixels] == [files[i] for i in indices]


def test_padded_crops_train_on_photos_cached_at_the_training_size(flowers17: Path):
    for augment_on in ("loader", "device"):
        dm = datamodule(flowers17, crop="pad", augment="none", augment_on=augment_on, batch_size=4)
        assert dm.cache_size == 16 and dm.crop_scale is None
        dm.setup("fit")
        if augment_on == "device":
            assert dm.batch_augment.size is None and dm.batch_augment.padding == 2  # a padded crop, as CIFAR's
            assert tuple(dm.train_set.images.shape[1:3]) == (16, 16)
        else:
            assert not any(isinstance(t, v2.RandomResizedCrop) for t in dm.train_transform.transforms)
        batch = next(iter(dm.train_dataloader()))
        dm.trainer = type("T", (), {"training": True})()
        patches, _ = dm.on_after_batch_transfer(batch, 0) if augment_on == "device" else dm.training_batch(batch)
        assert patches.shape == (4, 4, 8 * 8 * 3)
    assert datamodule(flowers17).crop_scale == (0.35, 1.0) and datamodule(flowers17).cache_size == 32
    with pytest.raises(ConfigError, match="crop must be pad or resize"):
        datamodule(flowers17, crop="centre")
    with pytest.raises(ConfigError, match="leave cache_size unset"):
        datamodule(flowers17, crop="pad", cache_size=32)


def test_instance_targets_are_dataset_indices_stable_under_shuffling(flowers17: Path):
    dm = datamodule(flowers17, targets="instance", augment="none", crop_scale=(1.0, 1.0), batch_size=100)
    assert dm.num_classes == 680 and dm.class_names is None and not dm.testable
    dm.setup("fit")
    assert dm.test_set is None and len(dm.train_set) == 680
    # Validation: k-NN on the features, the labelled training images as references, the val images as queries.
    assert dm.evaluation == "knn" and len(dm.knn_reference) == 680 and len(dm.val_set) == 340
    assert [target for _, target in (dm.knn_reference[i] for i in (0, 679))] == [dm.train_set.indices[0] // 80,
                                                                                 dm.train_set.indices[679] // 80]
    # Draw the training set twice in two shuffled orders: each image always has the same label,
    # the position of its file in the (sorted) training split.
    train_files = [i + 1 for i in dm.train_set.indices]
    for seed in (0, 1):
        loader = DataLoader(dm.train_set, batch_size=100, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        seen = {}
        for images, targets in loader:
            mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
            pixels = ((images * std + mean) * 255).round()
            for image, target in zip(pixels, targets.tolist()):
                seen[target] = image_number(image)
        assert seen == {label: file for label, file in enumerate(train_files)}


# Through the real train.py, on the real photos (a few batches of them), with a tiny ViT.
TINY_FLOWERS = [
    "--data.root", str(FLOWERS17), "--data.download", "false", "--data.image_size", "16",
    "--data.patch_size", "8", "--data.batch_size", "16", "--data.num_workers", "0",
    "--model.dim", "16", "--model.depth", "1", "--model.num_heads", "2",
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.check_val_every_n_epoch", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
]
def real_flowers(test):
    """Real photos through train.py: the slow tier, skipped without the photos."""
    missing = pytest.mark.skipif(not (FLOWERS17 / "jpg").is_dir(), reason=f"no real Flowers-17 in {FLOWERS17}")
    return pytest.mark.slow(missing(test))


@real_flowers
def test_pretrain_then_finetune_through_the_cli(tmp_path: Path):
    # IDMM: instance cross entropy on a mixed view + InfoNCE on two unmixed views, watched by k-NN.
    pretrain = train(tmp_path, "--config", str(REPO / "configs/flowers17-pretrain.yaml"), *TINY_FLOWERS,
                     "--trainer.max_epochs", "2")
    assert pretrain.returncode == 0, pretrain.stderr
    assert "Pre-training finished" in pretrain.stderr + pretrain.stdout
    assert "test/acc" not in pretrain.stdout
    backbone_ckpt = tmp_path / "data/lightning/flowers17-pretrain/last.ckpt"
    pretrained = torch.load(backbone_ckpt, weights_only=True)
    assert pretrained["hyper_parameters"]["num_classes"] == 680 and pretrained["global_step"] == 4
    events = EventAccumulator(str(tmp_path / "data/lightning/lightning_logs/version_0")).Reload()
    assert {"val/knn_acc", "train/ce", "train/contrastive"} <= set(events.Tags()["scalars"])
    assert list((tmp_path / "data/lightning/flowers17-pretrain").glob("epoch*-knn*.ckpt"))

    # A learning rate of ~0 keeps the fine-tuned backbone where init_from put it; a fresh init would
    # differ from the pre-trained weights everywhere.
    finetune = train(tmp_path, "--config", str(REPO / "configs/flowers17-finetune.yaml"), *TINY_FLOWERS,
                     "--model.init_from", str(backbone_ckpt), "--model.lr", "1e-9", "--model.min_lr", "0",
                     "--model.weight_decay", "0", "--model.layer_decay", "0.75", "--trainer.max_epochs", "1")
    assert finetune.returncode == 0, finetune.stderr
    output = finetune.stdout + finetune.stderr
    assert "Initialised the backbone from" in output and "test/acc = " in output
    tuned = torch.load(tmp_path / "data/lightning/flowers17-finetune/last.ckpt", weights_only=True)["state_dict"]
    assert tuned["model.head.weight"].shape == (17, 16)
    # Only the backbone carries over: the pre-training's projector and instance head stay behind. The
    # conv stem's BatchNorm statistics move with every training batch, whatever the rate.
    assert any(name.startswith("projector.") for name in pretrained["state_dict"])
    assert not any(name.startswith("projector.") for name in tuned)
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    backbone = {name: value for name, value in pretrained["state_dict"].items()
                if name.startswith("model.") and not name.startswith("model.head.") and not name.endswith(statistics)}
    assert backbone
    for name, value in backbone.items():
        assert torch.allclose(tuned[name], value, atol=1e-5), name


@real_flowers
def test_training_on_train_and_val_tests_the_last_weights(tmp_path: Path):
    run = train(tmp_path, "--config", str(REPO / "configs/flowers17.yaml"), *TINY_FLOWERS,
                "--data.train_on", "train+val", "--trainer.max_epochs", "2")
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert "training on train + val (1020 images)" in output
    assert "Early stopping is off" in output  # validation on trained images reaches 100 % and stays
    assert "(checkpoint: last weights)" in output  # not one chosen on images it trained on

    held_out = train(tmp_path, "--config", str(REPO / "configs/flowers17.yaml"), *TINY_FLOWERS,
                     "--trainer.max_epochs", "2", "--fresh")
    assert held_out.returncode == 0, held_out.stderr
    assert "(checkpoint: " in held_out.stdout + held_out.stderr
    assert "(checkpoint: last weights)" not in held_out.stdout + held_out.stderr
    assert "Early stopping is off" not in held_out.stdout + held_out.stderr


@real_flowers
def test_contrastive_run_logs_both_terms_and_needs_two_views(tmp_path: Path):
    run = train(tmp_path, "--config", str(REPO / "configs/flowers17-contrastive.yaml"), *TINY_FLOWERS,
                "--trainer.max_epochs", "1")
    assert run.returncode == 0, run.stderr
    events = EventAccumulator(str(tmp_path / "data/lightning/lightning_logs/version_0")).Reload()
    assert {"train/ce", "train/contrastive", "train/loss", "test/acc"} <= set(events.Tags()["scalars"])
    ce, contrastive, loss = (events.Scalars(tag)[0].value for tag in ("train/ce", "train/contrastive", "train/loss"))
    assert loss == pytest.approx(ce + 0.5 * contrastive, rel=1e-4)

    one_view = train(tmp_path, "--config", str(REPO / "configs/flowers17.yaml"), *TINY_FLOWERS,
                     "--model.contrastive_weight", "0.5", "--fresh")
    assert one_view.returncode == 2
    assert "set data.views: 2" in one_view.stderr and "Traceback" not in one_view.stderr


def test_finetune_without_a_pretrained_backbone_says_what_to_run(tmp_path: Path, flowers17: Path):
    run = train_here(tmp_path, "--config", str(REPO / "configs/flowers17-finetune.yaml"),
                     "--data.root", str(flowers17), "--data.download", "false")
    assert run.returncode == 2 and "Traceback" not in run.output
    assert "model.init_from: data/lightning/flowers17-pretrain/last.ckpt does not exist" in run.output
    assert "configs/flowers17-pretrain.yaml" in run.output
