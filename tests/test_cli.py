"""End to end through the real `train.py` on CPU, with a tiny model and tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import classify
from bench.accuracy import RECIPES
from conftest import REPO, write_image_folder
from helpers import RUN_DIR, TINY_RUN, train, train_here
from src.cli import ViTCLI
from src.hardware import default_precision
from src.images import IMAGENET_MEAN, IMAGENET_STD
from src.data import ImageFolderDataModule
from src.data.transforms import eval_transform
from src.models.classifier import ViTClassifier


def last_step(cwd: Path) -> int:
    return torch.load(cwd / RUN_DIR / "last.ckpt", weights_only=True)["global_step"]


def test_train_resume_mismatch_fresh_and_classify(tmp_path: Path, image_folder: Path, capsys):
    """The life of a run: `python train.py` (a real process), a resume, the refusals, --fresh, classify.py."""
    run = [*TINY_RUN, "--data.root", str(image_folder)]

    first = train(tmp_path, *run, "--trainer.max_epochs", "1")
    assert first.returncode == 0, first.stderr
    models = tmp_path / RUN_DIR  # named after the image folder
    logs = tmp_path / "data/lightning/lightning_logs/version_0"
    assert (models / "last.ckpt").is_file()
    assert any(p.name.startswith("epoch000-acc") for p in models.glob("*.ckpt"))  # best, by val/acc
    assert f"dirpath: {RUN_DIR}\n" in (logs / "config.yaml").read_text()  # the folder chosen, saved with the run
    assert (f"Checkpoints: {RUN_DIR}/; TensorBoard logs: data/lightning/lightning_logs/version_0 "
            "(view them with: tensorboard --logdir data/lightning)") in first.stderr
    assert "LeafSpec" not in first.stderr and "Tip:" not in first.stderr  # Lightning's noise is filtered
    events = EventAccumulator(str(logs)).Reload()
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "test/loss",
            "lr-AdamW/pg1"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 4  # one point per step (log_every_n_steps=1)
    assert "test/acc =" in first.stdout + first.stderr
    steps_one_epoch = last_step(tmp_path)  # 29 train images / batch 8 = 4 steps
    assert steps_one_epoch == 4
    check_checkpoint_rebuilds_model_and_preprocessing(models / "last.ckpt", image_folder)

    second = train_here(tmp_path, *run, "--trainer.max_epochs", "3")
    assert second.returncode == 0, second.output
    assert f"Resuming from {RUN_DIR}/last.ckpt (saved in epoch 0, global step 4)" in second.output
    assert last_step(tmp_path) == 3 * steps_one_epoch  # continued, did not start over
    state = torch.load(models / "last.ckpt", weights_only=True)
    assert state["lr_schedulers"][0]["last_epoch"] == 3 * steps_one_epoch  # schedule continued
    assert state["optimizer_states"][0]["state"][0]["step"] == 3 * steps_one_epoch  # AdamW moments too
    assert any(key.startswith("EarlyStopping") for key in state["callbacks"])
    # What an exact resume needs: the random state and the training data's position.
    assert "ExactResume" in state["callbacks"] and state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert "predates exact resume" not in second.output
    # The resumed run writes into the same TensorBoard run, so the curves continue.
    assert sorted(p.name for p in logs.parent.iterdir()) == ["version_0"]
    assert len(list(logs.glob("events.out.tfevents.*"))) > 2

    mismatch = train_here(tmp_path, *run, "--trainer.max_epochs", "4", "--model.dim", "32")
    assert mismatch.returncode == 2
    assert "Traceback" not in mismatch.output
    last_line = mismatch.output.strip().splitlines()[-1]
    assert "different model or data: dim=16 (here: 32)" in last_line and "--fresh" in last_line
    assert last_step(tmp_path) == 3 * steps_one_epoch  # nothing was overwritten

    # Same shapes, other classes, and a folder of the same name: resuming would relabel the outputs.
    other = write_image_folder(tmp_path / "other" / "images", classes=3, per_class=12, seed=1)
    for c in range(3):
        (other / f"class_{c}").rename(other / f"kind_{c}")
    relabel = train_here(tmp_path, *TINY_RUN, "--data.root", str(other), "--trainer.max_epochs", "4")
    assert relabel.returncode == 2 and "Traceback" not in relabel.output
    assert "class_names=['class_0', 'class_1', 'class_2'] (here: ['kind_0'" in relabel.output
    assert "Resuming" not in relabel.output  # never announced for a run that does not start

    # With every checkpoint unreadable, one clear line too (the files are put back afterwards;
    # the fallback to another readable checkpoint is in test_reliability.py).
    saved = {path: path.read_bytes() for path in models.glob("*.ckpt")}
    for path, good in saved.items():
        path.write_bytes(good[: len(good) // 2])
    torn = train_here(tmp_path, *run, "--trainer.max_epochs", "4")
    assert torn.returncode == 2 and "Traceback" not in torn.output
    assert f"cannot read {RUN_DIR}/last.ckpt" in torn.output.strip().splitlines()[-1]
    for path, good in saved.items():
        path.write_bytes(good)

    # classify.py, with no --checkpoint, answers from this run's best checkpoint.
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert classify.main([str(next((image_folder / "class_1").iterdir()))]) == 0
    out = capsys.readouterr().out
    assert f"{RUN_DIR}/epoch" in out and "Predicted class: " in out and "class_" in out

    fresh = train_here(tmp_path, *run, "--trainer.max_epochs", "1", "--model.dim", "32", "--fresh")
    assert fresh.returncode == 0, fresh.output
    assert "Resuming" not in fresh.output
    kept = [p for p in models.parent.iterdir() if p.name.startswith(f"{RUN_DIR.name}-")]
    assert len(kept) == 1 and (kept[0] / "last.ckpt").is_file()  # the old run is moved, not deleted
    assert last_step(tmp_path) == steps_one_epoch


def test_each_dataset_gets_its_own_checkpoint_folder(tmp_path: Path, image_folder: Path):
    """Runs on two image folders never share a folder; an explicit --checkpoint.dirpath wins; an old
    data/lightning/models run is pointed to, not resumed by surprise."""
    other = write_image_folder(tmp_path / "flowers" / "train", classes=2, per_class=10)
    legacy = tmp_path / "data/lightning/models"
    legacy.mkdir(parents=True)
    (legacy / "last.ckpt").write_bytes(b"an old run")
    a = train_here(tmp_path, *TINY_RUN, "--data.root", str(image_folder), "--trainer.max_epochs", "1")
    assert a.returncode == 0, a.output
    assert "data/lightning/models/ holds a run of an earlier version" in a.output
    assert "--checkpoint.dirpath data/lightning/models" in a.output
    b = train_here(tmp_path, *TINY_RUN, "--data.root", str(other.parent), "--trainer.max_epochs", "1")
    assert b.returncode == 0, b.output  # a 2-class run beside a 3-class one: nothing to refuse
    assert (tmp_path / "data/lightning/flowers/last.ckpt").is_file()  # `.../flowers/train` is named flowers
    c = train_here(tmp_path, *TINY_RUN, "--data.root", str(other.parent), "--trainer.max_epochs", "1",
                   "--checkpoint.dirpath", "runs/mine")
    assert c.returncode == 0, c.output
    assert (tmp_path / "runs/mine/last.ckpt").is_file()
    assert (legacy / "last.ckpt").read_bytes() == b"an old run"


def as_written_before_timms_names(checkpoint: dict) -> dict:
    """A checkpoint as train.py wrote it before the renaming: the ViT's patch projection, class token
    and positions under `embed.`, no in_channels setting, no mixing options on the DataModule."""
    def old(key: str) -> str:
        for new, was in [("model.patch_embed.proj.weight", "model.embed.proj.proj.weight"),
                         ("model.patch_embed.proj.bias", "model.embed.proj.proj.bias"),
                         ("model.patch_embed.", "model.embed.proj."), ("model.cls_token", "model.embed.cls_token"),
                         ("model.pos_embed", "model.embed.pos_embed")]:
            if key.startswith(new):
                return was + key.removeprefix(new)
        return key
    state = {old(k): v for k, v in checkpoint["state_dict"].items()}
    assert "model.embed.proj.convs.0.0.weight" in state and "model.embed.cls_token" in state  # the conv stem's layout
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k not in ("in_channels", "hflip")}
    data = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if "mix" not in k and k != "hflip"}
    data.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)  # an image folder's default then
    # Nor the random state or the data position that exact resume adds.
    callbacks = {k: v for k, v in checkpoint["callbacks"].items() if k != "ExactResume"}
    loops = {**checkpoint["loops"], "fit_loop": {**checkpoint["loops"]["fit_loop"], "state_dict": {}}}
    return {**checkpoint, "state_dict": state, "hyper_parameters": hparams, "datamodule_hyper_parameters": data,
            "callbacks": callbacks, "loops": loops}


def test_checkpoints_from_before_timms_names_resume_and_classify(tmp_path: Path, image_folder: Path, capsys):
    run = [*TINY_RUN, "--data.root", str(image_folder)]
    assert train_here(tmp_path, *run, "--trainer.max_epochs", "1").returncode == 0
    last = tmp_path / RUN_DIR / "last.ckpt"
    torch.save(as_written_before_timms_names(torch.load(last, weights_only=True)), last)
    old = tmp_path / "old.ckpt"
    old.write_bytes(last.read_bytes())

    capsys.readouterr()
    assert classify.main(["--checkpoint", str(old), str(next((image_folder / "class_1").iterdir()))]) == 0
    assert "class_" in capsys.readouterr().out
    model = ViTClassifier.load_from_checkpoint(old, weights_only=True, map_location="cpu")
    assert torch.equal(model.model.cls_token, torch.load(old, weights_only=True)["state_dict"]["model.embed.cls_token"])

    resumed = train_here(tmp_path, *run, "--trainer.max_epochs", "2")
    assert resumed.returncode == 0, resumed.output
    assert "Resuming from" in resumed.output and last_step(tmp_path) == 8  # 4 steps an epoch, continued
    assert "Note: this checkpoint predates exact resume" in resumed.output
    # Its data goes on as it began: mirrored, ImageNet's statistics; nothing is measured again.
    assert "Data:" not in resumed.output and "--data.hflip true" in resumed.output
    resumed_data = torch.load(last, weights_only=True)["datamodule_hyper_parameters"]
    assert resumed_data["hflip"] is True and tuple(resumed_data["mean"]) == IMAGENET_MEAN
    assert "model.patch_embed.proj.weight" in torch.load(last, weights_only=True)["state_dict"]  # saved in today's names


def check_checkpoint_rebuilds_model_and_preprocessing(path: Path, image_folder: Path) -> None:
    """The checkpoint alone gives the network and the exact eval preprocessing of its data."""
    model = ViTClassifier.load_from_checkpoint(path, weights_only=True, map_location="cpu").eval()
    hp = model.hparams
    assert hp.class_names == ["class_0", "class_1", "class_2"] and hp.num_classes == 3
    data = ImageFolderDataModule(root=str(image_folder), num_workers=0, patch_size=hp.patch_size)
    image = Image.open(next((image_folder / "class_1").iterdir()))
    rebuilt = eval_transform(hp.image_size, hp.patch_size, hp.mean, hp.std)(image)
    assert torch.equal(rebuilt, data.eval_transform(image))
    assert model(rebuilt[None]).shape == (1, 3)


def test_last_ckpt_follows_every_epoch_even_on_a_plateau(tmp_path: Path, image_folder: Path):
    """With a learning rate too small to change val/acc, the best checkpoint stays at epoch 0 but
    last.ckpt must still hold the final step (Lightning 2.6's save_last alone would not)."""
    result = train_here(tmp_path, *TINY_RUN, "--data.root", str(image_folder), "--trainer.max_epochs", "3",
                        "--model.lr", "1e-12", "--model.min_lr", "0")
    assert result.returncode == 0, result.output
    models = tmp_path / RUN_DIR
    assert sorted(p.name for p in models.iterdir())[0].startswith("epoch000-acc")
    assert len(list(models.iterdir())) == 2  # the best and last.ckpt, nothing else
    assert last_step(tmp_path) == 3 * 4


def test_a_run_without_validation_trains_and_tests_the_last_weights(tmp_path: Path, image_folder: Path):
    result = train_here(tmp_path, *TINY_RUN, "--data.root", str(image_folder), "--trainer.max_epochs", "1",
                        "--trainer.limit_val_batches", "0")
    assert result.returncode == 0, result.output
    assert "Early stopping is off: there is no validation" in result.output
    assert "(checkpoint: last weights)" in result.output


def test_fast_dev_run_neither_resumes_nor_leaves_a_checkpoint(tmp_path: Path, image_folder: Path):
    result = train_here(tmp_path, *TINY_RUN, "--data.root", str(image_folder), "--trainer.fast_dev_run", "true")
    assert result.returncode == 0, result.output
    assert not (tmp_path / RUN_DIR / "last.ckpt").exists()


def test_print_config_shows_the_default_recipe(tmp_path: Path):
    result = train_here(tmp_path, "--print_config")
    assert result.returncode == 0, result.output
    assert "class_path: src.data.CIFAR10DataModule" in result.output
    assert "monitor: val/acc" in result.output and "filename: last" in result.output
    assert not (tmp_path / "data").exists()  # printing the config downloads and writes nothing


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_parses(tmp_path: Path, config: str):
    # A misspelt or retired key in a recipe fails here, not after a user's download.
    result = train_here(tmp_path, "--config", str(REPO / "configs" / config), "--print_config")
    assert result.returncode == 0, result.output
    assert "class_path: src.data." in result.output


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_accuracy_bench_run_builds(tmp_path: Path, monkeypatch, name: str):
    # bench/accuracy.py's flag sets ride on today's configs: a retired or conflicting flag fails
    # here, not 20 minutes into a benchmark.
    config, flags = RECIPES[name]
    monkeypatch.chdir(tmp_path)
    cli = ViTCLI(args=["--config", str(REPO / config), *flags, "--trainer.logger", "false",
                       "--model.compile", "false"])  # not what is checked here, and a real probe compiles
    cli.build()
    assert isinstance(cli.model, ViTClassifier)


def cpu_machine(monkeypatch, amx: bool = False, avx512_bf16: bool = False) -> None:
    """Pretend to be a machine with no CUDA or MPS and a CPU with the given bf16 units."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected, reason",
    [
        (True, True, "bf16-mixed", "AMX"),  # Intel Xeon (Sapphire Rapids and later): AMX and AVX-512 BF16
        (False, True, "bf16-mixed", "AVX-512 BF16"),  # AMD EPYC Zen 4 and later, Intel Cooper Lake
        (False, False, "32-true", "without AMX or AVX-512 BF16"),  # AVX2 CPUs: bf16 would be 15x slower
    ],
)
def test_cpu_precision_follows_its_bf16_units(monkeypatch, amx, avx512_bf16, expected, reason):
    cpu_machine(monkeypatch, amx, avx512_bf16)
    for accelerator in ("auto", "cpu"):
        precision, why = default_precision(accelerator)
        assert precision == expected and reason in why


def test_gpu_and_mps_precision(monkeypatch):
    cpu_machine(monkeypatch, amx=True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert default_precision("auto")[0] == "32-true"  # Apple silicon: auto picks MPS, which stays float32
    assert default_precision("cpu")[0] == "bf16-mixed"  # the CPU asked for by name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert default_precision("auto")[0] == "bf16-mixed"
    assert default_precision("mps")[0] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert default_precision("gpu")[0] == "16-mixed"


def print_config(monkeypatch, capsys, caplog, *args: str) -> tuple[str, str]:
    """`python train.py ARGS --print_config` in this process (so CUDA can be mocked): (config, log)."""
    monkeypatch.chdir(REPO)
    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as done:
        ViTCLI(args=[*args, "--print_config"])
    assert done.value.code in (0, None)
    return capsys.readouterr().out, caplog.text


@pytest.mark.parametrize("cuda", [False, True])
def test_default_recipe_follows_the_hardware(monkeypatch, capsys, caplog, cuda: bool):
    cpu_machine(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config, log = print_config(monkeypatch, capsys, caplog)
    recipe, dim = ("cifar10.yaml", 256) if cuda else ("cifar10-cpu.yaml", 128)
    assert f"Recipe: configs/{recipe} ({'a CUDA GPU' if cuda else 'no CUDA GPU'}" in log
    assert f"  dim: {dim}\n" in config
    if cuda:  # on a CUDA machine, asking for the CPU gets the CPU recipe
        config, log = print_config(monkeypatch, capsys, caplog, "--trainer.accelerator", "cpu")
        assert "Recipe: configs/cifar10-cpu.yaml" in log and "  dim: 128\n" in config


@pytest.mark.parametrize("cuda", [False, True])
def test_an_explicit_config_always_wins(monkeypatch, capsys, caplog, cuda: bool):
    cpu_machine(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for config, dim in (("configs/cifar10.yaml", 256), ("configs/cifar10-cpu.yaml", 128)):
        printed, log = print_config(monkeypatch, capsys, caplog, "--config", config)
        assert "Recipe:" not in log and f"  dim: {dim}\n" in printed


def test_a_full_disk_in_the_logs_is_one_clear_line(tmp_path: Path, image_folder: Path, monkeypatch):
    import errno

    from src.callbacks import TensorBoardPictures

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TensorBoardPictures, "_draw", full)
    result = train_here(tmp_path, *TINY_RUN, "--data.root", str(image_folder), "--trainer.max_epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.output
    assert "error: could not write the logs (the disk is full" in result.output.strip().splitlines()[-1]
