"""``retrofit export CHECKPOINT --format onnx|exported-program -o FILE``: an export checked against the model
before it is written. Parsing and printing only: :func:`retrofit.export.export_target`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .add import InputSizeOpt, JsonOpt, OverwriteOpt, WeightsOpt
from .app import app, handle_errors, parse_input_size


@app.command("export")
@handle_errors
def export(
    checkpoint: Annotated[str, typer.Argument(
        metavar="CHECKPOINT", help="A retrofit checkpoint, an adapter (with --weights BASE), or a model name.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx (checked with onnxruntime) or exported-program "
                                                      "(torch.export.save, a .pt2 file).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write (.onnx, .pt2).")],
    weights: WeightsOpt = None,
    input_size: InputSizeOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export CHECKPOINT (dynamic batch); written only once the exported model reproduces its outputs."""
    size = parse_input_size(input_size)
    from ..export import check_format

    check_format(fmt)  # an unknown format, or onnxruntime missing, before anything is loaded
    from ..export import export_target

    result = export_target(checkpoint, output, format=fmt, weights=str(weights) if weights else None,
                           input_size=size, overwrite=overwrite).to_dict()
    if as_json:
        typer.echo(json.dumps({"checkpoint": checkpoint, **result}, indent=2))
        return
    shape = "×".join(map(str, result["input_shape"]))
    typer.echo(f"wrote {result['output']} ({result['format']}, {result['bytes'] / 2**20:.1f} MiB, input "
               f"{result['input_name']!r} {shape}): {result['runtime']} matches the model at batches "
               f"{', '.join(map(str, result['checked_batches']))}, max |Δ| {result['max_abs_diff']:.2g} ≤ "
               f"{result['tolerance']:.2g}")
