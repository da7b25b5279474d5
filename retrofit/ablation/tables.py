"""The grid's results, read back from its run folders: ``ablation.csv`` rows and per-cell summaries.

Everything is rebuilt from the folders (``config.json``, ``metrics.csv``, ``summary.json``,
``predictions.csv``, ``failed.json``), so any process — one shard, or ``--report-only`` — writes
the same tables once the runs are there.

Per cell: mean ± sample standard deviation of the final top-1 over its seeds (counted from the
per-image predictions, so without metrics.csv's rounding to 6 digits); against the base cell
(``none`` under the same training mode), on the seeds both finished, the paired difference of
top-1 with a 95 % Student-t interval and McNemar's exact test on the per-image predictions pooled
over those seeds (:mod:`retrofit.stats`), and the verdict of :func:`retrofit.stats.verdict`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..stats import mcnemar_exact, paired_difference, verdict
from .grid import Cell, Run
from .runner import FAILED, LAST, PREDICTIONS, RECORD, SUMMARY, read_json, run_state

#: ``ablation.csv`` columns: the cell's axes, the seed, status (done / failed / pending), parameters
#: and MACs (one forward pass at the run's input size), top-1/top-5 as fractions and mean
#: cross-entropy of the last epoch (metrics.csv's last row), the best epoch's top-1, training seconds
#: (sum of epoch_seconds) and training images/s, and a failed run's one-line reason.
COLUMNS = ("cell", "block", "placement", "stages", "reduction", "kernel_size", "train", "seed", "status", "params",
           "macs", "val_top1", "val_top5", "val_loss", "best_top1", "seconds", "images_per_s", "error")


@dataclass
class RunResult:
    """One run as found in its folder: its ``ablation.csv`` row and, when done, per-image correctness."""

    run: Run
    row: dict[str, Any]
    paths: list[str] | None = None
    correct: list[bool] | None = None
    #: the last epoch's ``drift.csv`` (group → RMS change) and ``gates.csv`` (stage → its row); empty when absent
    drift: dict[str, float] | None = None
    gates: dict[int, dict[str, float]] | None = None

    @property
    def done(self) -> bool:
        return self.row["status"] == "done"

    @property
    def top1(self) -> float:
        """Top-1 counted from the per-image predictions: ``val_top1`` without metrics.csv's rounding to 6 digits."""
        return sum(self.correct) / len(self.correct)


def collect(root: Path, runs: list[Run], epochs: int) -> list[RunResult]:
    """Read every run of the grid from ``root``; MACs are counted once per cell."""
    macs: dict[Cell, int] = {}
    return [_collect_one(root / run.folder, run, epochs, macs) for run in runs]


def _collect_one(folder: Path, run: Run, epochs: int, macs: dict[Cell, int]) -> RunResult:
    row: dict[str, Any] = {k: "" for k in COLUMNS}
    row.update(cell=run.cell.id, **run.cell.axes(), seed=run.seed)
    failure = read_json(folder / FAILED)
    if run_state(folder, epochs) != "done" or not (folder / PREDICTIONS).is_file():
        row["status"] = "failed" if failure else "pending"
        row["error"] = failure.get("reason", "") if failure else ""
        return RunResult(run, row)
    metrics = _metrics(folder / "metrics.csv")
    last = metrics[-1]
    summary = read_json(folder / SUMMARY) or {}
    seconds = sum(float(r["epoch_seconds"]) for r in metrics)
    images = sum(float(r["epoch_seconds"]) * float(r["train_images_per_s"]) for r in metrics)
    record = read_json(folder / RECORD) or {}
    if run.cell not in macs:
        macs[run.cell] = _macs(folder / LAST, record.get("data_config", {}).get("input_size"))
    row.update(
        status="done", params=record.get("params", ""), macs=macs[run.cell],
        val_top1=float(last["val_top1"]), val_top5=float(last["val_top5"]), val_loss=float(last["val_loss"]),
        best_top1=float((summary.get("best") or {}).get("top1", max(float(r["val_top1"]) for r in metrics))),
        seconds=round(seconds, 3), images_per_s=round(images / seconds, 3) if seconds else "",
    )
    paths, correct = _predictions(folder / PREDICTIONS)
    drift = {r["group"]: float(r["rms_change"]) for r in _last_epoch(folder / "drift.csv")}
    gates = {int(r["stage"]): {k: float(v) for k, v in r.items() if k.startswith("gate_")}
             for r in _last_epoch(folder / "gates.csv")}
    return RunResult(run, row, paths, correct, drift, gates)


