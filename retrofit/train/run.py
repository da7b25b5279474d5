"""A fine-tuning run from start to end: :func:`finetune`.

In order: the settings are checked, the run folder is locked (one command per folder) and checked (and recovered after a kill), the
model and data are set up, a previous run is set aside (``--overwrite``), the run record is
written, epochs run until ``--until-epoch`` or ``--epochs`` (:mod:`.loop`), and the summary is
written. A failure or an interruption becomes one line that says what is kept.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RetrofitError
from . import distributed, report
from .config import FinetuneConfig
from .loop import NonFiniteLoss, Trainer
from .outputs import write_json
from .setup import absolute_paths

#: CUDA out-of-memory (``torch.OutOfMemoryError`` from torch 2.5 on).
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class FinetuneResult:
    """What a run produced.

    ``history``: one dict per completed epoch (columns of ``metrics.csv``); ``best``: ``{"epoch",
    "top1", "weights": "model"|"ema"}``; ``seconds``: wall time of this invocation;
    ``rank_digests``: each rank's ``tensors_digest`` (SHA-256) of its final state dict, all equal after a
    correct DDP run.
    """

    output: Path
    epochs_done: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    seconds: float
    rank_digests: list[str]


def finetune(config: FinetuneConfig, console: Any = None) -> FinetuneResult:
    """Fine-tune as ``config`` says; see :mod:`retrofit.train.loop`. Works unchanged under torchrun.

    Args:
        config: the run's settings (validated here).
        console: a ``rich.console.Console`` for progress and the per-epoch lines (rank 0 only);
            a default one when None.

    Raises:
        RetrofitError: bad settings or data, an output folder that already holds a run (without
            ``resume``/``overwrite``), a non-finite loss (nothing of that epoch is written),
            CUDA out of memory (with a batch size to try), an unreadable image.
        KeyboardInterrupt: interrupted; its message says which epoch is saved.
    """
    config.validate()
    from .augment import check_auto_augment

    check_auto_augment(config.auto_augment)  # timm judges the string, before the output folder is touched
    config = absolute_paths(config)
    d = distributed.setup(config.device)
    trainer = None
    try:
        trainer = Trainer(config, d, console)
        return _run(trainer)
    finally:
        if trainer is not None:
            trainer.release()
        distributed.teardown(d)


def _run(t: Trainer) -> FinetuneResult:
    started = time.perf_counter()
    with t.folder.lock():
        t.folder.check(t.config)
        t.build()
        try:  # clear() inside: a signal held back while it sets the old run aside is delivered here
            t.folder.clear(t.config.overwrite)
            return _epochs(t, started)
        except BaseException as e:
            if t.folder.restore_replaced(t.saved_epoch) and isinstance(e, (KeyboardInterrupt, RetrofitError)):
                raise type(e)(f"{e}; the run it was replacing is back in {t.out}") from None
            raise


def _epochs(t: Trainer, started: float) -> FinetuneResult:
    cfg, d = t.config, t.d
    stop = cfg.until_epoch or cfg.epochs
    if d.is_main and not cfg.resume:
        write_json(t.out / "config.json", report.run_record(t))
    t.say(report.start_line(t))
    warning = cfg.warmup_warning()
    if warning:
        t.say(warning)
    if t.epoch >= stop:
        t.say(f"nothing to do: {t.out} already holds {t.epoch} of {cfg.epochs} epochs")
    progress = report.progress_bar(t.console) if d.is_main and t.console is not None else None
    try:
        with progress or contextlib.nullcontext():
            while t.epoch < stop:
                t.one_epoch(progress)
    except NonFiniteLoss as e:
        kept = f"epoch {t.saved_epoch} is still saved in {t.out}" if t.saved_epoch else "no checkpoint had been written yet"
        raise RetrofitError(
            f"loss became {e.value} at step {e.step} (epoch {t.epoch + 1}, batch {e.batch}); stopped without "
            f"saving that epoch: {kept}. Try a lower --lr or --clip-grad 1.0"
        ) from None
    except KeyboardInterrupt:
        kept = (f"epoch {t.saved_epoch} is saved in {t.out}; continue with --resume" if t.saved_epoch
                else "no epoch had finished yet: run the same command again to start over")
        raise KeyboardInterrupt(kept) from None
    except ValueError as e:
        if "Expected more than 1 value per channel when training" not in str(e):
            raise
        # BatchNorm in training needs two values per channel: batch 1 with a 1×1 map has one.
        raise RetrofitError(
            f"--batch-size {cfg.batch_size} at --img-size {t.data_config['input_size'][-1]} leaves BatchNorm "
            "one value per channel (a 1×1 map): use --batch-size 2 or more, a larger --img-size, or --bn-stats frozen"
        ) from None
    except _OOM:
        b = cfg.batch_size
        raise RetrofitError(
            f"CUDA out of memory at --batch-size {b}; try --batch-size {max(1, b // 2)} "
            f"(add --accum-steps {2 * cfg.accum_steps} to keep the effective batch)"
        ) from None
    digests = t.rank_digests()
    seconds = time.perf_counter() - started
    if d.is_main:
        write_json(t.out / "summary.json", report.summary(t, digests, seconds))
    if len(set(digests)) != 1:
        t.say("warning: the ranks ended with different weights (see summary.json)")
    end = report.end_line(t)
    if end:
        t.say(end)
    return FinetuneResult(t.out, t.epoch, t.history, t.best, seconds, digests)
