"""The ``retrofit`` command line: a thin Typer layer over the library API.

Each sub-module registers its commands on :data:`app`; nothing here imports torch at import
time, so ``retrofit --help`` is instant.
"""

from .app import app, main
from . import add, demo, predict, report, finetune, evaluate, ablate, save, export  # noqa: F401  (each registers its commands)

__all__ = ["app", "main"]
