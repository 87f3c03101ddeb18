"""classify.py, safe checkpoint loading and the TensorBoard pictures of a real (tiny) training run."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import classify
from conftest import REPO, write_image_folder
from src.data import ImageFolderDataModule
from src.inference import load_classifier
from helpers import RUN_DIR, TINY_RUN, train_here


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a finished 3-epoch train.py run on a 3-class image folder."""
    root = tmp_path_factory.mktemp("classify")
    images = write_image_folder(root / "images", classes=3, per_class=12)
    # Three epochs, pictures every 5: drawn at the first validation and at the last.
    result = train_here(root, *TINY_RUN, "--data.root", str(images), "--trainer.max_epochs", "3",
                        "--pictures.every_n_epochs", "5", "--pictures.num_images", "6")
    assert result.returncode == 0, result.output
    return root


@pytest.fixture
def in_run(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(run_dir)  # classify.py looks for data/lightning/*/last.ckpt where it is run
    return run_dir


def classify_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = classify.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_default_classifies_a_validation_image_with_its_target(in_run: Path, capsys):
    code, out, err = classify_main(capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Checkpoint: ") and "(best val/acc" in lines[0] and "epoch" in lines[0]
    assert lines[1].startswith("Predicted class: ") and lines[1].endswith(")")
    # The target is validation image 0 of the same seeded split the run trained with.
    data = ImageFolderDataModule(root=str(in_run / "images"), num_workers=0)
    data.setup()
    target = data.val_set[0][1]
    assert lines[2] == f"Target class: {target} - class_{target}"


def test_index_picks_another_sample_and_json_parses(in_run: Path, capsys):
    code, out, _ = classify_main(capsys, "--index", "2", "--json")
    assert code == 0
    report = json.loads(out)
    (entry,) = report["predictions"]
    assert entry["image"] == "validation image 2"
    probabilities = [t["probability"] for t in entry["top_k"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert entry["predicted"] == entry["top_k"][0]
    assert entry["target"]["name"] == f"class_{entry['target']['index']}"


def test_image_files_folders_and_odd_modes(in_run: Path, capsys, tmp_path: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).convert("P").save(tmp_path / "pal.gif")
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    (tmp_path / "readme.txt").write_text("not an image: skipped when a folder is given")
    folder = in_run / "images" / "class_2"
    code, out, err = classify_main(capsys, str(tmp_path), str(folder / "000.png"), str(folder),
                                   "--json", "--top-k", "2", "--batch-size", "5")
    assert code == 0, err
    predictions = json.loads(out)["predictions"]
    assert len(predictions) == 4 + 1 + 12  # 17 images in 4 batches of at most 5
    assert [Path(p["image"]).name for p in predictions[:4]] == ["cmyk.jpg", "gray.png", "pal.gif", "rgba.png"]
    assert all(len(p["top_k"]) == 2 and "target" not in p for p in predictions)
    # Batching does not change answers: the folder's first image equals the file given alone.
    assert predictions[4]["top_k"] == predictions[5]["top_k"]


def test_preprocessing_is_the_training_eval_transform(in_run: Path):
    classifier = load_classifier(in_run / RUN_DIR / "last.ckpt")
    # The run's own patch size (the CPU recipe's 8, not the DataModule's default 4).
    data = ImageFolderDataModule(root=str(in_run / "images"), num_workers=0,
                                 patch_size=classifier.hparams["patch_size"])
    data.setup()
    index = data.val_set.indices[1]
    path, _ = data.val_set.dataset.samples[index]
    assert torch.equal(classifier.preprocess(classify.load_rgb(path)), data.val_set[1][0])


def test_attention_picture(in_run: Path, capsys, tmp_path: Path):
    out_png = tmp_path / "pics" / "attention.png"
    code, out, err = classify_main(capsys, str(in_run / "images" / "class_0"), "--attention", str(out_png))
    assert code == 0, err
    assert f"Attention picture: {out_png}" in out
    with Image.open(out_png) as picture:
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 300
        # An overlay is not a blank canvas: many distinct colours.
        assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20)) > 1000


def test_export_safetensors_round_trip(in_run: Path, capsys, tmp_path: Path):
    exported = tmp_path / "model.safetensors"
    code, out, _ = classify_main(capsys, "--checkpoint", f"{RUN_DIR}/last.ckpt",
                                 "--export", str(exported))
    assert code == 0 and exported.is_file() and f"Exported weights and settings to {exported}" in out
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others, as any file the user writes
    image = str(in_run / "images" / "class_1" / "003.png")
    _, from_ckpt, _ = classify_main(capsys, image, "--json", "--checkpoint", f"{RUN_DIR}/last.ckpt")
    _, from_st, _ = classify_main(capsys, image, "--json", "--checkpoint", str(exported))
    assert json.loads(from_ckpt)["predictions"] == json.loads(from_st)["predictions"]
    _, sample, _ = classify_main(capsys, "--json", "--checkpoint", str(exported))  # dataset kept too
    assert json.loads(sample)["predictions"][0]["image"] == "validation image 0"


class CreatesFile:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_crafted_checkpoint_runs_nothing(in_run: Path, capsys, tmp_path: Path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": CreatesFile(marker)}, crafted)
    code, out, err = classify_main(capsys, "--checkpoint", str(crafted))
    assert code == 2 and out == ""
    assert "refused by safe (weights-only) loading" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    # Sanity check of the test itself: the naive load would have run it.
    torch.load(crafted, weights_only=False)
    assert marker.exists()


def test_train_py_refuses_a_crafted_last_ckpt(tmp_path: Path, image_folder: Path):
    marker = tmp_path / "pwned"
    models = tmp_path / RUN_DIR
    models.mkdir(parents=True)
    torch.save({"state_dict": {}, "epoch": CreatesFile(marker)}, models / "last.ckpt")
    result = train_here(tmp_path, *TINY_RUN, "--data.root", str(image_folder), "--trainer.max_epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.output
    assert f"cannot read {RUN_DIR}/last.ckpt" in result.output
    assert not marker.exists()


@pytest.mark.parametrize("case", ["no_checkpoint", "missing_image", "not_an_image", "truncated_image",
                                  "corrupt_checkpoint", "foreign_checkpoint", "missing_checkpoint",
                                  "index_out_of_range", "index_with_images", "empty_folder", "pretraining"])
def test_errors_are_one_clear_line(case: str, run_dir: Path, tmp_path: Path, monkeypatch, capsys):
    ckpt = str(run_dir / RUN_DIR / "last.ckpt")
    good = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    good.save(tmp_path / "good.png")
    argv, expected = {
        "no_checkpoint": ([], "no checkpoint in data/lightning/*/ yet: train one with `python train.py`"),
        "missing_image": (["--checkpoint", ckpt, "nope.png"], "nope.png does not exist"),
        "not_an_image": (["--checkpoint", ckpt, "notes.png"], "cannot read image notes.png"),
        "truncated_image": (["--checkpoint", ckpt, "cut.png"], "cannot read image cut.png"),
        "corrupt_checkpoint": (["--checkpoint", "junk.ckpt"], "junk.ckpt is not a vit-lightning checkpoint"),
        "foreign_checkpoint": (["--checkpoint", "other.ckpt"], "other.ckpt is not a vit-lightning checkpoint"),
        "missing_checkpoint": (["--checkpoint", "gone.ckpt"], "checkpoint gone.ckpt does not exist"),
        "index_out_of_range": (["--checkpoint", ckpt, "--index", "4"], "--index 4 is out of range"),
        "index_with_images": (["--checkpoint", ckpt, "--index", "1", "good.png"], "cannot be combined"),
        "empty_folder": (["--checkpoint", ckpt, "empty"], "no image files"),
        "pretraining": (["--checkpoint", "pretrain.ckpt", "good.png"], "pretrain.ckpt is a pre-training checkpoint"),
    }[case]
    monkeypatch.chdir(tmp_path)  # no data/ here
    (tmp_path / "notes.png").write_text("this is text")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    (tmp_path / "junk.ckpt").write_bytes(bytes(range(256)) * 2)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    (tmp_path / "empty").mkdir()
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["evaluation"] = "knn"  # as flowers17-pretrain.yaml's instance head has it
    torch.save(state, tmp_path / "pretrain.ckpt")
    code, out, err = classify_main(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err


@pytest.mark.slow
def test_real_entry_point_exit_code_and_no_traceback(tmp_path: Path):
    result = subprocess.run([sys.executable, str(REPO / "classify.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "python train.py" in result.stderr


def test_tensorboard_pictures_and_hparams(run_dir: Path):
    logs = run_dir / "data/lightning/lightning_logs/version_0"
    events = EventAccumulator(str(logs), size_guidance={"images": 0}).Reload()
    images = events.Tags()["images"]
    assert {"val/confusion_matrix", "val/predictions", "val/attention"} <= set(images)
    # every_n_epochs 5 in a 3-epoch run: the first validation's and the last one's (4 steps an epoch).
    assert [event.step for event in events.Images("val/attention")] == [4, 12]
    assert [event.step for event in events.Images("val/confusion_matrix")] == [4, 12]
    assert {"hp/test_acc", "hp/best_val_acc"} <= set(events.Tags()["scalars"])
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"hp/test_acc" in plugins["_hparams_/experiment"]


def test_default_checkpoint_is_the_newest_recipe_folders(tmp_path: Path):
    import os

    from src.inference import newest_last_checkpoint

    assert newest_last_checkpoint(tmp_path) is None
    for age, recipe in [(300, "models"), (100, "flowers17"), (200, "flowers17-pretrain")]:
        path = tmp_path / recipe / "last.ckpt"
        path.parent.mkdir()
        path.write_bytes(b"")
        os.utime(path, (1e9 - age, 1e9 - age))
    assert newest_last_checkpoint(tmp_path) == tmp_path / "flowers17" / "last.ckpt"


def test_pictures_take_a_bounded_share_of_the_time(monkeypatch):
    import types

    import src.callbacks
    from src.callbacks import TensorBoardPictures

    now = 1000.0
    monkeypatch.setattr(src.callbacks, "time", types.SimpleNamespace(monotonic=lambda: now))
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(broadcast=lambda value: value), current_epoch=4)
    pictures = TensorBoardPictures()
    pictures._drawing = (now - 40.0, 1.0)  # a 1 s drawing 40 s ago: another now would be 2.5 % of the time
    assert not pictures._due(trainer)
    pictures._drawing = (now - 60.0, 1.0)
    assert pictures._due(trainer)
    every_5 = TensorBoardPictures(every_n_epochs=5)  # a typed interval is kept, whatever it costs
    every_5._drawing = (now - 1.0, 1.0)
    assert every_5._due(trainer)
    resumed = TensorBoardPictures()  # nothing timed yet in this process: every 5 epochs
    assert resumed._due(trainer) and not resumed._due(types.SimpleNamespace(**{**vars(trainer), "current_epoch": 5}))
