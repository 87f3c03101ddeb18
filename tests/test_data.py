"""Data tests: patchify, splits, CIFAR-10 on a synthetic archive, image folders."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from pytorch_lightning import Trainer
from PIL import Image
from torchvision.transforms import v2

from conftest import REPO, write_image_folder
from src.data import CIFAR10DataModule, ImageFolderDataModule, PatchifyTransform
from src.data.base import ImageDataModule, stratified_split
from src.data.folder import load_rgb, square
from src.data.device import BatchAugment
from src.data.transforms import eval_transform, train_transform
from src.errors import ConfigError, DataError


# --- patchify -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, patch", [((3, 32, 32), 4), ((3, 16, 24), 8), ((1, 6, 6), 3)])
def test_patchify_round_trip_is_exact(size, patch):
    image = torch.randn(size)
    transform = PatchifyTransform(patch)
    patches = transform(image)
    C, H, W = size
    assert patches.shape == ((H // patch) * (W // patch), patch * patch * C)
    assert torch.equal(transform.inverse(patches, (H, W)), image)


def test_patchify_order_is_row_major_and_patch_contents_are_local():
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    patches = PatchifyTransform(4)(image)  # (4, 48)
    # Patch 1 is the top-right 4x4 block; its first pixel's channels come first (P, P, C order).
    assert torch.equal(patches[1, :3], image[:, 0, 4])
    assert torch.equal(patches[2].reshape(4, 4, 3).permute(2, 0, 1), image[:, 4:, :4])


def test_patchify_rejects_a_patch_that_does_not_divide_the_image():
    with pytest.raises(ConfigError, match="does not divide"):
        PatchifyTransform(5)(torch.zeros(3, 32, 32))
    with pytest.raises(ConfigError, match="does not divide"):
        eval_transform(32, 5, (0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (40, 40)))
    with pytest.raises(ConfigError, match="does not divide"):  # a DataModule says so at start-up
        ImageDataModule(patch_size=5).set_image(32, (0.5,) * 3, (0.5,) * 3)


def test_transforms_output_shapes_and_eval_is_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    ev = eval_transform(32, 4, (0.5,) * 3, (0.25,) * 3)
    assert ev(image).shape == (64, 48)
    assert torch.equal(ev(image), ev(image))
    for augment in ("randaugment", "autoaugment", "none"):
        tr = train_transform(32, (0.5,) * 3, (0.25,) * 3, augment)
        out = tr(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32  # patches are cut per batch
    with pytest.raises(ConfigError, match="augment"):
        train_transform(32, (0.5,) * 3, (0.25,) * 3, "trivial")


# --- splits ---------------------------------------------------------------------------------------

def test_stratified_split_is_exact_disjoint_stratified_and_seeded():
    targets = [c for c in range(10) for _ in range(100)]
    rest, val, test = stratified_split(targets, [100, 50], seed=1)
    assert (len(rest), len(val), len(test)) == (850, 100, 50)
    assert set(rest).isdisjoint(val) and set(rest).isdisjoint(test) and set(val).isdisjoint(test)
    assert set(rest) | set(val) | set(test) == set(range(1000))
    assert Counter(targets[i] for i in val) == {c: 10 for c in range(10)}
    assert stratified_split(targets, [100, 50], seed=1) == [rest, val, test]
    assert stratified_split(targets, [100, 50], seed=2)[1] != val


def test_stratified_split_uneven_classes_still_exact():
    targets = [0] * 7 + [1] * 3 + [2] * 11
    rest, held = stratified_split(targets, [5], seed=0)
    assert len(held) == 5 and len(rest) == 16
    with pytest.raises(ConfigError, match="cannot hold out"):
        stratified_split(targets, [21], seed=0)


# --- CIFAR-10 -------------------------------------------------------------------------------------

def test_cifar10_datamodule_on_synthetic_archive(synthetic_cifar: Path):
    dm = CIFAR10DataModule(root=str(synthetic_cifar), val_size=20, batch_size=16, num_workers=0,
                           download=False)
    assert dm.num_classes == 10 and dm.image_size == 32 and dm.class_names[6] == "frog"
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (80, 20)
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    dm.setup("test")
    assert len(dm.test_set) == 40
    x, y = dm.training_batch(next(iter(dm.train_dataloader())))
    assert x.shape == (16, 64, 48) and y.shape == (16,)
    # Validation uses the eval transform: the same image twice is the same tensor.
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    # ...and it is the right image: un-patchify + un-normalise gives back the stored pixels.
    full = dm.val_set.dataset
    i = dm.val_set.indices[0]
    image = PatchifyTransform(4).inverse(dm.val_set[0][0], 32)
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    pixels = (image * std + mean) * 255
    assert torch.allclose(pixels, torch.from_numpy(full.data[i]).permute(2, 0, 1).float(), atol=1e-3)


def test_cifar10_split_is_seeded(synthetic_cifar: Path):
    def val_indices(seed: int) -> list[int]:
        dm = CIFAR10DataModule(root=str(synthetic_cifar), val_size=20, num_workers=0, seed=seed)
        dm.setup("fit")
        return dm.val_set.indices

    torch.manual_seed(123)
    first = val_indices(0)
    torch.manual_seed(456)  # the global seed must not move the split
    assert val_indices(0) == first
    assert val_indices(1) != first


def test_cifar10_offline_error_names_archive_md5_and_folder(tmp_path: Path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(url: str, download_root: str, **kwargs):  # as torchvision does: make the folder, then fail
        Path(download_root).mkdir(parents=True, exist_ok=True)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    root = tmp_path / "mistyped" / "cifar"
    dm = CIFAR10DataModule(root=str(root), num_workers=0)
    with pytest.raises(DataError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message
    assert "c58f30108f718f92721af3b95e74349a" in message
    assert str(root) in message and "could not be downloaded" in message
    assert not (tmp_path / "mistyped").exists()  # a failed run leaves no dataset folder behind

    root.mkdir(parents=True)
    (root / "cifar-10-python.tar.gz").write_bytes(b"truncated download")
    with pytest.raises(DataError, match="incomplete or corrupt"):
        dm.prepare_data()


# --- image folders --------------------------------------------------------------------------------

def test_image_folder_holds_out_stratified_val_and_test(image_folder: Path):
    dm = ImageFolderDataModule(root=str(image_folder), val_fraction=0.25, test_fraction=0.25,
                               batch_size=4, num_workers=0)
    assert dm.class_names == ["class_0", "class_1", "class_2"] and dm.num_classes == 3
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 9, 9)
    assert Counter(dm.val_set.dataset.targets[i] for i in dm.val_set.indices) == {0: 3, 1: 3, 2: 3}
    x, y = dm.training_batch(next(iter(dm.train_dataloader())))
    assert x.shape == (4, 64, 48)


def test_image_folder_train_val_test_layout_and_resize(tmp_path: Path):
    for split, n in [("train", 6), ("val", 2), ("test", 3)]:
        write_image_folder(tmp_path / "ds" / split, classes=2, per_class=n, size=48, seed=len(split))
    dm = ImageFolderDataModule(root=str(tmp_path / "ds"), image_size=16, patch_size=8, num_workers=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 4, 6)
    assert dm.val_set[0][0].shape == (4, 192)  # 48 px resized to 16 px, 2x2 patches of 8x8x3


def test_large_jpegs_decode_at_a_reduced_scale_that_still_resizes_the_same(tmp_path: Path):
    # A 1 600 x 1 200 photo-like JPEG for a 32 px network: decoded at 1/8 (200 x 150, both sides >= 64),
    # and after the resize to 32 px within 2 grey levels of the full decode on average.
    yy, xx = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([127 + 100 * np.sin(xx / 90.0), 127 + 100 * np.cos(yy / 70.0), (xx + yy) % 256], axis=-1)
    photo = tmp_path / "ds" / "a" / "big.jpg"
    photo.parent.mkdir(parents=True)
    Image.fromarray(pixels.astype(np.uint8)).save(photo, quality=90)
    small, full = load_rgb(str(photo), size=32), load_rgb(str(photo))
    assert full.size == (1600, 1200) and small.size == (200, 150)
    assert (square(32)(small).float() - square(32)(full).float()).abs().mean() < 2.0
    # The image folder decodes its evaluation and training images so: at twice the largest size it keeps.
    (tmp_path / "ds" / "b").mkdir()
    for k in range(3):
        (tmp_path / "ds" / "a" / f"copy{k}.jpg").write_bytes(photo.read_bytes())
        (tmp_path / "ds" / "b" / f"copy{k}.jpg").write_bytes(photo.read_bytes())
    dm = ImageFolderDataModule(root=str(tmp_path / "ds"), image_size=32, patch_size=8, num_workers=0,
                               val_fraction=0.25, test_fraction=0.25, hflip=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    dm.setup()
    assert dm.val_set.dataset.loader(str(photo)).size == (200, 150)


def test_image_folder_reads_grayscale_rgba_palette_and_16_bit(tmp_path: Path):
    root = write_image_folder(tmp_path / "mixed", classes=2, per_class=2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), "L").save(root / "class_0/g.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "class_0/a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert("P").save(root / "class_1/p.png")
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(root / "class_1/d.png")
    (root / "class_1" / "notes.txt").write_text("not an image, ignored")
    dm = ImageFolderDataModule(root=str(root), val_fraction=0.2, test_fraction=0.2, num_workers=0)
    dm.setup()
    everything = [dm.train_set, dm.val_set, dm.test_set]
    assert sum(len(s) for s in everything) == 8
    for subset, shape in zip(everything, [(3, 32, 32), (64, 48), (64, 48)]):  # training: images, cut per batch
        for i in range(len(subset)):
            assert subset[i][0].shape == shape


@pytest.mark.parametrize("layout, message", [
    ({"only": 3}, "1 class folder"),
    ({}, "0 class folder"),
])
def test_image_folder_needs_two_classes(tmp_path: Path, layout, message):
    root = tmp_path / "one"
    root.mkdir()
    for name, n in layout.items():
        write_image_folder(root / "tmp", classes=1, per_class=n)
        (root / "tmp" / "class_0").rename(root / name)
        (root / "tmp").rmdir()
    with pytest.raises(DataError, match=message):
        ImageFolderDataModule(root=str(root))


def test_image_folder_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    # Found when the folder is measured (at construction), or at the latest by setup's header scan.
    root = write_image_folder(tmp_path / "empty_class", classes=2, per_class=2)
    (root / "class_2").mkdir()
    with pytest.raises(DataError, match="class_2"):
        ImageFolderDataModule(root=str(root), num_workers=0).setup()
    root = write_image_folder(tmp_path / "bad", classes=2, per_class=5)
    (root / "class_1" / "001.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot read image .*001.png"):
        ImageFolderDataModule(root=str(root), num_workers=0, val_fraction=0.5, test_fraction=0.2).setup()
    with pytest.raises(DataError, match="001.png: not an image"):  # given everything, the header scan finds it
        ImageFolderDataModule(root=str(root), num_workers=0, val_fraction=0.5, test_fraction=0.2, hflip=True,
                              mean=(0.5,) * 3, std=(0.2,) * 3).setup()
    # A file that starts like a PNG and then stops is found when it is decoded, and named.
    (root / "class_1" / "001.png").unlink()
    good = (root / "class_1" / "002.png").read_bytes()
    (root / "class_1" / "002.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="002.png"):
        dm = ImageFolderDataModule(root=str(root), num_workers=0, val_fraction=0.5, test_fraction=0.2)
        dm.setup()
        for subset in (dm.train_set, dm.val_set, dm.test_set):
            for i in range(len(subset)):
                subset[i]
    with pytest.raises(ConfigError, match="patch_size=5"):
        ImageFolderDataModule(root=str(root), patch_size=5)


def test_image_folder_val_must_have_the_same_classes(tmp_path: Path):
    write_image_folder(tmp_path / "ds" / "train", classes=3, per_class=2)
    write_image_folder(tmp_path / "ds" / "val", classes=2, per_class=2)
    with pytest.raises(DataError, match="same class folders"):
        ImageFolderDataModule(root=str(tmp_path / "ds"))


@pytest.mark.parametrize("bar", [True, False])
def test_decoding_shows_a_bar_only_when_the_trainer_shows_its_own(image_folder: Path, capsys, bar: bool):
    dm = ImageFolderDataModule(root=str(image_folder), num_workers=0, augment_on="device")
    dm.trainer = Trainer(accelerator="cpu", enable_progress_bar=bar, logger=False, enable_checkpointing=False)
    capsys.readouterr()
    dm.setup("fit")  # device augmentation decodes the training split here
    assert ("Decoding training images" in capsys.readouterr().err) == bar


@pytest.mark.slow  # a process of its own with loader workers: ~10 s
def test_a_script_that_keeps_a_loader_with_workers_still_exits(image_folder: Path, tmp_path: Path):
    """Loader workers ignore SIGTERM (so a signal to the whole job lets training save first), which is
    how Python's multiprocessing stops them at exit: a loader kept alive until then must not hang it.
    Only the project's own workers are killed at exit; a user's daemonic process still gets
    multiprocessing's SIGTERM and its own clean exit."""
    script = (
        "import multiprocessing, signal, sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from src.data import ImageFolderDataModule\n"
        "from src.data.base import is_our_loader_worker\n"
        "def user_process(flag):\n"
        "    def on_term(*_):\n"
        "        open(flag, 'w').write('terminated cleanly'); sys.exit(0)\n"
        "    signal.signal(signal.SIGTERM, on_term)\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    mine = multiprocessing.Process(target=user_process, args=(sys.argv[3],), daemon=True)\n"
        "    mine.start()\n"
        "    data = ImageFolderDataModule(root=sys.argv[2], batch_size=4, num_workers=2, augment_on='loader')\n"
        "    data.setup('fit')\n"
        "    train, val = data.train_dataloader(), data.val_dataloader()\n"
        "    next(iter(train)), next(iter(val))\n"
        "    time.sleep(0.5)  # the user's process has set its handler\n"
        "    ours = [p for p in multiprocessing.active_children() if is_our_loader_worker(p)]\n"
        "    print('iterated', len(ours), is_our_loader_worker(mine))\n"
    )
    flag = tmp_path / "user_process_flag"
    script_file = tmp_path / "keeps_loaders.py"
    script_file.write_text(script)
    done = subprocess.run([sys.executable, str(script_file), str(REPO), str(image_folder), str(flag)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "iterated 4 False" in done.stdout, done.stdout + done.stderr[-2000:]
    assert flag.read_text() == "terminated cleanly"  # not SIGKILLed by our exit handler


# --- what an image folder is measured for (src/data/facts.py) -------------------------------------

def write_shapes(root: Path, shapes: dict[str, list[tuple[slice, slice]]], per_class: int = 60,
                 size: int = 16, grayscale: bool = False) -> Path:
    """`root/<class>/*.png`: each class a bright shape (boxes of rows, columns) on noise, jittered by 1 px."""
    rng = np.random.default_rng(0)
    for name, boxes in shapes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size)).astype(np.uint8)
            for rows, cols in boxes:
                pixels[rows, cols] = 230
            pixels = np.roll(pixels, tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
            image = Image.fromarray(pixels, "L")
            (image if grayscale else image.convert("RGB")).save(root / name / f"{i:03d}.png")
    return root


def test_classes_that_are_mirror_images_of_each_other_turn_flipping_off(tmp_path: Path, caplog):
    # An "L" and its mirror image "⅃": mirroring one makes the other class.
    ell = [(slice(3, 13), slice(3, 5)), (slice(11, 13), slice(3, 10))]
    mirrored = [(slice(3, 13), slice(11, 13)), (slice(11, 13), slice(6, 13))]
    root = write_shapes(tmp_path / "pairs", {"ell": ell, "mirrored": mirrored})
    with caplog.at_level("INFO"):
        data = ImageFolderDataModule(root=str(root), image_size=16, patch_size=4, num_workers=0)
    assert data.hflip is False and data.hparams["hflip"] is False
    assert "Mirror images change their class" in caplog.text and "--data.hflip" in caplog.text
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in data.train_transform.transforms)
    assert data.device_augment().flip is False


