"""Running a grid: one ``retrofit finetune`` run per (cell, seed), skipped when done, resumed when interrupted.

Each run is :func:`retrofit.train.finetune` with the template's settings plus the cell's
(block, placement, stages, reduction, kernel size, frozen phase) and the seed, in
``OUTPUT/<cell id>/seed-<s>/``. A run's state is read off its folder:

* done: ``summary.json`` says every epoch was trained — nothing is trained again;
* interrupted: a ``trainer_state.safetensors`` — resumed from its last saved epoch
  (finetune's exact ``--resume``);
* otherwise it starts (a folder holding only the run record of a run killed before its first
  epoch is started again by finetune itself).

A run whose recorded settings differ from the grid's is refused before anything runs, naming the
setting (finetune's resume check). A run that fails is recorded in ``failed.json`` in its folder
(one line) and the grid goes on. After a run, its final weights (``last.safetensors``) are
evaluated on the validation images with :func:`retrofit.evaluate.evaluate` and the per-image
predictions written to ``predictions.csv`` (McNemar's test pairs them across cells).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..errors import RetrofitError
from ..train.config import FinetuneConfig, resume_mismatch
from .grid import Run

FAILED = "failed.json"
PREDICTIONS = "predictions.csv"
SUMMARY, STATE, RECORD, LAST = "summary.json", "trainer_state.safetensors", "config.json", "last.safetensors"


def run_config(template: FinetuneConfig, run: Run) -> FinetuneConfig:
    """The finetune settings of ``run``: the template (output = the grid's OUTPUT) with the cell's and the seed's.

    Settings that do not apply to the cell keep finetune's defaults, so a run's recorded settings
    depend only on what applies to it.
    """
    from ..blocks import block_class
    from .grid import NOISE_LR_FACTOR, has_parameters

    cell = run.cell
    defaults = FinetuneConfig(source="", data="", output="")
    block = cell.block if cell.inserts else None
    options = block_class(block).OPTIONS if block else ()
    frozen = cell.train in ("blocks", "head")
    trains_blocks = block is not None and has_parameters(block)
    return dataclasses.replace(
        template,
        output=str(Path(template.output) / run.folder), seed=run.seed, block=block,
        placement=cell.placement or defaults.placement,
        stages=list(cell.stages) if cell.stages is not None else None,
        reduction=cell.reduction if cell.reduction is not None else defaults.reduction,
        kernel_size=cell.kernel_size if isinstance(cell.kernel_size, int) else None,
        init=cell.init or defaults.init,
        groups=template.groups if "groups" in options else None,
        include=template.include if block else None, exclude=template.exclude if block else None,
        freeze_backbone_epochs=template.epochs if frozen else template.freeze_backbone_epochs,
        lr=template.lr * NOISE_LR_FACTOR if cell.is_noise else template.lr,
        block_lr_mult=template.block_lr_mult if trains_blocks else None,
        block_warmup_epochs=template.block_warmup_epochs if trains_blocks else None,
        resume=False, overwrite=False, until_epoch=None,
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when missing or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_state(folder: Path, epochs: int) -> str:
    """``done``, ``interrupted`` or ``new`` (see the module docstring)."""
    summary = read_json(folder / SUMMARY)
    if summary is not None and summary.get("epochs_done") == epochs and (folder / LAST).is_file():
        return "done"
    if (folder / STATE).is_file():
        return "interrupted"
    return "new"


def check_recipes(template: FinetuneConfig, runs: list[Run]) -> None:
    """Refuse (one line) a run folder whose recorded settings differ from what the grid would run there."""
    root = Path(template.output)
    for run in runs:
        record = read_json(root / run.folder / RECORD)
        saved = record.get("config") if record else None
        if isinstance(saved, dict):
            mismatch = resume_mismatch(saved, run_config(template, run))
            if mismatch:
                raise RetrofitError(f"{root / run.folder} was run with other settings: {mismatch}")


def evaluation_data(template: FinetuneConfig) -> str:
    """What a run validates on: ``--val-data``, else ``--data`` (its ``val/``, or a torchvision test split)."""
    return template.val_data or template.data


def ensure_predictions(template: FinetuneConfig, folder: Path) -> None:
    """Write ``predictions.csv`` of the run's final weights unless it is newer than ``last.safetensors``."""
    target, out = folder / LAST, folder / PREDICTIONS
    if out.is_file() and out.stat().st_mtime_ns >= target.stat().st_mtime_ns:
        return
    from ..evaluate import evaluate, write_predictions

    result = evaluate(target, evaluation_data(template), batch_size=2 * template.batch_size, workers=template.workers,
                      device=template.device, precision=template.precision, dataset_root=template.dataset_root)
    write_predictions(out, [result])


def complete_predictions(template: FinetuneConfig, runs: list[Run]) -> None:
    """Write the missing ``predictions.csv`` of finished runs (a process killed between a run's end and its
    predictions, or a run another process finished): the tables then count them as done. An evaluation that
    fails is recorded in the run's ``failed.json``."""
    root = Path(template.output)
    for run in runs:
        folder = root / run.folder
        if run_state(folder, template.epochs) == "done" and not (folder / PREDICTIONS).is_file():
            try:
                ensure_predictions(template, folder)
            except Exception as e:  # recorded like a failed run; the tables are still written
                record_failure(folder, one_line(e))


def record_failure(folder: Path, reason: str) -> None:
    from ..checkpoint import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / FAILED, (json.dumps({"reason": reason}) + "\n").encode())


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if isinstance(e, RetrofitError):
        return text[0] if text else "failed"
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def execute(template: FinetuneConfig, runs: list[Run], console: Any) -> int:
    """Train the ``runs`` (this process's shard) in order; returns how many failed in this invocation.

    Prints one line per run; an overall rich bar over runs holds finetune's own bar (rich ≥ 14.1
    nests them). Ctrl-C stops the grid: the interrupted run resumes at the next invocation.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..train import finetune

    root = Path(template.output)
    failed = 0
    progress = Progress(TextColumn("ablation"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                        TimeElapsedColumn(), console=console, transient=True)
    with progress:
        task = progress.add_task("", total=len(runs))
        for i, run in enumerate(runs, 1):
            folder = root / run.folder
            head = f"run {i}/{len(runs)} · {run.folder}"
            state = run_state(folder, template.epochs)
            started = time.perf_counter()
            try:
                if state != "done":
                    finetune(dataclasses.replace(run_config(template, run), resume=state == "interrupted"), console=console)
                    (folder / FAILED).unlink(missing_ok=True)
                ensure_predictions(template, folder)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"during {folder}; run the same command again to continue the grid "
                                        "(finished runs are kept, this one resumes from its last saved epoch)") from None
            except Exception as e:  # a failing run is recorded and the grid goes on
                failed += 1
                record_failure(folder, one_line(e))
                _say(console, f"{head} · failed: {one_line(e)}")
            else:
                _say(console, f"{head} · {_result(folder, state, time.perf_counter() - started)}")
            progress.advance(task)
    return failed


def _result(folder: Path, state: str, seconds: float) -> str:
    summary = read_json(folder / SUMMARY) or {}
    last = summary.get("last") or {}
    top1 = f"val top-1 {100 * last['val_top1']:.2f}%" if "val_top1" in last else "done"
    what = {"done": "already done", "interrupted": "resumed", "new": "trained"}[state]
    return f"{what} · {top1} · {seconds:.1f} s"


def _say(console: Any, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)