def _last_epoch(path: Path) -> list[dict[str, str]]:
    """The rows of the last epoch of a ``gates.csv`` / ``drift.csv`` (none when the file is absent)."""
    if not path.is_file():
        return []
    rows = _metrics(path)
    last = max((int(r["epoch"]) for r in rows), default=0)
    return [r for r in rows if int(r["epoch"]) == last]


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _predictions(path: Path) -> tuple[list[str], list[bool]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["path"] for r in rows], [r["label"] == r["predicted"] for r in rows]


def _macs(checkpoint: Path, input_size: Any) -> int:
    from ..checkpoint import load_checkpoint
    from ..profiling.profile import profile

    model = load_checkpoint(checkpoint)
    return profile(model, tuple(input_size) if input_size else (3, 224, 224)).macs


def summarize(results: list[RunResult], cells: list[Cell]) -> list[dict[str, Any]]:
    """One summary per cell (grid order): counts, params/MACs and their Δ vs base, top-1 mean ± std,
    the paired difference to the base with its interval, McNemar's p and the verdict."""
    by_cell: dict[Cell, dict[int, RunResult]] = {c: {} for c in cells}
    for r in results:
        by_cell[r.run.cell][r.run.seed] = r
    out = []
    for cell in cells:
        runs = by_cell[cell]
        done = {s: r for s, r in runs.items() if r.done}
        top1 = {s: r.top1 for s, r in done.items()}
        first = next(iter(done.values()), None)
        summary: dict[str, Any] = {
            "cell": cell.id, **cell.axes(), "runs": len(done),
            "failed": sum(r.row["status"] == "failed" for r in runs.values()),
            "pending": sum(r.row["status"] == "pending" for r in runs.values()),
            "params": first.row["params"] if first else None, "macs": first.row["macs"] if first else None,
            "top1": top1, "top1_mean": _mean(top1.values()), "top1_std": _std(top1.values()),
            "top5_mean": _mean([r.row["val_top5"] for r in done.values()]),
            "params_delta": None, "macs_delta": None, "paired": None, "mcnemar": None, "verdict": None,
            "moved": _moved(list(done.values())),
        }
        base = by_cell.get(cell.base())
        if cell.is_base:
            summary["verdict"] = "base" if done else None
        elif base is not None:
            _against_base(summary, done, {s: r for s, r in base.items() if r.done})
        out.append(summary)
    return out


def _against_base(summary: dict[str, Any], done: dict[int, RunResult], base: dict[int, RunResult]) -> None:
    some_base = next(iter(base.values()), None)
    if some_base is not None and summary["params"] not in (None, ""):
        summary["params_delta"] = summary["params"] - some_base.row["params"]
        summary["macs_delta"] = summary["macs"] - some_base.row["macs"]
    seeds = [s for s in done if s in base and done[s].paths == base[s].paths]
    if not seeds:
        return
    diff = paired_difference([base[s].top1 for s in seeds], [done[s].top1 for s in seeds])
    b = sum(x and not y for s in seeds for x, y in zip(base[s].correct, done[s].correct))
    c = sum(y and not x for s in seeds for x, y in zip(base[s].correct, done[s].correct))
    p = mcnemar_exact(b, c)
    summary["paired"] = {"seeds": seeds, "mean": diff.mean, "low": diff.low, "high": diff.high, "level": diff.level}
    summary["mcnemar"] = {"base_only_correct": b, "cell_only_correct": c, "p": p}
    summary["verdict"] = verdict(diff, p)


def _moved(done: list[RunResult]) -> dict[str, Any]:
    """Mean over seeds of the last epoch's RMS parameter change per group, and per stage of the gates' mean
    distance from 1 and their min / max (the extremes over seeds)."""
    groups = sorted({g for r in done for g in (r.drift or {})}, key=["backbone", "blocks", "head"].index)
    stages = sorted({st for r in done for st in (r.gates or {})})
    drift = {g: _mean([r.drift[g] for r in done if r.drift and g in r.drift]) for g in groups}
    gates = {}
    for st in stages:
        rows = [r.gates[st] for r in done if r.gates and st in r.gates]
        gates[st] = {"dev": _mean([row["gate_mean_abs_dev_from_1"] for row in rows]),
                     "min": min(row["gate_min"] for row in rows), "max": max(row["gate_max"] for row in rows)}
    return {"drift": drift, "gates": gates}


def _mean(values: Any) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _std(values: Any) -> float | None:
    values = list(values)
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