def test_mirror_symmetric_classes_keep_flipping(tmp_path: Path, caplog):
    # A bar across and a bar down the middle: each is its own mirror image.
    root = write_shapes(tmp_path / "bars", {"across": [(slice(7, 9), slice(2, 14))],
                                            "down": [(slice(2, 14), slice(7, 9))]})
    with caplog.at_level("INFO"):
        data = ImageFolderDataModule(root=str(root), image_size=16, patch_size=4, num_workers=0)
    assert data.hflip is True and "Mirror images keep their class" in caplog.text
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in data.train_transform.transforms)
    assert data.device_augment().flip is True


def test_explicit_hflip_and_statistics_win_over_what_is_measured(tmp_path: Path, caplog):
    root = write_shapes(tmp_path / "pairs", {"left": [(slice(2, 14), slice(2, 5))],
                                             "right": [(slice(2, 14), slice(11, 14))]})
    with caplog.at_level("INFO"):
        data = ImageFolderDataModule(root=str(root), image_size=16, patch_size=4, num_workers=0, hflip=True,
                                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert data.hflip is True and data.mean == (0.5, 0.5, 0.5) and data.std == (0.25, 0.25, 0.25)
    assert "Data:" not in caplog.text and "Mirror" not in caplog.text  # nothing left to measure
    with pytest.raises(ConfigError, match="hflip must be auto, true or false"):
        ImageFolderDataModule(root=str(root), image_size=16, patch_size=4, hflip="sometimes")


def test_grayscale_statistics_are_the_training_images_own(tmp_path: Path, caplog):
    root = write_shapes(tmp_path / "gray", {"across": [(slice(7, 9), slice(2, 14))],
                                            "down": [(slice(2, 14), slice(7, 9))]}, grayscale=True)
    with caplog.at_level("INFO"):
        data = ImageFolderDataModule(root=str(root), image_size=16, patch_size=4, num_workers=0)
    assert "grayscale" in caplog.text and "16x16 px" in caplog.text and "60 per class" in caplog.text
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255)
                          for p in sorted(root.rglob("*.png"))])
    assert data.mean == pytest.approx((float(pixels.mean()),) * 3, abs=2e-3)  # one value, three channels
    assert data.std == pytest.approx((float(pixels.std()),) * 3, abs=2e-3)
    assert data.hparams["mean"] == data.mean  # kept with the checkpoints' data settings


