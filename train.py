"""Train a Vision Transformer: `python train.py [--config configs/X.yaml] [--model.lr 3e-4 ...]`.

With no --config it picks the recipe for the machine: configs/cifar10.yaml with a CUDA GPU,
configs/cifar10-cpu.yaml otherwise. Checkpoints go to data/lightning/<the data's name>/ (the
recipe's or --checkpoint.dirpath's folder when given); when last.ckpt exists there the run resumes
from it (pass --fresh to start over). After fitting, the best checkpoint is tested.
"""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from src import runs
from src.cli import ViTCLI
from src.errors import UserError


def main(args: list[str] | None = None) -> None:
    """Parse; resume or start; fit; pick the checkpoint to test; test."""
    cli = ViTCLI(args=args)  # config files + flags, checked; nothing built yet
    resume = runs.start_or_resume(cli.config)  # None: a new run (--fresh, or no last.ckpt yet)
    cli.build()
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    runs.check_start(model, data)
    ckpt_path = runs.resume_from(model, resume) if resume is not None else None
    runs.announce(trainer, resume)
    del resume  # fit() reads the file itself; do not hold a second copy
    runs.follow_knn(trainer, data)
    validation_chooses = runs.validation_may_choose(trainer, data)
    last = Path(cli.config.checkpoint.dirpath) / "last.ckpt"
    with runs.no_trace_if_refused(trainer, last):
        # Checkpoints are read weights-only everywhere: a file that holds code is refused, not run.
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)

    if not data.testable:
        rank_zero_info("Pre-training finished (no class-labelled test). Fine-tune from it with "
                       f"--model.init_from {last}")
        return
    best = cli.best_checkpoint.best_model_path if validation_chooses else ""  # else: the last weights
    # Weight averaging (--ema) has put the average into every checkpoint; left attached, the callback
    # would load the raw weights it also stores there, and the test would not measure what was chosen.
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    results = trainer.test(model, datamodule=data, ckpt_path=best or None, weights_only=True)
    if results:
        rank_zero_info(f"test/acc = {results[0]['test/acc']:.4f} (checkpoint: {best or 'last weights'})")


def one_line(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker re-raised it wrapped in a traceback."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:  # torch's ExceptionWrapper
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def peer_stopped(error: BaseException) -> bool:
    """Whether a DDP rank other than 0 failed only because another process of the run exited first
    (that process prints why): gloo reports it as a closed connection."""
    return rank_zero_only.rank != 0 and (
        isinstance(error, torch.distributed.DistNetworkError) or "Connection closed by peer" in str(error))


def run(args: list[str] | None = None) -> int:
    """train.py's exit status: 0 when done, 2 for a problem the user can fix (one line on stderr).

    Ctrl-C and SIGTERM during training save last.ckpt and exit with 130 and 143 (src.callbacks.StopOnSignal).
    """
    try:
        main(args)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # A log or picture write hit the full disk before any checkpoint did (those say so themselves).
        print(f"error: could not write {error.filename or 'the logs'} (the disk is full or the file size limit "
              "reached); the checkpoints already written are kept: free space and run the same command to "
              "resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (start-up, testing); training itself stops in StopOnSignal
        print("Interrupted outside training; the checkpoints already written are kept.", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:
        if not peer_stopped(error):
            raise
        print(f"error: rank {rank_zero_only.rank} stopped: another process of the run stopped first "
              "(its error is above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
