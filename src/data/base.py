"""What every DataModule offers the model and the CLI: classes, image geometry, transforms, loaders."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import shutil
import signal
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import v2

from src.data.device import BatchAugment, DeviceImages
from src.data.transforms import Augment, batch_mix, erasing, eval_transform, photo_train_transform, train_transform
from src.images import patch_grid, patchify
from src.errors import ConfigError


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGINT to the training process, which stops after saving
    (src.callbacks.StopOnSignal) and then shuts them down. `timeout`, `kill -- -PGID`, a terminal's
    Ctrl-C and cluster schedulers signal every process of the job: without this a worker would die
    first and take the run down with it, unsaved."""
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)


# The loader worker processes this project's DataLoaders started; a WeakSet, so ended ones drop out.
_LOADER_WORKERS: "weakref.WeakSet[multiprocessing.process.BaseProcess]" = weakref.WeakSet()


@functools.cache
def _recording(base: type) -> type:
    """A multiprocessing context of class `base` whose `Process` also records each process it makes."""

    def process(self, *args: Any, **kwargs: Any) -> multiprocessing.process.BaseProcess:
        made = base.Process(*args, **kwargs)
        _LOADER_WORKERS.add(made)
        return made

    return type(f"Recording{base.__name__}", (base,), {"Process": process})


def loader_context() -> multiprocessing.context.BaseContext:
    """The default start method's context, for our DataLoaders: it records the workers they start, the
    processes `stop_loader_workers` may kill. Asked for when a loader is made, not at import, so a
    user's script may still choose its own start method."""
    return _recording(type(multiprocessing.get_context()))()


def is_our_loader_worker(process: multiprocessing.process.BaseProcess) -> bool:
    """Whether a child process is a worker of one of this project's DataLoaders."""
    return process in _LOADER_WORKERS


@atexit.register  # after multiprocessing registered its own exit handler, so it runs before it
def stop_loader_workers() -> None:
    """At exit, Python's multiprocessing stops the daemonic processes still running (a loader's workers,
    when a script or a notebook kept the loader) with SIGTERM, which our loader workers ignore
    (`ignore_stop_signals`), and then waits for them forever: stop those with SIGKILL instead. Every
    other child process is left to multiprocessing."""
    workers = [process for process in multiprocessing.active_children() if is_our_loader_worker(process)]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report them as failed
    for process in workers:
        process.kill()


def outermost_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (what creating it would add)."""
    missing, path = None, folder.absolute()
    while not path.exists():
        missing, path = path, path.parent
    return missing


@contextlib.contextmanager
def kept_only_if_done(folder: Path) -> Iterator[None]:
    """The folders a download creates for `folder` are removed again when it fails: a mistyped
    --data.root leaves no empty dataset folder behind."""
    first_new = outermost_missing(folder)
    try:
        yield
    except BaseException:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        raise


def default_num_workers() -> int:
    """Loader processes: all cores but one for the training process itself, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def stratified_split(targets: Sequence[int], sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Seeded split of indices into parts of exactly `sizes` plus the rest, each class in proportion.

    Returns `[rest, part_1, ..., part_k]`, each sorted. The same targets, sizes and seed always give
    the same split, whatever the global random state.
    """
    targets = torch.as_tensor(targets)
    n = len(targets)
    if any(size < 0 for size in sizes) or sum(sizes) >= n:
        raise ConfigError(f"cannot hold out {list(sizes)} of {n} images and keep some to train on")
    generator = torch.Generator().manual_seed(seed)
    pools = []
    for c in targets.unique():
        members = torch.nonzero(targets == c).flatten()
        pools.append(members[torch.randperm(len(members), generator=generator)].tolist())
    counts = [len(pool) for pool in pools]
    parts: list[list[int]] = []
    for size in sizes:
        # Largest-remainder apportionment: per-class quotas that add up to exactly `size`.
        exact = [size * count / n for count in counts]
        quota = [min(int(e), len(pool)) for e, pool in zip(exact, pools)]
        by_remainder = sorted(range(len(pools)), key=lambda c: quota[c] - exact[c])
        for c in by_remainder:
            if sum(quota) == size:
                break
            if quota[c] < len(pools[c]):
                quota[c] += 1
        parts.append(sorted(i for c, q in enumerate(quota) for i in pools[c][:q]))
        pools = [pool[q:] for pool, q in zip(pools, quota)]
    return [sorted(i for pool in pools for i in pool)] + parts


class TransformedSubset(Dataset):
    """The samples of `dataset` at `indices`, with `transform` applied to each image.

    With `views=2` each sample is two independent augmentations of the image, stacked (2, ...), as
    a contrastive objective needs. With `instance_targets` the target of sample i is i itself: every
    image is its own class (instance discrimination); `indices` are sorted, so an image keeps its
    label whatever order the loader draws it in.

    The training sampler (`EpochShuffle`) gives each position with the seed of that sample's
    augmentation in this epoch: the sample is drawn from a generator seeded with it (the process's own
    random state is left as it was), so what an image gets depends on the run's seed, the epoch and
    the image, not on which loader process makes it or what that process made before. A resumed run's
    loader processes are new ones, and draw what the uninterrupted run's drew.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        transform: Callable,
        views: int = 1,
        instance_targets: bool = False,
        cache: bool = False,
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.views = views
        self.instance_targets = instance_targets
        # With a deterministic `transform` (evaluation), each sample as first made, kept: a loader's
        # persistent worker then decodes every image once, not once per validation.
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | tuple[int, int]):
        if isinstance(i, tuple):  # (position, seed) from EpochShuffle
            i, seed = i
            with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's CPU generator
                torch.default_generator.manual_seed(seed)
                return self._sample(i)
        return self._sample(i)

    def _sample(self, i: int):
        if self.cache is None:
            return self._made(i)
        if i not in self.cache:
            self.cache[i] = self._made(i)
        return self.cache[i]

    def _made(self, i: int):
        image, target = self.dataset[self.indices[i]]
        if self.instance_targets:
            target = i
        if self.views == 1:
            return self.transform(image), target
        return torch.stack([self.transform(image) for _ in range(self.views)]), target  # (V, ...)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation: a hash of the run's seed, the epoch and the image."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


