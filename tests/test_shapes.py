"""`shape: auto`: the network's image size, width and depth fit the budget, the data and the step time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO, write_image_folder
from src import shapes
from src.cli import ViTCLI
from src.runs import repeat_choices

# A step time per shape, as a machine might measure it: relative costs like the AVX2 EPYC's.
COST = {"s32": 0.12, "s48": 0.24, "m32": 0.28, "s64": 0.47}


def fake_step(shape: shapes.Shape) -> float:
    return COST[shape.name]


def family_member(settings: dict) -> shapes.Shape:
    """The shape of the family that a probed network's `settings` are."""
    return next(s for s in shapes.FAMILY
                if (s.image_size, s.dim, s.depth) == (settings["image_size"], settings["dim"], settings["depth"]))


def test_a_longer_budget_gets_a_larger_shape_and_a_shorter_one_a_smaller():
    chosen = {minutes: shapes.choose(60 * minutes, 1000, 500, fake_step, 128).shape.name for minutes in (1, 15, 60)}
    order = [shape.name for shape in shapes.FAMILY]
    assert order.index(chosen[1]) < order.index(chosen[15]) < order.index(chosen[60])
    assert chosen[1] == "s32" and chosen[60] == "s64"


def test_a_few_hundred_images_need_the_steps_too():
    # 300 images are 3 steps an epoch: in 400 s s64 trains 205 epochs, but 616 steps; every shape but s32
    # falls short of MIN_STEPS, so s32 it is, where 1 000 images (8 steps) get s64 at the same step times.
    few = shapes.choose(400, 300, 500, fake_step, 128)
    assert few.epochs["s64"] >= shapes.MIN_EPOCHS and few.epochs["s64"] * 3 < shapes.MIN_STEPS
    assert few.shape.name == "s32" and "1800 steps" in str(few)
    assert shapes.choose(1800, 1000, 500, fake_step, 128).shape.name == "s64"


def test_a_slower_machine_gets_a_smaller_shape_for_the_same_budget():
    fast = shapes.choose(1200, 1000, 500, fake_step, 128).shape
    slow = shapes.choose(1200, 1000, 500, lambda shape: 4 * fake_step(shape), 128).shape
    assert shapes.FAMILY.index(slow) < shapes.FAMILY.index(fast)


def test_the_image_size_never_exceeds_the_datas_own():
    small = shapes.choose(10 ** 6, 1000, 28, fake_step, 128)
    assert {name for name in small.epochs} == {"s32", "m32"}  # 32 px is the smallest the family has
    assert small.shape.image_size == 32
    assert shapes.choose(10 ** 6, 1000, 48, fake_step, 128).shape.name == "s48"  # pixels before width
    assert shapes.choose(10 ** 6, 1000, 32, fake_step, 128).shape.name == "m32"


def test_the_probe_times_a_real_training_step():
    settings = {"num_classes": 3, "image_size": 16, "patch_size": 8, "dim": 16, "depth": 1, "num_heads": 2,
                "tokenizer": "conv", "global_pool": "avg", "stem_width": 8}
    small = shapes.step_seconds(settings, 8, "32-true", torch.device("cpu"), True)
    large = shapes.step_seconds({**settings, "dim": 128, "depth": 4, "image_size": 64}, 64, "32-true",
                                torch.device("cpu"), True)
    assert 0 < small < large


def test_budget_seconds_reads_every_form_of_max_time():
    import datetime

    assert shapes.budget_seconds("00:01:02:03") == 3723
    assert shapes.budget_seconds({"minutes": 3}) == 180
    assert shapes.budget_seconds(datetime.timedelta(seconds=90)) == 90
    assert shapes.budget_seconds(None) is None


def cli(folder: Path, *flags: str) -> ViTCLI:
    return ViTCLI(args=["--config", str(REPO / "configs/cifar10-cpu.yaml"), "--data", "ImageFolderDataModule",
                        "--data.root", str(folder), "--data.num_workers", "0", "--trainer.logger", "false",
                        "--model.compile", "false", *flags])


def flowers17_cli(root: Path, *flags: str) -> ViTCLI:
    return ViTCLI(args=["--config", str(REPO / "configs/flowers17.yaml"), "--data.root", str(root),
                        "--data.download", "false", "--data.num_workers", "0", "--trainer.logger", "false",
                        "--model.compile", "false", *flags])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "photos", classes=2, per_class=10, size=80)


