"""``retrofit predict TARGET IMAGE…``: top-k classes of image files, for a model or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .add import JsonOpt, NoPretrainedOpt, NumClassesOpt, WeightsOpt, check_weight_flags
from .app import app, fail, handle_errors


def check_images(images: list[Path]) -> None:
    """One-line error for an image path that is missing or a folder, before any model is loaded."""
    for image in images:
        if not image.exists():
            fail(f"image not found: {image}")
        if not image.is_file():
            fail(f"{image} is a folder; give image files")


@app.command("predict")
@handle_errors
def predict(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="A retrofit checkpoint (.safetensors) or a model name.")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE", help="Image files.")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many classes to show per image.")] = 5,
    weights: WeightsOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    num_classes: NumClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the top-k classes of each image (timm preprocessing from the model's data config)."""
    from ..limits import check_block_numbers

    check_block_numbers(num_classes=num_classes)
    check_images(images)
    check_weight_flags(target, weights, no_pretrained, "--weights", "TARGET")
    from ..checkpoint import load_target
    from ..predict import predict as run
    from ..predict import random_weights

    model = load_target(target, pretrained=not no_pretrained, weights=weights, num_classes=num_classes)
    if random_weights(model):
        typer.echo(f"warning: {target} has random weights (made with --no-pretrained, never trained): "
                   "its predictions mean nothing", err=True)
    results = run(model, [str(p) for p in images], top=top)
    if as_json:
        rows = [{"image": r.image, "classes": r.classes, "names": r.names, "probs": r.probs} for r in results]
        typer.echo(json.dumps({"target": target, "predictions": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top-{min(top, len(results[0].classes))} of {target}")
    for col, just in (("image", "left"), ("#", "right"), ("class", "right"), ("name", "left"), ("probability", "right")):
        table.add_column(col, justify=just)
    for r in results:
        for rank, (c, name, p) in enumerate(zip(r.classes, r.names, r.probs), 1):
            table.add_row(Path(r.image).name if rank == 1 else "", str(rank), str(c), name, f"{p:.3f}",
                          end_section=rank == len(r.classes))
    Console().print(table)


@app.command("compare")
@handle_errors
def compare(
    base: Annotated[str, typer.Argument(metavar="BASE", help="The reference: a model name or checkpoint.")],
    other: Annotated[str, typer.Argument(metavar="OTHER", help="The model to compare: a checkpoint or model name.")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE", help="Image files.")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many classes to compare per image.")] = 5,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Local weights for BASE when it is a model name.")] = None,
    other_weights: Annotated[Optional[Path], typer.Option("--other-weights", help="Local weights for OTHER when it is a model name.")] = None,
    no_pretrained: NoPretrainedOpt = False,
    num_classes: NumClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-k of BASE and OTHER side by side, the max |Δ logit|, and whether the top-k agree."""
    from ..limits import check_block_numbers

    check_block_numbers(num_classes=num_classes)
    check_images(images)
    from ..checkpoint import is_checkpoint, load_target
    from ..errors import RetrofitError
    from ..predict import class_names
    from ..predict import predict as run

    check_weight_flags(base, weights, False, "--weights", "BASE")
    check_weight_flags(other, other_weights, False, "--other-weights", "OTHER")
    if no_pretrained and (weights is not None or other_weights is not None):
        fail(f"{'--weights' if weights is not None else '--other-weights'} and --no-pretrained exclude each other")
    if no_pretrained and is_checkpoint(base) and is_checkpoint(other):
        fail("--no-pretrained applies to a model name; BASE and OTHER are both checkpoints")
    paths = [str(p) for p in images]
    n = {} if num_classes is None else {"num_classes": num_classes}  # for whichever is a model name
    base_model = load_target(base, pretrained=not no_pretrained, weights=weights, **({} if is_checkpoint(base) else n))
    try:
        other_model = load_target(other, pretrained=not no_pretrained, weights=other_weights,
                                  **({} if is_checkpoint(other) else n))
    except RetrofitError as e:  # its hints name --weights, which is BASE's here
        raise RetrofitError(str(e).replace("--weights FILE", "--other-weights FILE")) from e
    a, b = run(base_model, paths, top=top), run(other_model, paths, top=top)
    if a[0].logits.shape != b[0].logits.shape:
        fail(f"{base} has {a[0].logits.shape[-1]} classes and {other} has {b[0].logits.shape[-1]}: "
             "compare needs two models of the same classes")
    if class_names(base_model) != class_names(other_model):
        fail(f"{base} and {other} name their classes differently: compare needs two models of the same classes")
    rows = [
        {"image": x.image, "base": x.classes, "other": y.classes, "same_top_k": x.classes == y.classes,
         "max_abs_logit_diff": float((x.logits - y.logits).abs().max())}
        for x, y in zip(a, b)
    ]
    if as_json:
        typer.echo(json.dumps({"base": base, "other": other, "images": rows}, indent=2))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top-{len(rows[0]['base'])}: {base}  vs  {other}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("image", overflow="fold")
    for col in ("base", "other", "same", "max |Δ logit|"):  # class lists stay on one line
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(Path(r["image"]).name, " ".join(map(str, r["base"])), " ".join(map(str, r["other"])),
                      "yes" if r["same_top_k"] else "NO", f"{r['max_abs_logit_diff']:.2e}")
    Console().print(table)