class EpochShuffle(DistributedSampler):
    """torch's DistributedSampler (this process's share of a seeded permutation per epoch, also for one
    process) that, with `sample_seeds`, gives each position with its `sample_seed`, for `TransformedSubset`."""

    def __init__(self, *args: Any, sample_seeds: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample_seeds = sample_seeds

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        for index in super().__iter__():
            yield (index, sample_seed(self.seed, self.epoch, index)) if self.sample_seeds else index


# Where training images are augmented: one by one (PIL) in loader processes, or a batch at a time
# on the training device from a uint8 copy of the split (src/data/device.py).
AugmentOn = Literal["loader", "device"]
# Whether training mirrors images and evaluation averages each image with its mirror: measured or
# declared for the data ("auto"), or set.
HFlip = Union[bool, Literal["auto"]]
# The data settings a run resolves from its data when they are left at these values; checkpoints keep
# what was resolved, so classify.py and a resume repeat it rather than measure again.
AUTOMATIC: dict[str, Any] = {"hflip": "auto", "mean": None, "std": None}


def resolved_choices(saved: dict) -> dict[str, Any]:
    """The resolved automatic settings in a checkpoint's DataModule settings. Checkpoints from before
    `hflip` existed mirrored their training images, and read as hflip True."""
    choices = {"hflip": True, **{k: v for k, v in saved.items() if k in AUTOMATIC}}
    # Sequences as lists, as a parsed config holds them.
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in choices.items() if v != AUTOMATIC[k]}


# How validation scores the model: its head's predictions of the classes, or (for pre-training, whose head
# predicts something else) a k-NN classifier on its features, fitted on labelled reference images.
Evaluation = Literal["classify", "knn"]


