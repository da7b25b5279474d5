"""The fine-tuning recipe: one frozen dataclass, saved as ``config.json`` beside the weights.

Every field is a plain JSON value, so the file is the exact record of a run and, with
``--resume``, the yardstick a continued run is checked against (:data:`RESUME_FIELDS`).
Defaults follow common fine-tuning practice (timm ``train.py``): AdamW, cosine schedule with
warmup, label smoothing 0.1, weight decay 0.05 off norms/biases/gates.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import RetrofitError
from ..limits import (
    MAX_ACCUM_STEPS, MAX_BATCH_SIZE, MAX_EPOCHS, MAX_IMAGE_SIDE, MAX_SEED, MAX_WARMUP_FRACTION, check_block_numbers,
)

OPTIMIZERS = ("adamw", "sgd")
BN_STATS = ("train", "frozen")
#: Default learning-rate factor of the inserted blocks (``--block-lr-mult``): chosen by measurement,
#: docs/results.md ("The recipe for inserted blocks").
BLOCK_LR_MULT = 1.0
#: Default warm-up of the inserted blocks' learning rate, in epochs (``--block-warmup-epochs``).
BLOCK_WARMUP_EPOCHS = 0.0
#: ``--train``: every weight; the inserted blocks and the head; the head alone.
TRAIN_MODES = ("full", "blocks", "head")
#: timm's random-erasing fill modes and mixup modes.
RE_MODES = ("const", "rand", "pixel")
MIXUP_MODES = ("batch", "pair", "elem")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def default_workers() -> int:
    """Data-loading processes per rank when none are asked for: min(4, CPUs)."""
    return min(4, os.cpu_count() or 1)


def max_workers() -> int:
    """Most data-loading processes per rank: 4 × CPUs (``-j 100000`` used to exhaust the machine's memory)."""
    return 4 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides a fine-tuning run.

    Model:
        source: a retrofit checkpoint (``*.safetensors``) or a model name (timm, ``torchvision:``,
            ``hf-hub:``). block: insert this block first (``eca``, ``se``, …; None = none);
            placement, init, reduction, kernel_size, groups, include, exclude, stages,
            replace_existing: as :func:`retrofit.add_attention`. weights: local weights file
            for a model name; pretrained: False for random init.
    Data:
        data: ImageFolder root holding ``train/`` and ``val/`` (or the train root when
            ``val_data`` is given), or ``torchvision:NAME`` (e.g. ``torchvision:CIFAR10``).
        dataset_root: where torchvision datasets live; download: fetch them if missing.
        img_size: square input side in pixels (None = the model's default).
        hflip, scale, color_jitter: train augmentation (timm ``create_transform``).
        skip_bad_images: skip unreadable images (counted) instead of stopping.
        workers: DataLoader worker processes per rank.
    Optimisation:
        epochs, batch_size (per process), optimizer (``adamw``/``sgd``), lr (peak, for the
        backbone), min_lr, warmup_epochs (may be fractional), weight_decay, momentum (SGD),
        label_smoothing, head_lr_mult (learning-rate factor of the classifier head),
        block_lr_mult and block_warmup_epochs (learning-rate factor of the inserted blocks, and the
        epochs over which it ramps up from 0; None = :data:`BLOCK_LR_MULT` / :data:`BLOCK_WARMUP_EPOCHS`,
        a number = asked for, which a model without inserted blocks refuses), bn_stats
        (``train``, the default: BatchNorm updates its running statistics on the data; ``frozen``: keeps
        the pretrained ones for the whole run; measured in docs/results.md), freeze_backbone_epochs, accum_steps, clip_grad (max global L2 norm; None = off), ema,
        ema_decay, seed.
    What trains (issue 20):
        train: ``full`` (every weight), ``blocks`` (the inserted blocks and the head; backbone and
            BatchNorm statistics frozen every epoch) or ``head`` (the head alone). ``blocks`` and
            ``head`` also write ``best.adapter.safetensors`` (:mod:`retrofit.adapter`).
    timm's augmentations (issue 20; all off by default; :mod:`retrofit.train.augment`):
        auto_augment: a timm RandAugment / AutoAugment / AugMix string (``rand-m9-mstd0.5-inc1``; None = off).
        re_prob, re_mode, re_count: random erasing probability (0 = off), fill (``const``, ``rand``,
            ``pixel``) and count of erased boxes per image.
        mixup, cutmix: Beta(α, α) of mixup and of cutmix (0 = off); mixup_prob: chance a batch is mixed;
            mixup_switch_prob: chance of cutmix instead of mixup when both are on; mixup_mode: ``batch``
            (one λ per batch), ``pair``, ``elem``. With either on, the loss is soft-target cross-entropy
            and ``label_smoothing`` goes into the mixed targets.
    Runtime:
        device, precision (``auto`` = bf16 autocast on CUDA, fp32 on CPU), channels_last
        (None = on for CUDA), compile (torch.compile), until_epoch (stop after this epoch; the
        schedule still spans ``epochs``), resume, overwrite.
    """

    source: str
    data: str
    output: str
    val_data: str | None = None
    block: str | None = None
    placement: str = "standard"
    init: str = "identity"
    reduction: int = 16
    kernel_size: int | list[int] | None = None
    groups: int | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    stages: list[int] | None = None
    replace_existing: bool = False
    weights: str | None = None
    pretrained: bool = True
    dataset_root: str | None = None
    download: bool = False
    img_size: int | None = None
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    color_jitter: float = 0.4
    skip_bad_images: bool = False
    workers: int = field(default_factory=default_workers)  # data-loading processes per rank
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    momentum: float = 0.9
    label_smoothing: float = 0.1
    head_lr_mult: float = 10.0
    block_lr_mult: float | None = None
    block_warmup_epochs: float | None = None
    bn_stats: str = "train"
    freeze_backbone_epochs: int = 0
    accum_steps: int = 1
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    until_epoch: int | None = None
    resume: bool = False
    overwrite: bool = False
    # issue 20: what trains
    train: str = "full"
    # issue 20: timm's augmentations, all off by default
    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"

    def validate(self) -> None:
        """Raise :class:`RetrofitError` (one line) for any value out of range (:mod:`retrofit.limits`).

        Needs no model, no data and no torch: the CLI calls it before anything is loaded.
        """
        checks = [
            (1 <= self.epochs <= MAX_EPOCHS, f"--epochs must be between 1 and {MAX_EPOCHS}, got {self.epochs}"),
            (1 <= self.batch_size <= MAX_BATCH_SIZE,
             f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"),
            (_positive(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (_finite(self.min_lr) and 0 <= self.min_lr <= self.lr, f"--min-lr must be between 0 and --lr, got {self.min_lr}"),
            (_finite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs must be between 0 and --epochs, got {self.warmup_epochs}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0, f"--weight-decay must be ≥ 0, got {self.weight_decay}"),
            (_finite(self.momentum) and 0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (_finite(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (_positive(self.head_lr_mult), f"--head-lr-mult must be a finite number > 0, got {self.head_lr_mult}"),
            (self.block_lr_mult is None or _positive(self.block_lr_mult),
             f"--block-lr-mult must be a finite number > 0, got {self.block_lr_mult}"),
            (self.block_warmup_epochs is None or (_finite(self.block_warmup_epochs)
                                                  and 0 <= self.block_warmup_epochs <= self.epochs),
             f"--block-warmup-epochs must be between 0 and --epochs, got {self.block_warmup_epochs}"),
            (self.bn_stats in BN_STATS, f"unknown --bn-stats {self.bn_stats!r}; choose one of: {', '.join(BN_STATS)}"),
            (0 <= self.freeze_backbone_epochs <= self.epochs,
             f"--freeze-backbone-epochs must be between 0 and --epochs, got {self.freeze_backbone_epochs}"),
            (1 <= self.accum_steps <= MAX_ACCUM_STEPS,
             f"--accum-steps must be between 1 and {MAX_ACCUM_STEPS}, got {self.accum_steps}"),
            (self.clip_grad is None or _positive(self.clip_grad), f"--clip-grad must be positive, got {self.clip_grad}"),
            (_finite(self.ema_decay) and 0 < self.ema_decay < 1, f"--ema-decay must be in (0, 1), got {self.ema_decay}"),
            (self.img_size is None or 8 <= self.img_size <= MAX_IMAGE_SIDE,
             f"--img-size must be between 8 and {MAX_IMAGE_SIDE} pixels, got {self.img_size}"),
            (_finite(self.hflip) and 0 <= self.hflip <= 1, f"--hflip must be a probability, got {self.hflip}"),
            (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
             f"--scale takes MIN,MAX with 0 < MIN ≤ MAX ≤ 1, got {','.join(map(str, self.scale))}"),
            (_finite(self.color_jitter) and self.color_jitter >= 0, f"--color-jitter must be ≥ 0, got {self.color_jitter}"),
            (0 <= self.workers <= max_workers(),
             f"--workers must be between 0 and {max_workers()} (4 × this machine's CPUs), got {self.workers}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}"),
            (self.until_epoch is None or 1 <= self.until_epoch <= self.epochs,
             f"--until-epoch must be between 1 and --epochs, got {self.until_epoch}"),
            (not (self.weights is not None and not self.pretrained), "--weights and --no-pretrained exclude each other"),
            # before the output folder is looked at (a resumed run rebuilds from its trainer state instead)
            (self.weights is None or self.resume or os.path.isfile(self.weights), f"weights file not found: {self.weights}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and 2**63 - 1, got {self.seed}"),
            (not (str(self.source).endswith(".safetensors") and not self.pretrained),
             "--no-pretrained applies to a model name; a checkpoint holds its own weights"),
            # issue 20
            (self.train in TRAIN_MODES, f"unknown --train {self.train!r}; choose one of: {', '.join(TRAIN_MODES)}"),
            (self.train == "full" or not self.freeze_backbone_epochs,
             f"--freeze-backbone-epochs applies with --train full; --train {self.train} freezes the backbone every epoch"),
            (_finite(self.re_prob) and 0 <= self.re_prob <= 1, f"--re-prob must be a probability, got {self.re_prob}"),
            (self.re_mode in RE_MODES, f"unknown --re-mode {self.re_mode!r}; choose one of: {', '.join(RE_MODES)}"),
            (1 <= self.re_count <= 16, f"--re-count must be between 1 and 16, got {self.re_count}"),
            (_finite(self.mixup) and self.mixup >= 0, f"--mixup must be ≥ 0 (0 = off), got {self.mixup}"),
            (_finite(self.cutmix) and self.cutmix >= 0, f"--cutmix must be ≥ 0 (0 = off), got {self.cutmix}"),
            (_finite(self.mixup_prob) and 0 <= self.mixup_prob <= 1,
             f"--mixup-prob must be a probability, got {self.mixup_prob}"),
            (_finite(self.mixup_switch_prob) and 0 <= self.mixup_switch_prob <= 1,
             f"--mixup-switch-prob must be a probability, got {self.mixup_switch_prob}"),
            (self.mixup_mode in MIXUP_MODES,
             f"unknown --mixup-mode {self.mixup_mode!r}; choose one of: {', '.join(MIXUP_MODES)}"),
            (not ((self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2),
             f"--mixup/--cutmix pair each image with another of its batch: --batch-size must be even, got {self.batch_size}"),
        ]
        given = self.block_settings_given()
        checks.append((not (given and self.train == "head"),
                       f"{given[0] if given else ''} does not apply with --train head: the inserted blocks do not train"))
        for ok, message in checks:
            if not ok:
                raise RetrofitError(message)
        check_block_numbers(reduction=self.reduction, kernel_size=self.kernel_size, groups=self.groups,
                            stages=self.stages)

    def block_lr_mult_used(self) -> float:
        """The inserted blocks' learning-rate factor: ``block_lr_mult``, or :data:`BLOCK_LR_MULT` when not given."""
        return BLOCK_LR_MULT if self.block_lr_mult is None else self.block_lr_mult

    def block_warmup_epochs_used(self) -> float:
        """The inserted blocks' warm-up in epochs: ``block_warmup_epochs``, or :data:`BLOCK_WARMUP_EPOCHS`."""
        return BLOCK_WARMUP_EPOCHS if self.block_warmup_epochs is None else self.block_warmup_epochs

    def block_settings_given(self) -> list[str]:
        """The block-only options asked for explicitly (``--block-lr-mult``, ``--block-warmup-epochs``)."""
        return [flag for flag, value in (("--block-lr-mult", self.block_lr_mult),
                                         ("--block-warmup-epochs", self.block_warmup_epochs)) if value is not None]

    def warmup_epochs_used(self) -> float:
        """The warm-up the schedule runs: ``warmup_epochs``, capped at :data:`~retrofit.limits.MAX_WARMUP_FRACTION`
        of the run (a warm-up as long as the run would end it before the learning rate ever decays)."""
        return min(self.warmup_epochs, MAX_WARMUP_FRACTION * self.epochs)

    def warmup_warning(self) -> str | None:
        """The one-line warning when :meth:`warmup_epochs_used` caps ``warmup_epochs``, else None."""
        used = self.warmup_epochs_used()
        if used == self.warmup_epochs:
            return None
        return (f"warning: --warmup-epochs {self.warmup_epochs:g} is more than half of --epochs {self.epochs}; "
                f"warming up for {used:g} epochs instead")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def absolute_paths(self) -> "FinetuneConfig":
        """A copy with file paths resolved (output, data, val_data, weights, dataset_root, a checkpoint
        SOURCE): what a run records in ``config.json``, so settings compare equal from any folder."""
        def absolute(p: str | None) -> str | None:
            return None if p is None else str(Path(p).expanduser().resolve())

        changes = {name: absolute(getattr(self, name)) for name in ("output", "val_data", "weights", "dataset_root")}
        if not self.data.startswith("torchvision:"):
            changes["data"] = absolute(self.data)
        if self.source.endswith(".safetensors"):
            changes["source"] = absolute(self.source)
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are a :class:`RetrofitError`."""
        data = upgrade(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RetrofitError(f"unknown fine-tuning settings: {', '.join(unknown)}")
        return cls(**data)


#: Settings that change the result: a resumed run must use the same values as the original.
#: Runtime-only settings (output, workers, until_epoch, resume, overwrite, download, …) may change.
RESUME_FIELDS = (
    "source", "data", "val_data", "block", "placement", "init", "reduction", "kernel_size", "groups", "include",
    "exclude", "stages", "replace_existing", "weights", "pretrained", "img_size", "hflip", "scale", "color_jitter",
    "epochs", "batch_size", "optimizer", "lr", "min_lr", "warmup_epochs", "weight_decay", "momentum", "label_smoothing",
    "head_lr_mult", "block_lr_mult", "block_warmup_epochs", "bn_stats", "freeze_backbone_epochs", "accum_steps",
    "clip_grad", "ema", "ema_decay", "seed", "precision",
    "train", "auto_augment", "re_prob", "re_mode", "re_count", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
    "mixup_mode",  # issue 20
)


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A run record of retrofit 0.1 in today's names: its ``new_lr_mult`` was the factor of both the inserted
    blocks and the head (``head_lr_mult`` and ``block_lr_mult`` now), and it always updated BatchNorm
    statistics (``bn_stats="train"``)."""
    if "new_lr_mult" not in saved:
        return saved
    data = dict(saved)
    mult = data.pop("new_lr_mult")
    data.setdefault("head_lr_mult", mult)
    data.setdefault("block_lr_mult", mult)
    data.setdefault("bn_stats", "train")  # 0.1 always updated BatchNorm statistics
    return data


def resume_mismatch(saved: dict[str, Any], current: FinetuneConfig) -> str | None:
    """The first setting that differs from the saved run, as a one-line message; None when all match."""
    saved = upgrade(saved)
    now = current.to_dict()
    for name in RESUME_FIELDS:
        if name in saved and saved[name] != now[name]:
            return (f"{_differs(name, now[name], saved[name])}; "
                    "resume with the same settings (or start a new run in another --output)")
    return None


def _differs(name: str, now: Any, saved: Any) -> str:
    """``--lr is 0.1 but the run being resumed used 0.001``, worded as the command line reads."""
    if name == "pretrained":  # the flag is --no-pretrained
        return ("--no-pretrained is given but the run being resumed did not use it" if not now
                else "--no-pretrained is not given but the run being resumed used it")
    flag = "SOURCE" if name == "source" else "--" + name.replace("_", "-")
    if isinstance(now, bool) or isinstance(saved, bool):
        return f"{flag} is {'on' if now else 'off'} but the run being resumed had it {'on' if saved else 'off'}"

    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else repr(value)

    current = f"is {shown(now)}" if now is not None else "is not given"
    was = f"used {shown(saved)}" if saved is not None else f"had no {flag}"
    return f"{flag} {current} but the run being resumed {was}"


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(x: float) -> bool:
    return _finite(x) and x > 0
