"""The grid's output files: ``ablation.csv``, ``ablation.json``, ``ablation.md`` and ``ablation.png``.

``ablation.md`` has one table per training mode, one row per cell, laid out like the papers'
tables (ECA-Net Table 2 for block variants, SE-Net §6.5 for placements): parameters and MACs
with their Δ against the base, top-1 mean ± std over seeds, the paired Δ top-1 against the base
with its 95 % interval, McNemar's p and the verdict. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes
from .grid import NONE, Cell, Grid
from .tables import COLUMNS, RunResult

#: Axes that get a column (and a plot panel) when the grid has more than one value on them.
_AXIS_COLUMNS = (("placement", "placements"), ("stages", "stages"), ("reduction", "reductions"),
                 ("kernel_size", "kernel_sizes"), ("train", "train"))
_TRAIN_TITLES = {"full": "every weight trains", "blocks": "only the inserted blocks and the head train, backbone "
                 "and BatchNorm statistics frozen; the base row trains its head alone",
                 "head": "linear probe: only the head trains; an identity-init block that does not train leaves "
                 "its base unchanged, so only the base is run"}


def write_csv(path: Path, results: list[RunResult]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(r.row)
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_json(path: Path, header: dict[str, Any], results: list[RunResult], summaries: list[dict[str, Any]]) -> None:
    payload = {**header, "runs": [r.row for r in results], "cells": summaries}
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def varying(grid: Grid) -> list[str]:
    """The cell columns that vary in this grid (besides the block)."""
    return [column for column, axis in _AXIS_COLUMNS if len(getattr(grid, axis)) > 1]


def markdown(header: dict[str, Any], grid: Grid, results: list[RunResult], summaries: list[dict[str, Any]],
             cells: list[Cell]) -> str:
    """The text of ``ablation.md``."""
    status = [r.row["status"] for r in results]
    lines = [f"# Ablation: {header['source']} on {header['data']}", "",
             f"{len(results)} runs ({status.count('done')} done, {status.count('failed')} failed, "
             f"{status.count('pending')} pending): {len(cells)} cells × seeds {', '.join(map(str, grid.seeds))}. "
             f"Recipe: {header['recipe']}.", ""]
    by_id = {s["cell"]: s for s in summaries}
    columns = [c for c in varying(grid) if c != "train"]
    for train in grid.train:
        members = [c for c in cells if not c.is_base and c.train == train]
        base = Cell(NONE, train=train).base()
        rows = ([by_id[base.id]] if base.id in by_id else []) + [by_id[c.id] for c in members]
        if not rows:
            continue
        lines += [f"## Training: {train} ({_TRAIN_TITLES[train]}){_layout(grid)}", ""]
        lines += _table(rows, columns)
        lines.append("")
    lines += _moved_table(summaries, cells)
    failed = [r for r in results if r.row["status"] == "failed"]
    if failed:
        lines += ["## Failed runs", ""] + [f"* `{r.run.folder}`: {r.row['error']}" for r in failed] + [""]
    lines += [
        "**How to read.** top-1 is the last epoch's validation top-1 (mean ± sample std over the seeds that "
        "finished, their count in brackets). Δ top-1 is the mean over seeds of (cell − base) on the same seed, in "
        "points, with a 95 % Student-t interval (n − 1 degrees of freedom; none with one seed). McNemar: exact "
        "two-sided binomial test on the validation images that only the base (b) or only the cell (c) gets right, "
        "pooled over those seeds. Verdict: *better* / *worse* when the interval lies above / below 0 **and** "
        "McNemar's p < 0.05 (with one seed: p alone), otherwise *not distinguishable*. A *noise* row is the base "
        "trained again with its learning rate × (1 + 1e-5): its difference to the base is what this recipe does "
        "by chance, and a block whose difference is no larger is not distinguishable from that noise. MACs: one forward pass of "
        "one image at the run's input size.", ""]
    return "\n".join(lines)


def _moved_table(summaries: list[dict[str, Any]], cells: list[Cell]) -> list[str]:
    """``## What moved``: per cell, the RMS change of backbone, blocks and head since the run's start, and per
    stage the gates' mean |gate − 1| with their range (an identity-init gate starts at exactly 1; its range
    is (0, 2), so a min near 0 or a max near 2 is a saturated gate). Mean over seeds, last epoch."""
    by_id = {s["cell"]: s for s in summaries}
    rows = [by_id[c.id] for c in cells if c.id in by_id and (by_id[c.id]["moved"] or {}).get("drift")]
    if not rows:
        return []
    stages = sorted({st for s in rows for st in s["moved"]["gates"]})
    head = ["cell", "RMS Δ backbone", "RMS Δ blocks", "RMS Δ head"] + [f"stage {st}: mean abs(gate − 1) [min, max]"
                                                                       for st in stages]
    out = ["## What moved (last epoch, mean over seeds)", "",
           "RMS Δ: root-mean-square change of each parameter group since the run's start (`drift.csv`). Gates: "
           "the inserted blocks' gate values on the validation images (`gates.csv`); identity init starts every "
           "gate at exactly 1, and its range is (0, 2).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        drift, gates = s["moved"]["drift"], s["moved"]["gates"]
        cells_ = [s["cell"]] + [_small(drift.get(g)) for g in ("backbone", "blocks", "head")]
        cells_ += [f"{_small(gates[st]['dev'])} [{gates[st]['min']:.3f}, {gates[st]['max']:.3f}]" if st in gates
                   else "—" for st in stages]
        out.append("| " + " | ".join(cells_) + " |")
    return out + [""]


def _small(v: Any) -> str:
    return "—" if v is None else f"{v:.2e}"


def _layout(grid: Grid) -> str:
    if len(grid.placements) > 1:
        return "; placements as in SE-Net §6.5, Table 14"
    if len(grid.blocks) > 2:
        return "; variants as in ECA-Net Table 2"
    return ""


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    head = ["block", *columns, "params", "Δ params", "MACs", "Δ MACs", "top-1 (%)", "top-5 (%)",
            "Δ top-1 vs base (points, 95 % CI)", "McNemar p (b / c)", "verdict"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        paired, mc = s["paired"], s["mcnemar"]
        cells = [s["block"], *[s[c] or "—" for c in columns], _int(s["params"]), _signed(s["params_delta"]),
                 _macs(s["macs"]), _signed(s["macs_delta"]), _top1(s), _percent(s["top5_mean"]),
                 _interval(paired) if paired else "—",
                 f"{mc['p']:.3g} ({mc['base_only_correct']} / {mc['cell_only_correct']})" if mc else "—",
                 s["verdict"] or ("pending" if s["pending"] else "—")]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return out


def _int(v: Any) -> str:
    return "—" if v in (None, "") else f"{v:,}"


def _signed(v: Any) -> str:
    return "—" if v is None else f"{v:+,}"


def _macs(v: Any) -> str:
    return "—" if v in (None, "") else f"{v / 1e6:,.2f} M"


def _percent(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _top1(s: dict[str, Any]) -> str:
    if s["top1_mean"] is None:
        return "—"
    spread = f" ± {100 * s['top1_std']:.2f}" if s["top1_std"] is not None else ""
    return f"{100 * s['top1_mean']:.2f}{spread} ({s['runs']})"


def _interval(p: dict[str, Any]) -> str:
    mean = _points(p["mean"])
    return mean if p["low"] is None else f"{mean} [{_points(p['low'])}, {_points(p['high'])}]"


def _points(fraction: float) -> str:
    """A signed difference in percentage points; a float rounding residue never reads as -0.00."""
    text = f"{100 * fraction:+.2f}"
    return "+0.00" if text == "-0.00" else text


def write_png(path: Path, grid: Grid, summaries: list[dict[str, Any]], title: str) -> None:
    """Top-1 (mean ± std over seeds) against parameters added to the base, one marker per block; then one
    panel per other axis with more than one value (top-1 against that axis, one line per block and setting)."""
    from matplotlib.figure import Figure

    done = [s for s in summaries if s["top1_mean"] is not None]
    extra = varying(grid)
    fig = Figure(figsize=(5.2 * (1 + len(extra)), 4.2), layout="constrained")
    axes = fig.subplots(1, 1 + len(extra), squeeze=False)[0]
    markers = dict(zip(dict.fromkeys(s["block"] for s in summaries), "osD^v<>ph*"))
    ax = axes[0]
    for block, marker in markers.items():
        points = [s for s in done if s["block"] == block]
        if points:
            ax.errorbar([s["params_delta"] or 0 for s in points], [100 * s["top1_mean"] for s in points],
                        yerr=[100 * (s["top1_std"] or 0) for s in points], fmt=marker, capsize=3, label=block)
    ax.set_xscale("symlog", linthresh=10)
    ax.set(xlabel="parameters added to the base", ylabel="val top-1 (%)", title="top-1 vs added parameters")
    for ax, column in zip(axes[1:], extra):
        values = list(dict.fromkeys(s[column] or "—" for s in summaries))
        series: dict[tuple, list[dict[str, Any]]] = {}
        for s in done:
            key = (s["block"], *[s[c] for c in extra if c != column])
            series.setdefault(key, []).append(s)
        for key, points in series.items():
            xs = [values.index(s[column] or "—") for s in points]
            ax.errorbar(xs, [100 * s["top1_mean"] for s in points], yerr=[100 * (s["top1_std"] or 0) for s in points],
                        marker=markers.get(key[0], "o"), capsize=3, label=" ".join(str(k) for k in key if k))
        ax.set_xticks(range(len(values)), values)
        ax.set(xlabel=column.replace("_", " "), ylabel="val top-1 (%)", title=f"top-1 by {column.replace('_', ' ')}")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