class ImageDataModule(pl.LightningDataModule):
    """Base of the project's DataModules: the options they all share are declared here once.

    `views` is how many augmentations of each training image a batch holds: 2 for the contrastive
    term; without it, more than 1 is repeated augmentation (Hoffer et al. 2020, as DeiT uses it):
    every step sees `batch_size` images `views` times each, differently augmented. Evaluation always
    sees one. `erase_prob` erases a random box in that share of training images (after the policy).
    `mixup_alpha` / `cutmix_alpha` > 0 mix each training batch with torchvision's MixUp / CutMix (one
    of them per batch when both are set) into soft targets, before the batch is cut into patches;
    under train.py they are set by the model's options of the same name. `keep_unmixed` (set by train.py
    when the model has a contrastive term) mixes only a copy of the first views and keeps the views
    unmixed beside it: the contrastive term compares unmixed views while the cross entropy learns from
    mixed ones (IDMM).

    `hflip` says whether mirror images keep their class: then training mirrors half its images and
    the model may score each evaluation image with its mirror (`flip_tta`). "auto" takes what the
    subclass measures or declares of its data (`choose_hflip`); True or False is the user's word.

    `evaluation` says how validation scores the model: "classify" (the head's predictions of the
    classes) or "knn" (pre-training, whose head predicts something else: validation then has two
    loaders, the labelled `knn_reference` images and the labelled `val_set` queries, and the model
    scores its features by k-NN; the labels never reach a training loss).

    Subclasses take their own options and pass the shared ones on as `**kwargs` (jsonargparse reads
    them from here for --help and the config), call `set_image` in `__init__` with the geometry and
    normalisation the CLI links into the model, set `num_classes` and `class_names`, and fill
    `train_set`, `val_set` and `test_set` in `setup`.
    """

    num_classes: int
    class_names: list[str] | None
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    evaluation: Evaluation = "classify"
    # Photos stored larger than they train are cut with random resized crops of this share of their
    # area; None: small images, cut with reflect-padded random crops.
    crop_scale: tuple[float, float] | None = None

    def __init__(
        self,
        patch_size: int = 4,
        batch_size: int = 128,
        num_workers: int | None = None,
        augment: Augment = "randaugment",
        views: int = 1,
        seed: int = 0,
        augment_on: AugmentOn = "loader",
        erase_prob: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        keep_unmixed: bool = False,
        hflip: HFlip = "auto",
    ) -> None:
        super().__init__()
        # Every subclass's arguments too (Lightning collects them from the __init__ chain); saved in
        # checkpoints, not logged, so classify.py can rebuild the DataModule.
        self.save_hyperparameters(logger=False)
        erasing(erase_prob)  # checks the probability
        batch_mix(mixup_alpha, cutmix_alpha, 2)  # checks the alphas
        if augment_on not in ("loader", "device"):
            raise ConfigError(f"augment_on must be 'loader' or 'device', got {augment_on!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
        if views < 1:
            raise ConfigError(f"views must be a positive integer, got {views}")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers must be 0 or more, got {num_workers}")
        if hflip not in (True, False, "auto"):
            raise ConfigError(f"hflip must be auto, true or false, got {hflip!r}")
        self.hflip: bool = True if hflip == "auto" else hflip  # until choose_hflip has measured
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment = augment
        self.views = views
        self.seed = seed
        self.augment_on = augment_on
        self.erase_prob = erase_prob
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.keep_unmixed = keep_unmixed
        self.batch_augment: BatchAugment | None = None  # set with device-side training images
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.knn_reference: Dataset | None = None  # with evaluation "knn"

    def set_image(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        """Check and keep the image geometry and normalisation the CLI links into the model.

        Fails at start-up, not mid-epoch, when the patch size does not divide the image.
        """
        patch_grid(image_size, self.patch_size)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def choose_hflip(self, mirror_safe: bool, why: str) -> None:
        """Resolve `hflip: auto` from what the subclass measured or declares of its data (`mirror_safe`,
        because of `why`), say so in one line, and keep the resolved value with the checkpoints' data
        settings, so classify.py and a resume repeat it. An explicit True or False is kept as it is."""
        if self.hparams.get("hflip", "auto") != "auto":
            return
        self.hflip = mirror_safe
        self.hparams["hflip"] = mirror_safe
        choice = "training mirrors images" if mirror_safe else "no mirror images in training or test-time augmentation"
        rank_zero_info(f"Mirror images {'keep' if mirror_safe else 'change'} their class ({why}): {choice}; "
                       "override with --data.hflip true|false")

    @classmethod
    def run_name(cls, root: str | None = None) -> str:
        """The name of a run's folder under data/lightning/ when none is given: the data it holds."""
        return cls.__name__.removesuffix("DataModule").lower()

    @classmethod
    def extent(cls, settings: dict[str, Any]) -> tuple[int, int] | None:
        """(training images, native image size in px) from the DataModule's settings, before anything is
        read, for the run's shape choice (src/shapes.py); None when not known without reading the data."""
        return None

    @functools.cached_property
    def mix(self) -> v2.Transform | None:
        """MixUp / CutMix over this dataset's classes, or None; built once `num_classes` is known."""
        if not (self.mixup_alpha or self.cutmix_alpha):
            return None
        return batch_mix(self.mixup_alpha, self.cutmix_alpha, self.num_classes)

    @property
    def show_progress(self) -> bool:
        """Whether long data work (decoding) shows a bar: on rank 0, unless the trainer's own bar is off."""
        trainer = self.trainer
        return rank_zero_only.rank == 0 and (trainer is None or trainer.progress_bar_callback is not None)

    @property
    def validation_held_out(self) -> bool:
        """Whether the validation images are kept out of training, so a checkpoint may be chosen on them."""
        return True

    @property
    def testable(self) -> bool:
        """Whether there is a class-labelled test split for train.py to evaluate after fitting."""
        return True

    @property
    def train_transform(self) -> Callable:
        """Augmentation + normalisation for training images (photos: random resized crops, `crop_scale`);
        patches are cut per batch (`training_batch`)."""
        if self.crop_scale is not None:
            return photo_train_transform(self.image_size, self.mean, self.std, self.augment, self.crop_scale,
                                         self.erase_prob, self.hflip)
        return train_transform(self.image_size, self.mean, self.std, self.augment, self.erase_prob, self.hflip)

    @property
    def eval_transform(self) -> Callable:
        """Deterministic preprocessing for validation, test and classify.py."""
        return eval_transform(self.image_size, self.patch_size, self.mean, self.std)

    def device_augment(self) -> BatchAugment:
        """`train_transform` for batches on the device: reflect-padded crops of `image_size` images, or
        random resized crops of photos stored larger (`crop_scale`)."""
        if self.crop_scale is not None:
            return BatchAugment(self.mean, self.std, self.augment, erase_prob=self.erase_prob,
                                crop_scale=self.crop_scale, size=self.image_size, flip=self.hflip)
        return BatchAugment(self.mean, self.std, self.augment, padding=self.image_size // 8,  # as train_transform's
                            erase_prob=self.erase_prob, flip=self.hflip)

    def device_train_set(self, images: Tensor, targets: Sequence[int]) -> DeviceImages:
        """The training split as uint8 images (N, H, W, 3) augmented on the device (augment_on: device)."""
        self.batch_augment = self.device_augment()
        if self.batch_augment.size is None and tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            raise ConfigError(f"device augmentation needs {self.image_size}px images, got {tuple(images.shape)}")
        return DeviceImages(images, targets)

    def training_batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """A training batch as the model takes it: augmented (device path), mixed, cut into patches.

        In: (images (B, [V,] C, H, W), targets (B,)) from the loader, or (indices, targets) with
        `augment_on: device`. Out: patches (B, [V,] N, P*P*C) with class targets (B,); with MixUp or
        CutMix the views are mixed as one batch: (V*B, N, P*P*C), all first views first, with soft
        targets (V*B, K); with `keep_unmixed` as well, the unmixed (B, V, N, P*P*C) and targets (B,),
        then the mixed first views (B, N, P*P*C) and their soft targets (B, K).
        """
        if self.batch_augment is not None:
            indices, targets = batch
            images = self.train_set.take(indices)  # (B, C, H, W) uint8, on the training device
            images = torch.stack([self.batch_augment(images) for _ in range(self.views)], dim=1)  # (B, V, C, H, W)
        else:
            images, targets = batch
            images = images if images.ndim == 5 else images.unsqueeze(1)  # (B, V, C, H, W)
        if self.mix is not None and self.keep_unmixed:
            mixed, soft = self.mix(images[:, 0], targets)  # a mixed copy; the views stay as they were
            return patchify(images, self.patch_size), targets, patchify(mixed, self.patch_size), soft
        if self.mix is not None:
            views = images.shape[1]
            images, targets = self.mix(images.transpose(0, 1).flatten(0, 1), targets.repeat(views))
            return patchify(images, self.patch_size), targets  # (V*B, N, P*P*C), (V*B, K)
        patches = patchify(images, self.patch_size)  # (B, V, N, P*P*C)
        return (patches[:, 0] if patches.shape[1] == 1 else patches), targets

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Training batches are finished here, on the training device; evaluation batches are ready.
        if not (self.trainer and self.trainer.training):
            return batch
        return self.training_batch(batch)

    def _loader(self, dataset: Dataset | None, training: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split yet")
        # Device-side images need no loader processes: a batch is a list of indices.
        workers = 0 if isinstance(dataset, DeviceImages) else self.num_workers
        options = dict(batch_size=self.batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
                       persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals if workers > 0 else None,
                       multiprocessing_context=loader_context() if workers > 0 else None)
        # Its own generator (the workers' seeds): loaders draw nothing from the training's random state.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's, as Lightning's own samplers use
        generator = torch.Generator().manual_seed(seed)
        if not training:
            return DataLoader(dataset, shuffle=False, generator=generator, **options)
        # The order of epoch e and each sample's augmentation are functions of (seed, e) alone, for this
        # process's share of the images; StatefulDataLoader saves how far into it training got, and
        # Lightning stores that in every checkpoint and restores it on resume.
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffle(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                               sample_seeds=isinstance(dataset, TransformedSubset))
        # The epoch of the next training batch. Lightning sets it at each epoch's start, but a resumed run
        # makes (and fills) its first iterator before that: from a checkpoint written mid-epoch, in that
        # epoch; from one written after an epoch's last batch (by its validation), in the next.
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch + trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch has deprecated
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            return StatefulDataLoader(dataset, sampler=sampler, generator=generator, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, training=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.evaluation == "knn":  # references first: the model fits its k-NN on them, then scores the queries
            return [self._loader(self.knn_reference), self._loader(self.val_set)]
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
