"""``retrofit evaluate TARGET [TARGET2] --data DIR``: top-1, top-5 and loss on a dataset; two targets side by side
with McNemar's exact test. Parsing and printing only; the library is :mod:`retrofit.evaluate`."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .add import JsonOpt, NoPretrainedOpt, NumClassesOpt, WeightsOpt, check_weight_flags
from .app import app, fail, handle_errors

DataOpt = Annotated[str, typer.Option(
    "--data", help="ImageFolder root with val/<class>/<image> (or a folder of class folders), or torchvision:NAME (its test split).")]


@app.command("evaluate")
@handle_errors
def evaluate(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="A retrofit checkpoint (.safetensors) or a model name.")],
    data: DataOpt,
    target2: Annotated[Optional[str], typer.Argument(
        metavar="[TARGET2]", help="A second checkpoint or model name, evaluated on the same images and compared.")] = None,
    weights: WeightsOpt = None,
    other_weights: Annotated[Optional[Path], typer.Option("--other-weights", help="Local weights for TARGET2 when it is a model name.")] = None,
    no_pretrained: NoPretrainedOpt = False,
    num_classes: NumClassesOpt = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Add the accuracy of each class.")] = False,
    predictions: Annotated[Optional[Path], typer.Option(
        "--predictions", help="Write one CSV row per image: path, label, predicted, probability.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --predictions file.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 64,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Data-loading processes (default: min(4, CPUs)).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cuda or cpu.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.")] = "auto",
    dataset_root: Annotated[Optional[Path], typer.Option(
        "--dataset-root", help="Folder of torchvision datasets (default ~/.cache/retrofit/datasets).")] = None,
    download: Annotated[bool, typer.Option("--download", help="Download a torchvision:NAME dataset when missing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Top-1, top-5, mean loss and image count of TARGET on --data; with TARGET2, both and McNemar's exact test.

    Preprocessing: the data config a fine-tuned checkpoint recorded, else timm's for the model (finetune's eval transform).
    """
    from ..checkpoint import is_checkpoint

    if target2 is None and other_weights is not None:
        fail("--other-weights applies to TARGET2, and no TARGET2 is given")
    from ..limits import check_block_numbers

    check_block_numbers(num_classes=num_classes)
    check_weight_flags(target, weights, False, "--weights", "TARGET")
    if target2 is not None:
        check_weight_flags(target2, other_weights, False, "--other-weights", "TARGET2")
    if no_pretrained and (weights is not None or other_weights is not None):
        fail(f"{'--weights' if weights is not None else '--other-weights'} and --no-pretrained exclude each other")
    if no_pretrained and all(is_checkpoint(t) for t in (target, target2) if t is not None):
        fail("--no-pretrained applies to a model name; every target here is a checkpoint, which holds its own weights")
    lock: Any = contextlib.nullcontext()
    if predictions is not None:
        from ..checkpoint import check_writable
        from ..lock import output_lock

        check_writable(predictions, overwrite)
        for option, given in (("TARGET", target), ("TARGET2", target2), ("--weights", weights),
                              ("--other-weights", other_weights)):
            if given is not None and predictions.exists() and Path(given).exists() and os.path.samefile(predictions, given):
                fail(f"--predictions {predictions} is the {option} file itself; write the predictions to another file")
        lock = output_lock(predictions, "--predictions")  # also creates its folder: a bad path fails before the work
    with lock:
        if predictions is not None:
            check_writable(predictions, overwrite)  # again, now that no other retrofit command can be writing it
        _evaluate(target, data, target2, weights, other_weights, no_pretrained, num_classes, per_class, predictions,
                  overwrite, batch_size, workers, device, precision, dataset_root, download, as_json)


def _evaluate(target: str, data: str, target2: Optional[str], weights: Optional[Path], other_weights: Optional[Path],
              no_pretrained: bool, num_classes: Optional[int], per_class: bool, predictions: Optional[Path],
              overwrite: bool, batch_size: int, workers: Optional[int], device: str, precision: str,
              dataset_root: Optional[Path], download: bool, as_json: bool) -> None:
    from rich.console import Console

    from ..checkpoint import is_checkpoint, load_target
    from ..evaluate import compare, evaluate as run, recorded_classes, write_predictions
    from ..train.model import num_classes as head_size

    console = Console(stderr=True)
    n = {} if num_classes is None else {"num_classes": num_classes}  # for whichever target is a model name
    models = [load_target(target, pretrained=not no_pretrained, weights=weights, **({} if is_checkpoint(target) else n))]
    if target2 is not None:
        models.append(load_target(target2, pretrained=not no_pretrained, weights=other_weights,
                                  **({} if is_checkpoint(target2) else n)))
        a, b = models
        if recorded_classes(a) != recorded_classes(b) or head_size(a) != head_size(b):
            fail(f"{target} and {target2} name their classes differently ({head_size(a)} and {head_size(b)} "
                 "classes, or other names): a comparison needs two models of the same classes")
    common = {"batch_size": batch_size, "workers": workers, "device": device, "precision": precision,
              "dataset_root": str(dataset_root) if dataset_root else None, "download": download, "console": console}
    results = [run(m, data, name=t, **common) for m, t in zip(models, [target, target2])]
    comparison = compare(*results) if len(results) == 2 else None
    if predictions is not None:
        write_predictions(predictions, results, overwrite=overwrite)
    if as_json:
        payload = comparison.to_dict(per_class) if comparison else results[0].to_dict(per_class)
        typer.echo(json.dumps(payload, indent=2))
        return
    _print(results, comparison, per_class, predictions)


def _print(results: list[Any], comparison: Any, per_class: bool, predictions: Optional[Path]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{results[0].data}", box=box.SIMPLE_HEAD)
    table.add_column("")
    for r in results:
        table.add_column(r.target, justify="right", overflow="fold")
    if comparison:
        table.add_column("Δ (2nd − 1st)", justify="right")
    rows = (("top-1", "top1", True), ("top-5", "top5", True), ("loss", "loss", False))
    for label, key, percent in rows:
        values = [getattr(r, key) for r in results]
        cells = [f"{100 * v:.2f}%" if percent else f"{v:.4f}" for v in values]
        if comparison:
            delta = values[1] - values[0]
            cells.append(f"{100 * delta:+.2f} points" if percent else f"{delta:+.4f}")
        table.add_row(label, *cells)
    table.add_row("images", *[str(r.images) for r in results], *([""] if comparison else []))
    console.print(table)
    if per_class:
        classes = Table(title="per class", box=box.SIMPLE_HEAD)
        classes.add_column("class")
        classes.add_column("images", justify="right")
        for r in results:
            classes.add_column(f"top-1 {r.target}", justify="right", overflow="fold")
        rows_by_target = [r.per_class() for r in results]
        for i, row in enumerate(rows_by_target[0]):
            cells = ["—" if rt[i]["top1"] is None else f"{100 * rt[i]['top1']:.2f}%" for rt in rows_by_target]
            classes.add_row(row["class"], str(row["images"]), *cells)
        console.print(classes)
    if comparison:
        console.print(f"McNemar's exact test: {comparison.first_only} images only the 1st gets right, "
                      f"{comparison.second_only} only the 2nd; p = {comparison.p_value:.4g} (two-sided)",
                      highlight=False)
    if predictions is not None:
        console.print(f"predictions → {predictions}", highlight=False)
