"""The files a run writes: the trainer state and checkpoints of each epoch, ``metrics.csv``, ``gates.csv``, ``drift.csv``, ``curves.png``,
``config.json``, ``summary.json``.

Every file is rewritten whole from the run's in-memory state and replaced atomically
(:func:`retrofit.checkpoint.atomic_write_bytes`), so a reader never sees half a file and a
resumed run's ``metrics.csv`` has exactly one row per completed epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from .loop import Trainer

#: ``metrics.csv`` columns. Losses are mean cross-entropy per image (train: with label
#: smoothing); top-1/top-5 are fractions in [0, 1]; ``ema_*`` are empty when EMA is off.
METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5",
    "ema_val_loss", "ema_val_top1", "ema_val_top5", "train_images_per_s", "epoch_seconds", "skipped_images",
)


def write_state(t: Trainer, rng: list[dict[str, Any]]) -> None:
    """``trainer_state.safetensors`` of the trainer's last completed epoch; ``rng``: every rank's RNG states."""
    from ..recipe import recipe_of
    from .report import jsonable
    from .state import save_trainer_state

    save_trainer_state(
        t.out, epoch=t.epoch, updates=t.updates, model=t.model,
        ema=t.ema.module if t.ema is not None else None, optimizer=t.optimizer,
        scheduler_state=jsonable(t.scheduler.state_dict()), rng=rng, best=t.best,
        history=t.history, config=t.config.to_dict(), recipe=recipe_of(t.model).to_json(),
    )


def write_epoch_files(t: Trainer) -> None:
    """``last`` (and ``ema``), ``best`` (and with ``--train blocks|head`` ``best.adapter``) when the trainer's last
    epoch is the best, ``metrics.csv``, ``curves.png``.

    Everything comes from the in-memory state of the last completed epoch, so a resumed run
    calls this once first: a kill between the trainer state and these files loses nothing.
    """
    from ..checkpoint import save_checkpoint
    from .model import describe_source
    from .report import checkpoint_extra
    from .run_folder import BEST, EMA, LAST

    row = t.history[-1]
    val = {"top1": row["val_top1"], "top5": row["val_top5"], "loss": row["val_loss"]}
    ema_val = None
    save_checkpoint(t.model, t.out / LAST, extra=checkpoint_extra(t, t.epoch, "model", val))
    if t.ema is not None:
        ema_val = {"top1": row["ema_val_top1"], "top5": row["ema_val_top5"], "loss": row["ema_val_loss"]}
        save_checkpoint(t.ema.module, t.out / EMA, extra=checkpoint_extra(t, t.epoch, "ema", ema_val))
    if t.best["epoch"] == t.epoch:
        weights = t.best["weights"]
        module = t.ema.module if weights == "ema" and t.ema is not None else t.model
        metrics = ema_val if weights == "ema" and ema_val is not None else val
        save_checkpoint(module, t.out / BEST, extra=checkpoint_extra(t, t.epoch, weights, metrics))
        if t.config.train != "full":  # the backbone is the base's: the gates and head are what the run made
            from ..adapter import save_adapter
            from .run_folder import BEST_ADAPTER

            save_adapter(module, t.out / BEST_ADAPTER, head=True, extra=checkpoint_extra(t, t.epoch, weights, metrics))
    write_metrics_csv(t.out / "metrics.csv", t.history)
    write_diagnostics_csv(t.out, t.history)
    write_curves(t.out / "curves.png", t.history, describe_source(t.config))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per epoch, columns :data:`METRIC_COLUMNS`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _cell(row.get(k)) for k in METRIC_COLUMNS})
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_diagnostics_csv(folder: Path, history: list[dict[str, Any]]) -> None:
    """``gates.csv`` (per epoch and stage; only for a model with inserted blocks) and ``drift.csv`` (per epoch
    and parameter group) from the history rows' ``gates`` and ``drift`` (:mod:`.diagnostics`)."""
    from .diagnostics import DRIFT_COLUMNS, GATE_COLUMNS

    for name, key, columns in (("gates.csv", "gates", GATE_COLUMNS), ("drift.csv", "drift", DRIFT_COLUMNS)):
        rows = [r for row in history for r in row.get(key) or []]
        if not rows:
            continue
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r.get(k)) for k in columns})
        atomic_write_bytes(folder / name, buffer.getvalue().encode())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_curves(path: Path, history: list[dict[str, Any]], title: str) -> None:
    """A two-panel PNG: loss (train, val, EMA val) and val top-1 (and EMA) per epoch.

    Drawn on a bare ``matplotlib.figure.Figure`` (rendered by Agg, no pyplot, no display, no
    global backend switch).
    """
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label, color in (("train_loss", "train (label-smoothed)", "C0"), ("val_loss", "val", "C1"),
                              ("ema_val_loss", "val (EMA)", "C2")):
        values = [r.get(key) for r in history]
        if any(_number(v) for v in values):
            loss_ax.plot(epochs, [v if _number(v) else math.nan for v in values], marker="o", label=label, color=color)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    loss_ax.legend()
    for key, label, color in (("val_top1", "val", "C1"), ("ema_val_top1", "val (EMA)", "C2")):
        values = [r.get(key) for r in history]
        if any(_number(v) for v in values):
            acc_ax.plot(epochs, [100 * v if _number(v) else math.nan for v in values], marker="o", label=label,
                        color=color)
    acc_ax.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
