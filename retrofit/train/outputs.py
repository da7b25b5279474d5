"""The human-readable outputs of a run: ``metrics.csv``, ``curves.png``, ``config.json``, ``summary.json``.

Every file is rewritten whole from the run's history and replaced atomically
(:func:`retrofit.checkpoint.atomic_write_bytes`), so a reader never sees half a file and a
resumed run's ``metrics.csv`` has exactly one row per completed epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes

#: ``metrics.csv`` columns. Losses are mean cross-entropy per image (train: with label
#: smoothing); top-1/top-5 are fractions in [0, 1]; ``ema_*`` are empty when EMA is off.
METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5",
    "ema_val_loss", "ema_val_top1", "ema_val_top5", "train_images_per_s", "epoch_seconds", "skipped_images",
)


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
