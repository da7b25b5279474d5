"""``retrofit predict TARGET IMAGE…``: top-k classes of image files, for a model or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .add import JsonOpt, NoPretrainedOpt, WeightsOpt
from .app import app, handle_errors


@app.command("predict")
@handle_errors
def predict(
    target: Annotated[str, typer.Argument(help="A retrofit checkpoint (.safetensors) or a model name.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many classes to show per image.")] = 5,
    weights: WeightsOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the top-k classes of each image (timm preprocessing from the model's data config)."""
    from ..checkpoint import load_target
    from ..predict import predict as run

    model = load_target(target, pretrained=not no_pretrained, weights=weights)
    results = run(model, [str(p) for p in images], top=top)
    if as_json:
        rows = [{"image": r.image, "classes": r.classes, "probs": r.probs} for r in results]
        typer.echo(json.dumps({"target": target, "predictions": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top-{top} of {target}")
    table.add_column("image")
    table.add_column("classes (probability)")
    for r in results:
        table.add_row(Path(r.image).name, ", ".join(f"{c} ({p:.3f})" for c, p in zip(r.classes, r.probs)))
    Console().print(table)