def test_hflip_false_removes_every_mirror(image_folder: Path, monkeypatch):
    data = ImageFolderDataModule(root=str(image_folder), num_workers=0, hflip=False)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in data.train_transform.transforms)
    # The device path: a batch whose images are all mirror-asymmetric comes back unmirrored, every time.
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    images[:, :, :, :8] = 255  # bright on the left
    augment = BatchAugment(data.mean, data.std, "none", padding=4, flip=False)
    for _ in range(3):
        out = augment(images)
        assert (out[:, :, :, :4].mean(dim=(1, 2, 3)) > out[:, :, :, -4:].mean(dim=(1, 2, 3))).all()
    # ... which a flipping BatchAugment does not keep.
    flipped = BatchAugment(data.mean, data.std, "none", padding=4)(images)
    assert (flipped[:, :, :, :4].mean(dim=(1, 2, 3)) < flipped[:, :, :, -4:].mean(dim=(1, 2, 3))).any()
    # Test-time augmentation follows the data: a flip_tta recipe on data that must not mirror.
    from src.models.classifier import mirror_tta
    assert mirror_tta({"flip_tta": True, "hflip": True}) and not mirror_tta({"flip_tta": True, "hflip": False})
    assert mirror_tta({"flip_tta": True})  # checkpoints from before hflip: every run mirrored


