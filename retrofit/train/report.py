"""What a run says: its console lines, its progress bar, and its records (``config.json``, ``summary.json``,
the ``extra.finetune`` of its checkpoints).

Every function reads a :class:`retrofit.train.loop.Trainer` after its setup; nothing here
changes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .model import describe_source
from .run_folder import BEST

if TYPE_CHECKING:
    from .loop import Trainer


def jsonable(value: Any) -> Any:
    """Tuples → lists, numpy/torch scalars → Python numbers, recursively (for JSON and the recipe)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def progress_bar(console: Any) -> Any:
    """A transient rich progress bar of one epoch's batches: images/s, running loss (a string: ``–`` before the
    first batch), time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[ips]:.0f} img/s"), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


def run_record(t: Trainer) -> dict[str, Any]:
    """``config.json``: settings, classes, data, head change, parameter counts, devices, versions."""
    from ..recipe import versions

    params = sum(p.numel() for p in t.model.parameters())
    new = sum(p.numel() for n, p in t.model.named_parameters() if n in t.new_names)
    return {
        "config": t.config.to_dict(),
        "classes": t.splits.classes,
        "data": t.splits.description,
        "data_config": jsonable(t.data_config),
        "head": {"classes_before": t.head_before, "classes": len(t.splits.classes), "replaced": t.head_replaced},
        "params": params, "new_params": new,
        # the learning-rate factors and block warm-up in effect (the config's None = the measured default)
        "lr_mults": {"backbone": 1.0, "blocks": t.config.block_lr_mult_used(), "head": t.config.head_lr_mult},
        "block_warmup_updates": t.block_warmup,
        "world_size": t.d.world_size, "device": str(t.device),
        "precision": "bf16-autocast" if t.autocast_dtype is not None else "fp32",
        "channels_last": t.channels_last,
        "batches_per_epoch": t.batches_per_epoch, "updates_per_epoch": t.updates_per_epoch,
        "versions": versions(),
    }


def summary(t: Trainer, digests: list[str], seconds: float) -> dict[str, Any]:
    """``summary.json``: epochs done, best and last metrics, this invocation's seconds, rank digests."""
    return {
        "epochs_done": t.epoch, "epochs": t.config.epochs, "best": t.best,
        "last": t.history[-1] if t.history else None, "seconds": seconds,
        "world_size": t.d.world_size, "rank_weight_digests": digests,
        "ranks_agree": len(set(digests)) == 1,
    }


def checkpoint_extra(t: Trainer, epoch: int, weights: str, metrics: dict[str, float]) -> dict[str, Any]:
    """The recipe's ``extra`` of a checkpoint of epoch ``epoch`` (``weights``: ``model`` or ``ema``)."""
    return {"finetune": {
        "epoch": epoch, "epochs": t.config.epochs, "weights": weights,
        "val_top1": metrics["top1"], "val_top5": metrics["top5"], "val_loss": metrics["loss"],
        "classes": t.splits.classes, "data_config": jsonable(t.data_config),
        "settings": t.config.to_dict(),
    }}


def start_line(t: Trainer) -> str:
    """``fine-tuning SOURCE + BLOCK · data · head · device precision · processes × batch × accum · batches/epoch``."""
    cfg = t.config
    head = f"{len(t.splits.classes)} classes"
    if t.head_replaced:
        why = ", other class names than the checkpoint's" if t.renamed_classes else ""
        head = f"head {t.head_before} → {len(t.splits.classes)} classes (new{why})"
    precision = "bf16 autocast" if t.autocast_dtype is not None else "fp32"
    what = "resuming" if cfg.resume else "fine-tuning"
    rates = f"lr {cfg.lr:g}, head × {cfg.head_lr_mult:g}"
    if t.has_blocks:
        rates += f", blocks × {cfg.block_lr_mult_used():g}"
        if t.block_warmup:
            rates += f" (warm-up {t.block_warmup} updates)"
    if cfg.bn_stats == "frozen":
        rates += ", BatchNorm statistics frozen"
    return (f"{what} {describe_source(cfg)} · {t.splits.description} · {head} · {rates} · {t.device} {precision} · "
            f"{t.d.world_size} process(es) × batch {cfg.batch_size} × accum {cfg.accum_steps} · "
            f"{t.batches_per_epoch} batches/epoch")


def epoch_line(t: Trainer, row: dict[str, Any], improved: bool) -> str:
    """One epoch's summary: losses, top-1 (and top-5, EMA), lr, images/s, seconds, ``best`` when improved."""
    text = (f"epoch {row['epoch']}/{t.config.epochs} · train loss {row['train_loss']:.4f} · "
            f"val loss {row['val_loss']:.4f} top-1 {100 * row['val_top1']:.2f}%")
    if len(t.splits.classes) > 5:  # with 5 classes or fewer top-5 is always 100%
        text += f" top-5 {100 * row['val_top5']:.2f}%"
    if row["ema_val_top1"] is not None:
        text += f" · EMA top-1 {100 * row['ema_val_top1']:.2f}%"
    text += f" · lr {row['lr']:.2e} · {row['train_images_per_s']:.0f} img/s · {row['epoch_seconds']:.1f} s"
    if t.frozen:
        text += " · backbone frozen"
    if row["skipped_images"]:
        text += f" · skipped {row['skipped_images']} unreadable images"
    return text + (" · best" if improved else "")


def end_line(t: Trainer) -> str | None:
    """How the run ended: stopped early (continue with --resume), or the best result and where it is."""
    if t.epoch < t.config.epochs:
        return f"stopped after epoch {t.epoch} of {t.config.epochs}; continue with --resume"
    if t.history:
        return (f"best val top-1 {100 * t.best['top1']:.2f}% (epoch {t.best['epoch']}, "
                f"{t.best['weights']} weights) → {t.out / BEST}")
    return None
