"""``retrofit save SOURCE -o FILE [--adapter]``: rewrite a checkpoint as an adapter (gates and head only) or
as a full checkpoint (an adapter merged with its base). Parsing and printing only: :func:`retrofit.adapter.resave`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .add import JsonOpt, OverwriteOpt
from .app import app, handle_errors


@app.command("save")
@handle_errors
def save(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="A retrofit checkpoint or adapter (.safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write (.safetensors).")],
    adapter: Annotated[bool, typer.Option(
        "--adapter", help="Write only the inserted gates (and the head, when it was fine-tuned), the recipe and the "
                          "digest of the base weights they apply to.")] = False,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", help="The base weights: needed when SOURCE is an adapter; with --adapter, checked to be "
                          "SOURCE's backbone exactly.")] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write SOURCE as an adapter-only file (--adapter) or as a full checkpoint (an adapter with --weights BASE)."""
    from ..adapter import resave

    report = resave(source, output, adapter=adapter, weights=weights, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    what = "adapter" if report["kind"] == "adapter" else "full checkpoint"
    head = " (with the head)" if report["kind"] == "adapter" and report["head"] else ""
    typer.echo(f"wrote {report['output']}: {what}{head}, {report['tensors']} tensors, {report['params']:,} parameters, "
               f"{report['bytes'] / 1024:.1f} KiB")
