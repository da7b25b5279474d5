"""timm's training augmentations, through timm's own factories: RandAugment / AutoAugment / AugMix strings,
random erasing, mixup and cutmix with their soft-target loss. All off unless asked.

* The image-level ones (``auto_augment``, ``re_prob``/``re_mode``/``re_count``) go into timm
  ``create_transform`` with the rest of the train transform (:func:`retrofit.train.data.transforms`).
* Mixup / cutmix act on a batch (``timm.data.Mixup``): the labels become soft targets (with label
  smoothing folded in, as in timm ``train.py``) and the loss is ``timm.loss.SoftTargetCrossEntropy``.

Every setting is a :class:`~retrofit.train.config.FinetuneConfig` field, so it is recorded in
``config.json``, the trainer state and each checkpoint's ``extra.finetune.settings``, and ``--resume``
refuses other values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import RetrofitError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import FinetuneConfig


def check_auto_augment(text: str | None) -> None:
    """Let timm judge an ``--auto-augment`` string (``rand-m9-mstd0.5-inc1``, ``original``, ``augmix-m5-w4-d2``, …):
    build its train transform once. Raises :class:`RetrofitError` (one line) when timm rejects it."""
    if text is None:
        return
    from timm.data import create_transform

    try:
        create_transform(224, is_training=True, auto_augment=text)
    except Exception as e:  # timm asserts, or raises KeyError / ValueError, for a string it cannot parse
        detail = str(e).strip().splitlines()
        reason = detail[0] if detail and detail[0] else type(e).__name__
        raise RetrofitError(f"--auto-augment {text!r} is not an augmentation timm knows ({reason}); e.g. "
                            "rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2") from None


def mixup_active(cfg: "FinetuneConfig") -> bool:
    """Whether a batch is mixed: ``mixup`` or ``cutmix`` alpha above 0 and ``mixup_prob`` above 0."""
    return (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0


def make_mixup(cfg: "FinetuneConfig", classes: int) -> Any:
    """timm ``Mixup`` for a run (label smoothing folded into its targets), or None when it is off."""
    if not mixup_active(cfg):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.label_smoothing,
                 num_classes=classes)


def make_criterion(cfg: "FinetuneConfig") -> "nn.Module":
    """The training loss: ``SoftTargetCrossEntropy`` on mixed soft targets, else cross-entropy with
    ``label_smoothing`` (timm ``train.py``'s choice)."""
    from torch import nn

    if mixup_active(cfg):
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def mix(mixup: Any, images: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(mixed images (N, C, H, W), soft targets (N, classes))``. timm pairs image i with image N-1-i and needs
    an even N: a batch left odd by skipped unreadable images loses its last image."""
    if images.shape[0] % 2:
        images, labels = images[:-1], labels[:-1]
    return mixup(images, labels)
