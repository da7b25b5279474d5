"""``retrofit ablate``: the SE / ECA papers' controlled comparisons, run on your own network and data.

    from retrofit.ablation import Grid, ablate
    from retrofit.train import FinetuneConfig

    result = ablate(FinetuneConfig("resnet18", data="digits", output="runs/ablation", epochs=5),
                    Grid(blocks=("none", "eca", "se"), seeds=(0, 1, 2)))
    result.cells     # one summary per cell: top-1 mean ± std, paired Δ vs base with its interval, verdict

Modules: :mod:`.grid` (axes, cells, runs, shards), :mod:`.runner` (one finetune run per cell and
seed, resumable), :mod:`.tables` (results read back from the run folders, per-cell statistics),
:mod:`.report` (ablation.csv / .json / .md / .png), :mod:`.study` (:func:`ablate`).
Names are imported lazily, so importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AblationResult": "study",
    "ablate": "study",
    "Cell": "grid",
    "Grid": "grid",
    "Run": "grid",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrofit.ablation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
