"""``retrofit finetune``'s engine: fine-tune a (retrofitted) model on an image dataset.

    from retrofit.train import FinetuneConfig, finetune

    result = finetune(FinetuneConfig("tf_efficientnet_lite0", data="digits", output="runs/eca",
                                     block="eca", weights="lite0.safetensors", img_size=64, epochs=5))
    result.best   # {"epoch": …, "top1": …, "weights": "model" or "ema"}

Modules: :mod:`.config` (the recipe), :mod:`.data` (datasets, timm transforms, loaders),
:mod:`.model` (head, parameter groups, freezing), :mod:`.run` (a run from start to end),
:mod:`.run_folder` (the output folder's life cycle), :mod:`.setup` (model and data of a run),
:mod:`.optim` (optimizer, schedule, EMA), :mod:`.loop` (the epoch loop: train, evaluate, save),
:mod:`.state` (resumable trainer state), :mod:`.distributed` (torchrun/DDP),
:mod:`.outputs` (checkpoints, metrics.csv, curves.png), :mod:`.report` (console lines, run record),
:mod:`.digits` (the offline digits set).
Names are imported lazily, so importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FinetuneConfig": "config",
    "FinetuneResult": "run",
    "finetune": "run",
    "write_digits": "digits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrofit.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
