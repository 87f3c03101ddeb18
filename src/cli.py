"""The training command line: LightningCLI with the project's arguments, defaults and links.

Configuration only. What a run does with it (resume or start fresh, checks, which checkpoint to
test) is src/runs.py, called in order by train.py.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from jsonargparse import ActionYesNo, ArgumentError
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from src.callbacks import (AnnealedEarlyStopping, ExactResume, KeepLoggerVersion, StepCheckpoint, StopOnSignal,
                           TensorBoardPictures, TimeBudget)
from src.checkpoints import SafeCheckpointIO
import src.data  # noqa: F401  (registers the DataModules, so `--data ImageFolderDataModule` resolves)
from src.data.base import ImageDataModule, resolved_choices
from src.errors import ConfigError, UserError
from src.hardware import default_precision, default_recipe, fused_attention, run_device
from src.models.classifier import ViTClassifier, compile_unavailable
from src.models.vit import SETTINGS_DEFAULTS
from src import compiling, shapes

ROOT_DIR = "data/lightning"

# Lightning's own noise that no user of train.py can act on: its use of a torch API that torch has
# deprecated, a warning that a resumed run's checkpoint folder is not empty (it holds what is resumed),
# one about the clock of a budget a resumed run no longer has, and an advertisement. Warnings a user
# can act on are left alone.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# A run resumed without the --trainer.max_time it was saved with has no Timer to restore: nothing is lost.
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`.*callbacks: \['Timer'\]\.$")
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip"))

# Values the model must agree with the data on; the DataModule is the single source of each.
LINKED_FROM_DATA = ("num_classes", "class_names", "image_size", "patch_size", "mean", "std", "evaluation", "hflip")
# Recipe options of the model that the DataModule carries out (it mixes batches before cutting patches),
# as {data option: (model option, how the data's value follows from the model's)}. With a contrastive
# term the DataModule keeps the views unmixed beside the mixed copy the cross entropy learns from.
LINKED_TO_DATA = {"mixup_alpha": ("mixup_alpha", None), "cutmix_alpha": ("cutmix_alpha", None),
                  "keep_unmixed": ("contrastive_weight", lambda weight: weight > 0)}


class ViTCLI(LightningCLI):
    """`python train.py`'s arguments: parse config + flags; `build()` then makes the objects."""

    def __init__(self, **kwargs: Any) -> None:
        self.given: set[str] = set()  # the flags on the command line (not from a config file)
        super().__init__(
            ViTClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            run=False,
            auto_configure_optimizers=False,  # ViTClassifier owns its optimiser groups and schedule
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},  # errors become one ConfigError line, not usage + exit
            trainer_defaults={
                "accelerator": "auto",
                "max_epochs": 100,
                "log_every_n_steps": 10,
                "default_root_dir": ROOT_DIR,
                "logger": {
                    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                    # hparams go to the HPARAMS tab with the final metrics (TensorBoardPictures),
                    # not with a placeholder hp_metric at the start.
                    "init_args": {"save_dir": ROOT_DIR, "default_hp_metric": False},
                },
                "callbacks": [KeepLoggerVersion(), StopOnSignal(), TimeBudget(), ExactResume()],
            },
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        """Parse the command line (or `args`); without --config, the recipe for this machine's hardware."""
        args = sys.argv[1:] if args is None else list(args)
        self.given = {a.split("=", 1)[0] for a in args if a.startswith("--")}  # the flags typed, not the configs'
        for name, (source, _) in LINKED_TO_DATA.items():  # a link overrides its target silently: say so
            if f"--data.{name}" in self.given or f"--data.init_args.{name}" in self.given:
                raise ConfigError(f"--data.{name} is set by --model.{source} (part of the model's recipe); pass that")
        if "--config" not in self.given:
            recipe, why = default_recipe(flag_value(args, "--trainer.accelerator") or "auto")
            rank_zero_info(f"Recipe: configs/{recipe.name} ({why}); choose another with --config")
            args = ["--config", str(recipe), *args]
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as error:
            message = str(error)  # train.py prints it on one line
            if message.startswith("Problems parsing config"):  # a YAML syntax error: say which file
                configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
                message = f"{', '.join(configs)}: {message}"
            raise ConfigError(f"{message} (see python train.py --help)") from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--fresh",
            action=ActionYesNo,
            default=False,
            help="Start a new run even if last.ckpt exists; the old checkpoints are moved aside, not deleted.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": None,  # data/lightning/<the data's name> (run_folder)
                "checkpoint.filename": "epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
            }
        )
        # Since Lightning 2.6, save_last=True rewrites last.ckpt only in epochs that also save a top-k
        # checkpoint, i.e. only when val/acc improves; a crash after a plateau would lose every epoch
        # since. A second ModelCheckpoint without a monitor rewrites last.ckpt after every validation.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        # Off by default. `--step_checkpoint.every_n_train_steps N` also rewrites last.ckpt every N steps,
        # bounding what a kill -9 or a power cut can lose to N steps, at the cost of one write each time.
        parser.add_lightning_class_args(StepCheckpoint, "step_checkpoint")
        parser.set_defaults(
            {
                "step_checkpoint.filename": "last",
                "step_checkpoint.monitor": None,
                "step_checkpoint.save_top_k": 1,
                "step_checkpoint.enable_version_counter": False,
                "step_checkpoint.every_n_train_steps": 0,
                "step_checkpoint.every_n_epochs": 0,
            }
        )
        parser.link_arguments("checkpoint.dirpath", "step_checkpoint.dirpath")
        parser.add_lightning_class_args(AnnealedEarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.patience": 20})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(TensorBoardPictures, "pictures")
        parser.add_argument(
            "--shape",
            type=str,
            default="recipe",
            help="The network's image size, width and depth: 'recipe' (the config's values), 'auto' (with "
            "--trainer.max_time, chosen for the budget, the data and this machine's step time from a measured "
            f"family; the CPU recipes' setting) or a member of that family: {', '.join(shapes.BY_NAME)}.",
        )
        parser.add_argument(
            "--ema",
            type=float,
            default=0.0,
            help="Decay of an exponential moving average of the weights (Lightning's EMAWeightAveraging), "
            "e.g. 0.999; 0 = off. Validation, the saved checkpoints, the test and classify.py use the average.",
        )
        for name in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        for name, (source, compute) in LINKED_TO_DATA.items():
            parser.link_arguments(f"model.{source}", f"data.init_args.{name}", compute_fn=compute)

    def before_instantiate_classes(self) -> None:
        config = self.config
        if not 0.0 <= config.ema < 1.0:
            raise ConfigError(f"--ema is a decay in [0, 1) (0 = off), got {config.ema}")
        if config.checkpoint.dirpath is None:
            folder = run_folder(config.data)
            for name in ("checkpoint", "last_checkpoint", "step_checkpoint"):
                config[name].dirpath = folder
            legacy = Path(ROOT_DIR) / "models"
            if not (Path(folder) / "last.ckpt").exists() and (legacy / "last.ckpt").exists():
                rank_zero_info(f"Note: {legacy}/ holds a run of an earlier version, when every dataset shared "
                               f"that folder; this run's is {folder}/. To resume that run, pass "
                               f"--checkpoint.dirpath {legacy}")
        if config.trainer.precision is None:
            config.trainer.precision, why = default_precision(config.trainer.accelerator)
            rank_zero_info(f"Precision: {config.trainer.precision} ({why}); override with --trainer.precision")
        if config.trainer.max_time and "--trainer.max_time" in self.given and "--trainer.max_epochs" not in self.given:
            # A budget typed on the command line sets the length: the recipe's epoch count stops capping it.
            rank_zero_info(f"Time budget {config.trainer.max_time}: training and its learning-rate schedule fill "
                           f"it (the recipe's max_epochs {config.trainer.max_epochs} no longer caps it)")
            config.trainer.max_epochs = -1

    def instantiate_classes(self) -> None:
        """Deferred: LightningCLI builds everything right after parsing; train.py calls `build` once it
        has decided whether the run resumes (a resumed run reuses its TensorBoard version)."""

    def build(self) -> None:
        """The DataModule, the model and the Trainer from the parsed config (`self.datamodule`, ...)."""
        self.choose_shape()
        try:
            super().instantiate_classes()
        except Exception as error:
            # jsonargparse wraps constructor errors in its own; surface ours as they were raised.
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
        self.choose_compile()  # after the classes have checked their settings: it times their network
        self.best_checkpoint: ModelCheckpoint = self._get(self.config_init, "checkpoint")
        if "--model.warmup_epochs" in self.given:  # the user's warm-up, not capped by the budget
            for callback in self.trainer.callbacks:
                if isinstance(callback, TimeBudget):
                    callback.warmup_share = None
        # What the DataModule resolved from its data (mirroring, normalisation) goes into the run's saved
        # config.yaml in place of "auto", so the record says what the run did.
        settings = self.config.data.init_args
        for key, value in resolved_choices(dict(self.datamodule.hparams)).items():
            if key in settings:
                settings[key] = value

    def choose_shape(self) -> None:
        """Resolve `--shape` into the config's image size, width and depth (src/shapes.py), and say so.
        A resumed run arrives here with its checkpoint's shape (src.runs.repeat_choices)."""
        config = self.config
        if config.shape not in ("auto", "recipe", *shapes.BY_NAME):
            raise ConfigError(f"--shape must be auto, recipe or one of {', '.join(shapes.BY_NAME)}, got {config.shape!r}")
        typed = [flag for flag in shapes.SHAPE_FLAGS
                 if flag in self.given or flag.replace("--data.", "--data.init_args.") in self.given]
        if config.shape == "recipe":
            return
        if config.shape in shapes.BY_NAME:
            shape = shapes.BY_NAME[config.shape]
        else:
            shape, why = self.shape_for_budget(typed)
            rank_zero_info(why)
            if shape is None:
                config.shape = "recipe"
                return
        data = config.data.init_args
        if "image_size" not in data and shape.image_size != 32:
            raise ConfigError(f"--shape {shape.name}: {config.data.class_path.rsplit('.', 1)[-1]} trains at 32 px "
                              "only; pick a 32 px shape (s32, m32)")
        for section, values in shape.settings().items():
            settings = data if section == "data" else config.model
            for key, value in values.items():
                if f"--{section}.{key}" not in typed and key in settings:
                    settings[key] = value
        config.shape = shape.name

    def shape_for_budget(self, typed: list[str]) -> tuple[shapes.Shape | None, str]:
        """`shape: auto`: the family member for the time budget, or None (the config's values), and why."""
        config = self.config
        budget = shapes.budget_seconds(config.trainer.max_time)
        recipe = f"dim {config.model.dim}, depth {config.model.depth}"
        if typed:
            return None, f"Shape: as given ({', '.join(typed)})"
        if budget is None:
            return None, (f"Shape: the recipe's ({recipe}); with --trainer.max_time it is chosen for the budget "
                          "(--shape auto)")
        if config.model.init_from:
            return None, "Shape: the recipe's, which --model.init_from's checkpoint must match"
        if not one_process(config.trainer):
            return None, ("Shape: the recipe's: with more than one process each would measure its own step time; "
                          f"pass --shape {'|'.join(shapes.BY_NAME)}")
        extent = data_class(config.data).extent(dict(config.data.init_args))
        if extent is None:
            return None, f"Shape: the recipe's ({recipe}): the data's size could not be read ahead"
        rank_zero_info(f"Measuring the training step of {len(shapes.candidates(extent[1]))} network shapes "
                       f"on this machine (a few seconds)...")
        times = self.step_times(extent[1])
        choice = shapes.choose(budget, *extent, lambda shape: times[shape.name], self.batch_size)
        return choice.shape, str(choice)

    def choose_compile(self) -> None:
        """Resolve `--model.compile auto` into true or false for this run's length (src/compiling.py), and
        say so: in the config (saved as config.yaml) and the model's hparams, before anything compiles."""
        if self.config.model.compile != "auto":
            return
        self.config.model.compile, why = self.compile_for_length()
        if getattr(self, "model", None) is not None:  # built: the model compiles in setup() by its hparams
            self.model.hparams.compile = self.config.model.compile
        rank_zero_info(f"{why}; override with --model.compile true|false")

    def compile_for_length(self) -> tuple[bool, str]:
        config = self.config
        device = run_device(config.trainer.accelerator)
        reason = compile_unavailable(device)
        if reason:
            return False, f"Compile: off ({reason})"
        if config.trainer.fast_dev_run:
            return False, "Compile: off (--trainer.fast_dev_run)"
        if not one_process(config.trainer):
            return False, "Compile: off (with more than one process each would measure its own step)"
        settings, precision = self.network(), str(config.trainer.precision)
        key = compiling.machine_key(settings, self.batch_size, precision, device)
        known = compiling.cached(key)
        seconds = shapes.budget_seconds(config.trainer.max_time)
        # The epochs at this machine's eager step, where they bound the run (only then is the data read ahead).
        epochs_bound = (config.trainer.max_epochs or -1) > 0
        extent = data_class(config.data).extent(dict(config.data.init_args)) if epochs_bound else None
        if extent is not None:
            step = known.eager if known else shapes.step_seconds(settings, self.batch_size, precision, device,
                                                                 fused_attention(device, precision))
            epochs = config.trainer.max_epochs * shapes.steps_per_epoch(extent[0], self.batch_size) * step
            seconds = min(seconds or epochs, epochs)
        if seconds is None:
            return False, "Compile: off (the run's length is not known ahead)"
        length = f"{seconds / 60:.0f} minutes of training" if seconds >= 60 else f"{seconds:.0f} s of training"
        if known is None:
            if seconds < compiling.PROBE_FROM:
                return False, (f"Compile: off ({length}, under {compiling.PROBE_FROM / 60:.0f} minutes: too short "
                               "to pay back compiling, which takes 10 s to over a minute on 2 cores)")
            rank_zero_info("Measuring the training step eager and compiled on this machine (once per network; "
                           "compiling takes up to a minute or two)...")
            known = compiling.probe(settings, self.batch_size, precision, device)
            compiling.remember(key, known)
        gain = known.steps(seconds, True) / known.steps(seconds, False) - 1
        return known.pays(seconds), (f"Compile: {'on' if known.pays(seconds) else 'off'} ({known}: "
                                     f"{100 * gain:+.0f} % steps in {length})")

    def network(self) -> dict:
        """The settings of the ViT this run trains (10 classes stand in for the data's: the head barely costs)."""
        config = self.config
        settings = {k: v for k, v in dict(config.model).items() if k in SETTINGS_DEFAULTS}
        data = config.data.init_args
        settings.update(num_classes=10, patch_size=data.get("patch_size", 8), image_size=data.get("image_size", 32))
        return settings

    @property
    def batch_size(self) -> int:
        return self.config.data.init_args.get("batch_size", 128)

    def step_times(self, native_size: int) -> dict[str, float]:
        """The training step time of each family member for images of `native_size` px, measured now with
        the run's other network settings, batch size, precision and device (src.shapes.step_times)."""
        config = self.config
        return shapes.step_times(native_size, self.network(), self.batch_size, str(config.trainer.precision),
                                 run_device(config.trainer.accelerator))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, writing checkpoints with SafeCheckpointIO unless plugins are given."""
        if not self.config_init.trainer.get("plugins"):
            kwargs.setdefault("plugins", [SafeCheckpointIO()])
        if self.config_init.ema > 0:
            callbacks = self.config_init.trainer.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs["callbacks"] = [*callbacks, EMAWeightAveraging(decay=self.config_init.ema)]
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:  # Lightning's own check of a trainer setting
            option = "--trainer.max_time: " if "Timer(duration" in str(error) else "trainer: "
            raise ConfigError(f"{option}{error}") from None


def run_folder(data: Any) -> str:
    """A run's checkpoint folder when none is given: `data/lightning/<name>`, named after the data it
    holds (the DataModule's `run_name`), so runs of different datasets never share one."""
    root = data.init_args.get("root") if data.init_args else None
    return f"{ROOT_DIR}/{data_class(data).run_name(None if root is None else str(root))}"


def data_class(data: Any) -> type[ImageDataModule]:
    """The DataModule class a config's `data` section names (its class_path), not yet built."""
    module, _, name = data.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def one_process(trainer: Any) -> bool:
    """Whether the run trains in one process (one device, one node)."""
    devices = trainer.devices
    if trainer.num_nodes not in (None, 1):
        return False
    if devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1):
        return True
    if devices in ("auto", None, -1, "-1"):
        return run_device(trainer.accelerator).type != "cuda" or torch.cuda.device_count() <= 1
    return False


def flag_value(args: list[str], flag: str) -> str | None:
    """The value given to `flag` in a raw argument list (`--flag value` or `--flag=value`), last one wins."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
    return value
