"""The optimisation recipe of a run: optimizer, learning-rate schedule, EMA of the weights.

AdamW or SGD (Nesterov) over :func:`retrofit.train.model.param_groups` (backbone, inserted blocks
and head, with and without weight decay); timm's ``CosineLRScheduler`` stepped after every
optimizer update, with a linear warmup from ``lr / 100``; on top of it, the inserted blocks'
own linear warm-up from 0 (:func:`apply_block_warmup`); timm's ``ModelEmaV3`` with its decay
warmup. As in timm ``train.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import FinetuneConfig
from .model import param_groups


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or SGD (Nesterov when ``momentum`` > 0, L2 decay) at peak ``lr``."""
    groups = param_groups(model, weight_decay=cfg.weight_decay, head_lr_mult=cfg.head_lr_mult,
                          block_lr_mult=cfg.block_lr_mult_used())
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def warmup_updates(cfg: FinetuneConfig, updates_per_epoch: int) -> int:
    """Optimizer updates of the linear warmup: :meth:`FinetuneConfig.warmup_epochs_used` worth (at most half
    the run), and never all of a run's updates."""
    total = cfg.epochs * updates_per_epoch
    return min(round(cfg.warmup_epochs_used() * updates_per_epoch), total - 1)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, updates_per_epoch: int) -> Any:
    """timm ``CosineLRScheduler`` over ``epochs × updates_per_epoch`` updates (``t_in_epochs=False``)."""
    from timm.scheduler import CosineLRScheduler

    warmup = warmup_updates(cfg, updates_per_epoch)
    # timm warns that a one-update schedule "will have no effect": true and harmless (the one
    # update runs at --lr); keep it out of the run's output.
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(
            optimizer, t_initial=cfg.epochs * updates_per_epoch, lr_min=cfg.min_lr, warmup_t=warmup,
            warmup_lr_init=cfg.lr * 0.01 if warmup else 0.0, t_in_epochs=False,
        )
    finally:
        timm_log.setLevel(level)


def block_warmup_updates(cfg: FinetuneConfig, updates_per_epoch: int) -> int:
    """Optimizer updates over which the inserted blocks' learning rate ramps up from 0 (0 = no ramp)."""
    return round(cfg.block_warmup_epochs_used() * updates_per_epoch)


def apply_block_warmup(optimizer: torch.optim.Optimizer, updates: int, warmup: int) -> None:
    """Scale the ``blocks`` groups' learning rate by ``(updates + 1) / warmup`` until it reaches 1.

    ``updates`` is the count of updates done, the one the scheduler was just stepped to: the next
    update is number ``updates + 1``, so the blocks' first update runs at ``1 / warmup`` of their
    rate and update ``warmup`` at the full rate. Call right after the scheduler's
    ``step_update(updates)``, which sets every group's lr afresh (timm schedulers write
    ``lr = value × lr_scale``), so the factor never compounds.
    """
    if warmup <= 0 or updates + 1 >= warmup:
        return
    factor = (updates + 1) / warmup
    for group in optimizer.param_groups:
        if group.get("group") == "blocks":
            group["lr"] *= factor


def make_ema(model: nn.Module, cfg: FinetuneConfig) -> Any:
    """timm ``ModelEmaV3`` of ``model`` when ``cfg.ema``, else None."""
    if not cfg.ema:
        return None
    from timm.utils import ModelEmaV3

    # warmup: decay 1 - (1 + step)^(-2/3), capped at ema_decay, so short fine-tunes get a useful EMA
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