@pytest.fixture
def probed(monkeypatch) -> list[str]:
    """The shapes the run measured (with `fake_step`'s times instead of real steps)."""
    measured: list[str] = []

    def step_seconds(settings: dict, *args) -> float:
        shape = family_member(settings)
        measured.append(shape.name)
        return fake_step(shape) / 100  # 16 training images: every shape trains 100 epochs
    monkeypatch.setattr(shapes, "step_seconds", step_seconds)
    return measured


def test_auto_resolves_into_the_saved_config_and_says_why(monkeypatch, tmp_path: Path, photos: Path, probed, caplog):
    monkeypatch.chdir(tmp_path)
    run = cli(photos, "--trainer.max_time", "00:00:10:00")
    run.build()
    assert sorted(probed) == sorted(shape.name for shape in shapes.FAMILY)  # 80 px photos: all four
    assert run.config.shape == "s64"
    assert (run.config.data.init_args.image_size, run.config.model.dim) == (64, 128)
    assert run.datamodule.image_size == 64 and run.model.hparams.image_size == 64
    assert "Shape: s64 (64 px, dim 128, depth 4)" in caplog.text and "--shape" in caplog.text


@pytest.mark.parametrize("flags, shape, image_size, dim", [
    (["--model.dim", "64", "--model.num_heads", "2"], "recipe", 32, 64),  # a typed shape flag: no choice at all
    (["--data.image_size", "48"], "recipe", 48, 128),
    (["--shape", "m32"], "m32", 32, 192),  # a family member by name, not measured
    (["--shape", "recipe"], "recipe", 32, 128),
    ([], "recipe", 32, 128),  # no budget: the recipe's network
])
def test_an_explicit_shape_wins(monkeypatch, tmp_path: Path, photos: Path, probed, flags, shape, image_size, dim):
    monkeypatch.chdir(tmp_path)
    budget = ["--trainer.max_time", "00:00:10:00"] if flags else []
    run = cli(photos, *budget, *flags)
    run.build()
    assert probed == []
    assert run.config.shape == shape
    assert (run.datamodule.image_size, run.model.hparams.dim) == (image_size, dim)


def test_a_resumed_run_keeps_its_checkpoints_shape(monkeypatch, tmp_path: Path, photos: Path, probed, caplog):
    monkeypatch.chdir(tmp_path)
    run = cli(photos, "--trainer.max_time", "00:00:10:00")
    repeat_choices(run.config, {"hyper_parameters": {"image_size": 48, "dim": 128, "depth": 4, "num_heads": 4},
                                "datamodule_hyper_parameters": {"image_size": 48}})
    run.build()
    assert probed == [] and run.config.shape == "s48" and run.datamodule.image_size == 48
    assert "--shape s48" in caplog.text


@pytest.mark.parametrize("budget, shape, size", [("00:00:03:00", "s32", 32), ("00:00:30:00", "s64", 64)])
def test_the_flowers17_recipe_fits_its_shape_to_the_budget(monkeypatch, tmp_path: Path, flowers17_pristine: Path,
                                                           budget, shape, size):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shapes, "step_seconds", lambda settings, *args: fake_step(family_member(settings)))
    run = flowers17_cli(flowers17_pristine, "--trainer.max_time", budget)
    run.build()
    assert run.config.shape == shape
    # Padded crops of photos decoded at the chosen size, by the network of that size.
    assert (run.datamodule.image_size, run.datamodule.cache_size, run.datamodule.crop_scale) == (size, size, None)
    assert (run.model.hparams.image_size, run.model.hparams.dim) == (size, 128)


def test_the_flowers17_recipe_without_a_budget_is_its_own_network(monkeypatch, tmp_path: Path, flowers17_pristine: Path,
                                                                  probed):
    monkeypatch.chdir(tmp_path)
    run = flowers17_cli(flowers17_pristine)
    run.build()
    assert probed == [] and run.config.shape == "recipe"
    assert (run.datamodule.image_size, run.model.hparams.dim, run.model.hparams.depth) == (64, 192, 6)
