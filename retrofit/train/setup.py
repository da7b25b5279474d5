"""What a run trains on: the model (new, or rebuilt from a trainer state to resume), the data and its loaders.

:func:`set_up` checks a resumed run against the one it continues (settings, class names), builds
or rebuilds the model, reads the data with timm's transforms from the model's data config,
replaces the head when the data has other classes, and makes the seeded loaders. The optimizer,
schedule and EMA come after, in :meth:`retrofit.train.loop.Trainer.prepare`.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RetrofitError
from . import distributed
from .config import FinetuneConfig, resume_mismatch
from .data import Splits, build_splits, data_config, loaders, transforms
from .model import check_block_settings, load_source, num_classes, replace_head
from .state import TrainerState, load_trainer_state


@dataclass
class RunInputs:
    """The model and the data of a run.

    ``model`` is on the CPU, head already fitted to the data's classes (``head_before`` → the
    data's count; ``head_replaced``; ``renamed_classes``: replaced because a fine-tuned checkpoint
    named its classes otherwise). ``state`` is the trainer state being resumed, else None.
    """

    model: nn.Module
    state: TrainerState | None
    data_config: dict[str, Any]
    splits: Splits
    head_before: int
    head_replaced: bool
    renamed_classes: bool
    train_loader: Any
    val_loader: Any
    train_sampler: Any


def absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    """Resolve file paths so a run resumed from another folder compares equal."""
    def absolute(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    changes = {
        "output": absolute(config.output),
        "val_data": absolute(config.val_data),
        "weights": absolute(config.weights),
        "dataset_root": absolute(config.dataset_root),
    }
    if not config.data.startswith("torchvision:"):
        changes["data"] = absolute(config.data)
    if config.source.endswith(".safetensors"):
        changes["source"] = absolute(config.source)
    return dataclasses.replace(config, **changes)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_up(config: FinetuneConfig, d: distributed.Dist, out: Path) -> RunInputs:
    """Build the model and the data of a run in ``out``; see the module docstring.

    Raises:
        RetrofitError: a resumed run with other settings, classes or class count; any error of
            loading the model (:func:`retrofit.train.model.load_source`) or the data
            (:func:`retrofit.train.data.build_splits`).
    """
    cfg = config
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    seed_all(cfg.seed + d.rank)

    state = None
    if cfg.resume:
        state = load_trainer_state(out)
        mismatch = resume_mismatch(state.config, cfg)
        if mismatch:
            raise RetrofitError(mismatch)
        from ..checkpoint import rebuild
        from ..recipe import Recipe

        model = rebuild(Recipe.from_json(state.recipe))
    else:
        model = load_source(cfg)
    check_block_settings(model, cfg)

    config_of_data = data_config(model, cfg.img_size)
    train_tf, eval_tf = transforms(config_of_data, hflip=cfg.hflip, scale=cfg.scale, color_jitter=cfg.color_jitter,
                                   auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, re_mode=cfg.re_mode,
                                   re_count=cfg.re_count)
    # with --download, rank 0 fetches first and the other ranks open what it wrote
    first = cfg.download and d.distributed
    if d.is_main or not first:
        splits = build_splits(cfg.data, cfg.val_data, train_tf, eval_tf, dataset_root=cfg.dataset_root,
                              download=cfg.download)
    if first:
        distributed.barrier(d)
        if not d.is_main:
            splits = build_splits(cfg.data, cfg.val_data, train_tf, eval_tf, dataset_root=cfg.dataset_root)
    if cfg.resume:
        check_resumed_classes(out, splits.classes)
    classes = len(splits.classes)
    head_before = num_classes(model)
    # A checkpoint fine-tuned on other classes (same count, other names) gets a new head too:
    # its rows would otherwise be read as the data's classes in its own order.
    recorded = getattr(model, "retrofit_class_names", None)
    renamed = bool(recorded) and list(recorded) != list(splits.classes) and not cfg.resume
    # Common random numbers: inserting a block draws random numbers (its layers' default init, before
    # identity init zeroes them), so without a fresh seed here the base model and its retrofit would
    # get different new heads, dropout masks and augmentations under one --seed, and a paired
    # comparison would measure those draws as much as the block (docs/results.md).
    seed_all(cfg.seed + d.rank)
    head_replaced = replace_head(model, classes, force=renamed) if not cfg.resume else False
    if num_classes(model) != classes:
        raise RetrofitError(f"the run being resumed has {num_classes(model)} classes but the data has {classes}")

    train_loader, val_loader, train_sampler = loaders(
        splits, batch_size=cfg.batch_size, workers=cfg.workers, rank=d.rank, world_size=d.world_size,
        seed=cfg.seed, pin_memory=d.device.type == "cuda",
    )
    return RunInputs(model, state, config_of_data, splits, head_before, head_replaced, renamed,
                     train_loader, val_loader, train_sampler)


def check_resumed_classes(out: Path, classes: list[str]) -> None:
    """The data of a resumed run must have the class names of the run (the head's rows follow them)."""
    try:
        saved = json.loads((out / "config.json").read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return  # no record to check against; the class count is still checked
    now = list(classes)
    if isinstance(saved, list) and saved != now:
        def shown(names: list[Any]) -> str:
            return ", ".join(map(str, names[:5])) + (f", … ({len(names)})" if len(names) > 5 else "")

        missing, new = [c for c in saved if c not in now], [c for c in now if c not in saved]
        what = "; ".join([f"missing: {shown(missing)}"] * bool(missing) + [f"new: {shown(new)}"] * bool(new))
        raise RetrofitError(f"the data's classes differ from those of the run being resumed "
                            f"({what or 'the same names in another order'}); resume with the same classes, "
                            "or start a new run in another --output")