def test_random_resized_crops_on_both_augmentation_paths(tmp_path: Path):
    big = write_image_folder(tmp_path / "photos", classes=2, per_class=8, size=80)  # 5x the 16 px training size
    padded = ImageFolderDataModule(root=str(big), image_size=16, patch_size=4, num_workers=0)
    assert padded.crop == "pad"
    assert not any(isinstance(t, v2.RandomResizedCrop) for t in padded.train_transform.transforms)
    photos = ImageFolderDataModule(root=str(big), image_size=16, patch_size=4, num_workers=0, crop="resize")
    assert any(isinstance(t, v2.RandomResizedCrop) for t in photos.train_transform.transforms)
    assert photos.device_augment().crop_scale == (0.35, 1.0)
    # Both augmentation paths give training batches at the training size.
    for augment_on in ("loader", "device"):
        data = ImageFolderDataModule(root=str(big), image_size=16, patch_size=4, num_workers=0, batch_size=4,
                                     augment_on=augment_on, crop="resize")
        data.setup("fit")
        if augment_on == "device":
            assert tuple(data.train_set.images.shape[1:3]) == (32, 32)  # kept at twice the size, for crops
            images = data.batch_augment(data.train_set.take(torch.arange(4)))
        else:
            images = torch.stack([data.train_set[i][0] for i in range(4)])
        assert images.shape == (4, 3, 16, 16)
    with pytest.raises(ConfigError, match="crop must be"):
        ImageFolderDataModule(root=str(big), image_size=16, patch_size=4, crop="zoom")


def test_an_image_folders_evaluation_images_are_decoded_once(image_folder: Path, monkeypatch):
    from src.data import ImageFolderDataModule

    dm = ImageFolderDataModule(root=str(image_folder), num_workers=0, hflip=True)
    dm.setup("fit")
    reads = []
    loader = dm.val_set.dataset.loader
    monkeypatch.setattr(dm.val_set.dataset, "loader", lambda path: reads.append(path) or loader(path))
    first = [x for x, _ in dm.val_dataloader()]
    second = [x for x, _ in dm.val_dataloader()]
    assert len(reads) == len(dm.val_set) and all(torch.equal(a, b) for a, b in zip(first, second))
    fresh = dm.eval_transform(loader(dm.val_set.dataset.samples[dm.val_set.indices[0]][0]))
    assert torch.equal(first[0][0], fresh)  # what an uncached read gives
