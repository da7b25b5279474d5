""":func:`ablate`: train this process's share of a grid, then merge every run folder into the tables.

Sharding (``shard=(I, N)``) takes every N-th run from the I-th: N processes — a Slurm job array,
or one process per GPU — split a grid without any scheduler of retrofit's. Each writes the tables
from whatever the folders hold when it ends, under a lock on ``OUTPUT/.ablation.lock``, so the
last process to finish writes the complete tables; ``report_only`` merges without training.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import RetrofitError
from ..train.config import FinetuneConfig
from .grid import Grid, shard as shard_runs
from .report import markdown, write_csv, write_json, write_png
from .runner import check_recipes, complete_predictions, execute
from .tables import RunResult, collect, summarize

CSV, JSON, MD, PNG, LOCK = "ablation.csv", "ablation.json", "ablation.md", "ablation.png", ".ablation.lock"


@dataclass
class AblationResult:
    """What the folders held when the tables were written.

    ``runs``: every run of the grid (``row`` = its ``ablation.csv`` row); ``cells``: one summary
    per cell (``ablation.json``'s ``cells``); ``failed_now``: runs that failed in this invocation.
    """

    output: Path
    runs: list[RunResult]
    cells: list[dict[str, Any]]
    failed_now: int

    def count(self, status: str) -> int:
        """Runs whose status is ``done``, ``failed`` or ``pending``."""
        return sum(r.row["status"] == status for r in self.runs)


def ablate(
    template: FinetuneConfig,
    grid: Grid,
    *,
    shard: tuple[int, int] = (1, 1),
    report_only: bool = False,
    console: Any = None,
) -> AblationResult:
    """Run the grid's runs of shard ``shard`` (skipping finished ones, resuming interrupted ones) and write
    ``ablation.csv``, ``ablation.json``, ``ablation.md`` and ``ablation.png`` in ``template.output``.

    Args:
        template: the finetune settings every run shares; ``output`` is the grid's folder.
            ``block``, ``placement``, ``stages``, ``reduction``, ``kernel_size``, ``seed`` and the
            frozen phase come from each cell; ``resume``/``overwrite``/``until_epoch`` are ignored.
        grid: the axes (validated here).
        shard: ``(I, N)``: run every N-th run of the grid from the I-th (1-based).
        report_only: train nothing; merge the folders into the tables.
        console: a ``rich.console.Console`` for progress and the per-run lines (None: a default one).

    Raises:
        RetrofitError: an invalid grid or shard, bad settings, a missing data folder, an output
            that is a file, or a run folder made with other settings (nothing runs then). A run
            that fails is not raised: it is recorded in ``ablation.csv`` and counted.
    """
    grid.validate()
    runs = grid.runs()
    mine = shard_runs(runs, *shard)
    template.validate()
    template = template.absolute_paths()
    root = Path(template.output)
    if root.exists() and not root.is_dir():
        raise RetrofitError(f"--output {root} is a file; ablate writes a folder of runs there")
    if not template.data.startswith("torchvision:") and not Path(template.data).is_dir():
        raise RetrofitError(f"data folder not found: {template.data}")
    check_recipes(template, runs)
    if console is None:
        from rich.console import Console

        console = Console()
    _check_tables(root)
    failed_now = 0
    try:  # the folder and its lock file now, so that a path that cannot be written fails before any run
        root.mkdir(parents=True, exist_ok=True)
        os.close(os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as e:
        raise RetrofitError(f"cannot write {root}: {e.strerror or e}") from None
    if not report_only:
        failed_now = execute(template, mine, console)
    with _locked(root / LOCK):
        complete_predictions(template, runs)
        results = collect(root, runs, template.epochs)
        cells = grid.cells()
        summaries = summarize(results, cells)
        header = {"source": _name(template.source), "data": template.data, "recipe": _recipe(template),
                  "settings": template.to_dict(), "grid": _grid(grid)}
        write_json(root / JSON, header, results, summaries)  # first: the record that says the others are a study's
        write_csv(root / CSV, results)
        from ..checkpoint import atomic_write_bytes

        atomic_write_bytes(root / MD, markdown(header, grid, results, summaries, cells).encode())
        write_png(root / PNG, grid, summaries, f"{header['source']} · {Path(template.data).name}")
    return AblationResult(root, results, summaries, failed_now)


def _check_tables(root: Path) -> None:
    """Refuse an output folder whose ``ablation.*`` files are not an earlier study's (which a study
    rewrites as it grows): a user's own ``ablation.md`` is never replaced.

    Raises :class:`RetrofitError` naming the first such file.
    """
    present = [name for name in (CSV, JSON, MD, PNG) if (root / name).exists()]
    if present and not _is_study_record(root / JSON):
        raise RetrofitError(f"--output {root} holds {present[0]}, which retrofit ablate did not write; choose another "
                            "--output, or move that file")


def _is_study_record(path: Path) -> bool:
    """Whether ``path`` is an ``ablation.json`` that :func:`ablate` wrote."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"source", "data", "recipe", "grid", "runs", "cells"} <= set(record)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (held while the tables are read and written)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _name(source: str) -> str:
    return Path(source).name if source.endswith(".safetensors") else source


def _recipe(t: FinetuneConfig) -> str:
    size = f"{t.img_size} px" if t.img_size else "the model's input size"
    block_warmup = t.block_warmup_epochs_used()
    return (f"epochs {t.epochs}, batch {t.batch_size}, {t.optimizer} lr {t.lr:g} (head × {t.head_lr_mult:g}, "
            f"inserted blocks × {t.block_lr_mult_used():g}"
            + (f" ramped up over {block_warmup:g} epochs" if block_warmup else "") + "), "
            f"warmup {t.warmup_epochs:g} epochs, BatchNorm statistics {t.bn_stats}, weight decay {t.weight_decay:g}, label smoothing {t.label_smoothing:g}, "
            f"{size}, random-resized crop {t.scale[0]:g}–{t.scale[1]:g}, hflip {t.hflip:g}, "
            f"colour jitter {t.color_jitter:g}{', EMA' if t.ema else ''}")


def _grid(grid: Grid) -> dict[str, Any]:
    return {"blocks": list(grid.blocks), "placements": list(grid.placements),
            "stages": [None if s is None else list(s) for s in grid.stages], "reductions": list(grid.reductions),
            "kernel_sizes": list(grid.kernel_sizes), "train": list(grid.train), "seeds": list(grid.seeds),
            "init": grid.init}
