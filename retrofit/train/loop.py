"""The fine-tuning engine: train/eval loop, checkpoints at every epoch, exact resume, DDP.

One epoch: (optionally frozen backbone) training with AdamW/SGD, a cosine schedule with warmup
updated per optimizer step (timm ``CosineLRScheduler``), label smoothing, gradient accumulation
and clipping, timm ``ModelEmaV3``; then BatchNorm statistics are averaged over ranks, the model
(and the EMA) are evaluated (loss, top-1, top-5), and rank 0 writes, in this order,
``trainer_state.safetensors``, ``last.safetensors``, ``ema.safetensors`` (with EMA),
``best.safetensors`` (when improved), ``metrics.csv`` and ``curves.png`` — each atomically, so
a kill at any moment leaves complete files; a resumed run first rewrites the outputs from the
trainer state, so a kill between two of these writes loses nothing either.

Resume is exact: the trainer state holds model, EMA and optimizer tensors, the scheduler
position and every rank's RNG states, and the data order is a function of (seed, epoch)
(``DistributedSampler``), so ``--resume`` after epoch k equals an uninterrupted run.

Speed: on CUDA, bf16 autocast, channels_last, TF32 and cudnn autotuning are on by default and
``compile`` wraps the model in ``torch.compile``. The loss is read back from the device every
step on CPU (free there) and every 25 steps on CUDA (to keep the GPU queue full); a
non-finite loss is still reported with its exact step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RetrofitError
from . import distributed
from .config import FinetuneConfig, resume_mismatch
from .data import build_splits, data_config, loaders, transforms
from .model import (
    describe_source, freeze_batchnorm_stats, load_source, new_parameter_names, num_classes, param_groups,
    replace_head, set_backbone_frozen,
)
from .outputs import write_curves, write_json, write_metrics_csv
from .state import STATE_FILE, load_optimizer_state, load_trainer_state, rng_state, save_trainer_state, set_rng_state

#: CUDA out-of-memory (``torch.OutOfMemoryError`` from torch 2.5 on).
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
LAST, BEST, EMA = "last.safetensors", "best.safetensors", "ema.safetensors"
RUN_FILES = (LAST, BEST, EMA, STATE_FILE, "metrics.csv", "curves.png", "config.json", "summary.json")
#: Where --overwrite keeps the run it replaces until the new run's first epoch is saved
#: (``MOVING`` while the files are being moved there).
REPLACED = ".replaced"
MOVING = ".replaced.tmp"


def _inside(source: str, files: list[Path]) -> bool:
    """Whether the SOURCE path is one of ``files``."""
    path = Path(source)
    return path.exists() and any(f.exists() and path.resolve() == f.resolve() for f in files)


def _is_run_record(path: Path) -> bool:
    """Whether ``path`` is a ``config.json`` that ``retrofit finetune`` wrote (not some other tool's)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    config = record.get("config") if isinstance(record, dict) else None
    return (isinstance(config, dict) and {"source", "data", "epochs", "seed"} <= set(config)
            and isinstance(record.get("classes"), list) and "versions" in record)


@dataclass
class FinetuneResult:
    """What a run produced.

    ``history``: one dict per completed epoch (columns of ``metrics.csv``); ``best``: ``{"epoch",
    "top1", "weights": "model"|"ema"}``; ``seconds``: wall time of this invocation;
    ``rank_digests``: each rank's ``tensors_digest`` (SHA-256) of its final state dict, all equal after a
    correct DDP run.
    """

    output: Path
    epochs_done: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    seconds: float
    rank_digests: list[str]


def finetune(config: FinetuneConfig, console: Any = None) -> FinetuneResult:
    """Fine-tune as ``config`` says; see the module docstring. Works unchanged under torchrun.

    Args:
        config: the run's settings (validated here).
        console: a ``rich.console.Console`` for progress and the per-epoch lines (rank 0 only);
            a default one when None.

    Raises:
        RetrofitError: bad settings or data, an output folder that already holds a run (without
            ``resume``/``overwrite``), a non-finite loss (nothing of that epoch is written),
            CUDA out of memory (with a batch size to try), an unreadable image.
    """
    config.validate()
    config = _absolute_paths(config)
    d = distributed.setup(config.device)
    trainer = None
    try:
        trainer = Trainer(config, d, console)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.release()
        distributed.teardown(d)


def _main_logits(output: Any) -> torch.Tensor:
    """The classifier's logits: torchvision's GoogLeNet/Inception-v3 return ``(logits, aux…)`` tuples
    in train mode; their auxiliary heads are not trained (their output is not in the loss)."""
    return output if isinstance(output, torch.Tensor) else output.logits if hasattr(output, "logits") else output[0]


def _absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
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


class NonFiniteLoss(Exception):
    """Internal: the loss of a step was NaN or infinite."""

    def __init__(self, step: int, batch: int, value: float):
        super().__init__(step, batch, value)
        self.step, self.batch, self.value = step, batch, value


class Trainer:
    """One run of :func:`finetune` in this process (one rank of a torchrun job)."""

    def __init__(self, config: FinetuneConfig, d: distributed.Dist, console: Any = None):
        self.config = config
        self.d = d
        self.out = Path(config.output)
        if console is None and d.is_main:
            from rich.console import Console

            console = Console()
        self.console = console
        self.device = d.device
        cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if (config.precision == "bf16" or (config.precision == "auto" and cuda)) else None
        self.channels_last = cuda if config.channels_last is None else config.channels_last
        self.sync_every = 25 if cuda else 1

    # ---------------------------------------------------------------- setup
    def _check_output(self) -> None:
        """Refuse to overwrite a previous run unless --overwrite (then set aside once setup succeeds) or --resume.

        A folder is a run when it holds a run record (``config.json`` written by finetune) or a
        trainer state; other files are the user's and are never replaced, --overwrite or not.
        """
        if self.out.exists() and not self.out.is_dir():
            raise RetrofitError(f"--output {self.out} is a file; finetune writes a run folder there")
        for name in (REPLACED, MOVING):
            kept = self.out / name
            if kept.exists() and not (kept.is_dir() and all(f.name in RUN_FILES for f in kept.iterdir())):
                raise RetrofitError(f"{kept} is not a folder retrofit made; move it, or choose another --output")
        if self.d.is_main:
            self._recover_replaced()
        distributed.barrier(self.d)
        previous = [name for name in RUN_FILES if (self.out / name).exists()]
        record = self.out / "config.json"
        if record.exists() and not _is_run_record(record):
            raise RetrofitError(f"{self.out} holds a config.json that retrofit did not write; choose another --output")
        if previous and not record.exists() and not (self.out / STATE_FILE).exists():
            raise RetrofitError(f"{self.out} holds {', '.join(previous[:3])} but no retrofit run (no run record "
                                "config.json); choose another --output")
        if self.config.resume:
            if not (self.out / STATE_FILE).is_file():
                started = " (a run started there but finished no epoch)" if previous == ["config.json"] else ""
                raise RetrofitError(
                    f"nothing to resume in {self.out}: no {STATE_FILE} there{started}; start without --resume"
                )
        elif previous == ["config.json"]:
            pass  # a run that stopped before its first epoch was saved: nothing to keep, start it again
        elif previous and _inside(self.config.source, [self.out / name for name in previous]):
            raise RetrofitError(
                f"SOURCE {self.config.source} is a file of the run in {self.out}, which --overwrite would replace; "
                "copy it elsewhere first, or choose another --output"
            )
        elif previous and not self.config.overwrite:
            raise RetrofitError(
                f"{self.out} already holds a run ({', '.join(previous[:3])}); pass --resume to continue it, "
                "--overwrite to start over, or another --output"
            )
        self.previous = previous

    def _clear_output(self) -> None:
        """After a successful setup: remove temporary files of killed writes and, with --overwrite, set the old run aside.

        The old run's files move to ``OUTPUT/.replaced/`` (through ``.replaced.tmp/``, renamed when
        complete) and are deleted once the new run's first epoch is saved (:meth:`_drop_replaced`).
        A failure before that puts them back (:meth:`_restore_replaced`); so does the next
        finetune command in that folder after a kill (:meth:`_recover_replaced`). An --overwrite
        that does not get through an epoch loses nothing.
        """
        distributed.barrier(self.d)
        if self.d.is_main:
            for name in RUN_FILES:
                for stale in self.out.glob(f".{name}.*.tmp"):  # left by a killed atomic write
                    stale.unlink(missing_ok=True)
            if self.config.overwrite and self.previous:
                moving = self.out / MOVING
                moving.mkdir()
                for name in self.previous:
                    os.replace(self.out / name, moving / name)
                os.replace(moving, self.out / REPLACED)
        distributed.barrier(self.d)

    def _drop_replaced(self) -> None:
        """The new run has an epoch saved: the run it replaced can go."""
        aside = self.out / REPLACED
        if self.d.is_main and aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)

    def _put_back(self, folder: Path, *, new_files: bool) -> None:
        if new_files:  # what the new run wrote before any epoch was saved: its run record
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        for f in folder.iterdir():
            os.replace(f, self.out / f.name)
        folder.rmdir()

    def _restore_replaced(self) -> bool:
        """This run failed before saving an epoch: put the run it was replacing back (True when it did)."""
        aside = self.out / REPLACED
        if self.d.is_main and aside.is_dir() and not self.saved_epoch:
            self._put_back(aside, new_files=True)
            return True
        return False

    def _recover_replaced(self) -> None:
        """What a killed --overwrite left: the old run comes back unless the new one had saved an epoch."""
        if (self.out / MOVING).is_dir():  # killed while setting the old run aside: every file is the old run's
            self._put_back(self.out / MOVING, new_files=False)
        aside = self.out / REPLACED
        if aside.is_dir():
            if (self.out / STATE_FILE).exists():  # the overwriting run saved an epoch: it did replace the old one
                shutil.rmtree(aside, ignore_errors=True)
            else:
                self._put_back(aside, new_files=True)
                self._say(f"put back the run that an interrupted --overwrite was replacing in {self.out}")

    def _build(self) -> None:
        cfg, d = self.config, self.d
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        seed_all(cfg.seed + d.rank)

        self.state = None
        if cfg.resume:
            self.state = load_trainer_state(self.out)
            mismatch = resume_mismatch(self.state.config, cfg)
            if mismatch:
                raise RetrofitError(mismatch)
            from ..checkpoint import rebuild
            from ..recipe import Recipe

            model = rebuild(Recipe.from_json(self.state.recipe))
        else:
            model = load_source(cfg)

        self.data_config = data_config(model, cfg.img_size)
        train_tf, eval_tf = transforms(self.data_config, hflip=cfg.hflip, scale=cfg.scale, color_jitter=cfg.color_jitter)
        # with --download, rank 0 fetches first and the other ranks open what it wrote
        first = cfg.download and d.distributed
        if d.is_main or not first:
            self.splits = build_splits(cfg.data, cfg.val_data, train_tf, eval_tf, dataset_root=cfg.dataset_root,
                                       download=cfg.download)
        if first:
            distributed.barrier(d)
            if not d.is_main:
                self.splits = build_splits(cfg.data, cfg.val_data, train_tf, eval_tf, dataset_root=cfg.dataset_root)
        if cfg.resume:
            self._check_resumed_classes()
        classes = len(self.splits.classes)
        self.head_before = num_classes(model)
        # A checkpoint fine-tuned on other classes (same count, other names) gets a new head too:
        # its rows would otherwise be read as the data's classes in its own order.
        recorded = getattr(model, "retrofit_class_names", None)
        self.renamed_classes = bool(recorded) and list(recorded) != list(self.splits.classes) and not cfg.resume
        self.head_replaced = replace_head(model, classes, force=self.renamed_classes) if not cfg.resume else False
        if num_classes(model) != classes:
            raise RetrofitError(f"the run being resumed has {num_classes(model)} classes but the data has {classes}")

        self.train_loader, self.val_loader, self.train_sampler = loaders(
            self.splits, batch_size=cfg.batch_size, workers=cfg.workers, rank=d.rank, world_size=d.world_size,
            seed=cfg.seed, pin_memory=self.device.type == "cuda",
        )
        self.prepare(model, len(self.train_loader))
        if self.state is not None:
            self._restore(self.state)
            if d.is_main and self.history:
                self._write_outputs()
        self.scheduler.step_update(self.updates)

    def _check_resumed_classes(self) -> None:
        """The data of a resumed run must have the class names of the run (the head's rows follow them)."""
        try:
            saved = json.loads((self.out / "config.json").read_text()).get("classes")
        except (OSError, ValueError, AttributeError):
            return  # no record to check against; the class count is still checked
        now = list(self.splits.classes)
        if isinstance(saved, list) and saved != now:
            def shown(names: list[Any]) -> str:
                return ", ".join(map(str, names[:5])) + (f", … ({len(names)})" if len(names) > 5 else "")

            missing, new = [c for c in saved if c not in now], [c for c in now if c not in saved]
            what = "; ".join([f"missing: {shown(missing)}"] * bool(missing) + [f"new: {shown(new)}"] * bool(new))
            raise RetrofitError(f"the data's classes differ from those of the run being resumed "
                                f"({what or 'the same names in another order'}); resume with the same classes, "
                                "or start a new run in another --output")

    def prepare(self, model: nn.Module, batches_per_epoch: int) -> None:
        """Put ``model`` on the device and build optimizer, schedule, loss and EMA for it.

        The part of the setup that needs no data on disk: ``benchmarks/train.py`` calls it with
        in-memory batches, then :meth:`train_one_epoch`.
        """
        cfg = self.config
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.new_names = new_parameter_names(model)
        self.batches_per_epoch = batches_per_epoch
        self.updates_per_epoch = math.ceil(batches_per_epoch / cfg.accum_steps)

        groups = param_groups(model, weight_decay=cfg.weight_decay, new_lr_mult=cfg.new_lr_mult)
        if cfg.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                             weight_decay=cfg.weight_decay)
        from timm.scheduler import CosineLRScheduler

        total = cfg.epochs * self.updates_per_epoch
        warmup = min(round(cfg.warmup_epochs * self.updates_per_epoch), total - 1)
        # timm warns that a one-update schedule "will have no effect": true and harmless (the one
        # update runs at --lr); keep it out of the run's output.
        timm_log = logging.getLogger("timm.scheduler.cosine_lr")
        level = timm_log.level
        timm_log.setLevel(logging.ERROR)
        try:
            self.scheduler = CosineLRScheduler(
                self.optimizer, t_initial=total, lr_min=cfg.min_lr, warmup_t=warmup,
                warmup_lr_init=cfg.lr * 0.01 if warmup else 0.0, t_in_epochs=False,
            )
        finally:
            timm_log.setLevel(level)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            # warmup: decay 1 - (1 + step)^(-2/3), capped at ema_decay, so short fine-tunes get a useful EMA
            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)

        self.epoch, self.updates = 0, 0
        self.saved_epoch = 0  # the last epoch whose trainer state is written: --resume continues from it
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "top1": -1.0, "weights": "model"}
        self.frozen: bool | None = None
        self.forward_model: nn.Module = model

    def _restore(self, state: Any) -> None:
        from ..models import load_state_dict_strict

        load_state_dict_strict(self.model, state.model, f"{STATE_FILE} (model)")
        if self.ema is not None:
            if state.ema is None:
                raise RetrofitError(f"{STATE_FILE} holds no EMA weights but --ema is on")
            load_state_dict_strict(self.ema.module, state.ema, f"{STATE_FILE} (EMA)")
        load_optimizer_state(self.optimizer, state.optimizer)
        self.scheduler.load_state_dict(dict(state.scheduler))
        self.epoch, self.updates = state.epoch, state.updates
        self.saved_epoch = state.epoch
        self.history = list(state.history)
        self.best = dict(state.best)
        # RNG last: everything above (model rebuild, EMA copy) may draw random numbers
        if len(state.rng) == self.d.world_size:
            set_rng_state(state.rng[self.d.rank])
        elif self.d.is_main and self.console is not None:
            self.console.print(f"note: resuming with {self.d.world_size} processes instead of {len(state.rng)}; "
                               "the result will not match an uninterrupted run exactly", markup=False, soft_wrap=True)
            set_rng_state(state.rng[0])

    def enter_phase(self, frozen: bool) -> None:
        """Freeze or unfreeze the backbone and (re)wrap the model for DDP / torch.compile."""
        if frozen == self.frozen:
            return
        self.frozen = frozen
        set_backbone_frozen(self.model, frozen)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        wrapped: nn.Module = self.model
        if self.d.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # BN statistics stay per rank during an epoch and are averaged at its end (newer torch
            # renames broadcast_buffers to forward_sync_buffers)
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
            wrapped = DistributedDataParallel(self.model, device_ids=ids, **no_sync)
        if self.config.compile:
            wrapped = torch.compile(wrapped)
        self.forward_model = wrapped

    def release(self) -> None:
        """Drop the DDP wrapper before the process group is destroyed.

        A ``DistributedDataParallel`` still alive when ``destroy_process_group`` runs keeps Gloo's
        threads until interpreter exit, where the process can abort ("terminate called without an
        active exception") after a run that succeeded.
        """
        self.forward_model = None

    # ---------------------------------------------------------------- epochs
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return images, labels.to(self.device, non_blocking=True)

    def _bad_images(self, bad: list[Any]) -> int:
        if bad and not self.config.skip_bad_images:
            raise RetrofitError(f"cannot read image {bad[0].path} ({bad[0].reason}); fix or remove it, "
                                "or pass --skip-bad-images to skip unreadable images")
        return len(bad)

    def train_one_epoch(self, epoch: int, batches: Any, progress: Any = None) -> dict[str, float]:
        """Train over ``batches`` (``(images (N,3,H,W), labels (N,), bad)`` tuples); returns mean loss, images/s, skipped.

        Also the unit that ``benchmarks/train.py`` times against a plain PyTorch loop.
        Raises :class:`NonFiniteLoss` at the first NaN/inf loss.
        """
        cfg, d = self.config, self.d
        self.model.train()
        if self.frozen:
            freeze_batchnorm_stats(self.model)
        n_batches = len(batches)
        accum = cfg.accum_steps
        task = progress.add_task("", total=n_batches, epoch=f"{epoch + 1}/{cfg.epochs}", loss=math.nan, ips=0.0) if progress else None
        pending: list[torch.Tensor] = []
        loss_total, images_total, skipped, done = 0.0, 0, 0, 0
        group_has_grad = False
        start = time.perf_counter()
        for i, (images, labels, bad) in enumerate(batches):
            skipped += self._bad_images(bad)
            group_start = (i // accum) * accum
            group_size = min(accum, n_batches - group_start)
            last_micro = i + 1 == group_start + group_size
            if images is None:
                if d.distributed:
                    raise RetrofitError(f"every image of a batch on rank {d.rank} was unreadable; remove the bad images")
            else:
                images, labels = self._to_device(images, labels)
                sync = contextlib.nullcontext()
                if d.distributed and not last_micro and hasattr(self.forward_model, "no_sync"):
                    sync = self.forward_model.no_sync()
                with sync:
                    with self._autocast():
                        loss = self.criterion(_main_logits(self.forward_model(images)), labels)
                    (loss / group_size).backward()
                group_has_grad = True
                pending.append(loss.detach() * images.shape[0])
                images_total += images.shape[0]
            if last_micro and group_has_grad:
                if cfg.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(self.trainable, cfg.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                self.scheduler.step_update(self.updates)
                if self.ema is not None:
                    self.ema.update(self.model, step=self.updates)
                group_has_grad = False
            if len(pending) >= self.sync_every or i + 1 == n_batches:
                loss_total += self._check_losses(pending, epoch, i + 1 - len(pending), n_batches)
                pending = []
            if task is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=i + 1 - done, loss=loss_total / max(images_total, 1),
                                ips=images_total * d.world_size / elapsed)
                done = i + 1
        seconds = time.perf_counter() - start
        sums = distributed.all_reduce_sum(d, torch.tensor([loss_total, images_total, skipped], dtype=torch.float64, device=self.device))
        if task is not None:
            progress.remove_task(task)
        return {
            "train_loss": float(sums[0] / max(sums[1], 1)),
            "train_images_per_s": float(sums[1]) / seconds,
            "skipped_images": int(sums[2]),
            "epoch_seconds": seconds,
        }

    def _check_losses(self, pending: list[torch.Tensor], epoch: int, first_batch: int, n_batches: int) -> float:
        """Sum of the pending per-batch loss sums; a non-finite one (on any rank) raises :class:`NonFiniteLoss`."""
        if not pending:
            values = torch.zeros(0, dtype=torch.float64)
        else:
            values = torch.stack(pending).double().cpu()
        bad = (~torch.isfinite(values)).nonzero()
        first = int(bad[0]) if len(bad) else 1 << 30
        if self.d.distributed:
            import torch.distributed as dist

            flag = torch.tensor([first], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            first = int(flag.item())
        if first < 1 << 30:
            value = float(values[first]) if first < len(values) else math.nan
            batch = first_batch + first + 1
            raise NonFiniteLoss(epoch * n_batches + batch, batch, value)
        return float(values.sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean cross-entropy (no smoothing), top-1 and top-5 (fractions) on the validation set, all ranks together."""
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        k = min(5, len(self.splits.classes))
        for images, labels, bad in self.val_loader:
            sums[4] += self._bad_images(bad)
            if images is None:
                continue
            images, labels = self._to_device(images, labels)
            with self._autocast():
                logits = model(images)
            logits = logits.float()
            correct = logits.topk(k, dim=1).indices.eq(labels[:, None])
            sums[0] += F.cross_entropy(logits, labels, reduction="sum")
            sums[1] += correct[:, 0].sum()
            sums[2] += correct.any(dim=1).sum()
            sums[3] += labels.numel()
        distributed.all_reduce_sum(self.d, sums)
        n = max(float(sums[3]), 1.0)
        return {"loss": float(sums[0]) / n, "top1": float(sums[1]) / n, "top5": float(sums[2]) / n, "skipped": int(sums[4])}

    # ---------------------------------------------------------------- outputs
    def _extra(self, epoch: int, weights: str, metrics: dict[str, float]) -> dict[str, Any]:
        return {"finetune": {
            "epoch": epoch, "epochs": self.config.epochs, "weights": weights,
            "val_top1": metrics["top1"], "val_top5": metrics["top5"], "val_loss": metrics["loss"],
            "classes": self.splits.classes, "data_config": _jsonable(self.data_config),
            "settings": self.config.to_dict(),
        }}

    def _write_state(self, rng: list[dict[str, Any]]) -> None:
        from ..recipe import recipe_of

        save_trainer_state(
            self.out, epoch=self.epoch, updates=self.updates, model=self.model,
            ema=self.ema.module if self.ema is not None else None, optimizer=self.optimizer,
            scheduler_state=_jsonable(self.scheduler.state_dict()), rng=rng, best=self.best,
            history=self.history, config=self.config.to_dict(), recipe=recipe_of(self.model).to_json(),
        )

    def _write_outputs(self) -> None:
        """``last`` (and ``ema``), ``best`` when the current epoch is the best, ``metrics.csv``, ``curves.png``.

        Everything comes from the in-memory state of the last completed epoch, so a resumed run
        calls this once first: a kill between the trainer state and these files loses nothing.
        """
        from ..checkpoint import save_checkpoint

        row = self.history[-1]
        val = {"top1": row["val_top1"], "top5": row["val_top5"], "loss": row["val_loss"]}
        ema_val = None
        save_checkpoint(self.model, self.out / LAST, extra=self._extra(self.epoch, "model", val))
        if self.ema is not None:
            ema_val = {"top1": row["ema_val_top1"], "top5": row["ema_val_top5"], "loss": row["ema_val_loss"]}
            save_checkpoint(self.ema.module, self.out / EMA, extra=self._extra(self.epoch, "ema", ema_val))
        if self.best["epoch"] == self.epoch:
            weights = self.best["weights"]
            module = self.ema.module if weights == "ema" and self.ema is not None else self.model
            metrics = ema_val if weights == "ema" and ema_val is not None else val
            save_checkpoint(module, self.out / BEST, extra=self._extra(self.epoch, weights, metrics))
        write_metrics_csv(self.out / "metrics.csv", self.history)
        write_curves(self.out / "curves.png", self.history, describe_source(self.config))

    def _say(self, text: str) -> None:
        if self.d.is_main and self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # ---------------------------------------------------------------- run
    def run(self) -> FinetuneResult:
        started = time.perf_counter()
        cfg, d = self.config, self.d
        self._check_output()
        self._build()
        self._clear_output()
        try:
            return self._run(started)
        except BaseException as e:
            if self._restore_replaced() and isinstance(e, (KeyboardInterrupt, RetrofitError)):
                raise type(e)(f"{e}; the run it was replacing is back in {self.out}") from None
            raise

    def _run(self, started: float) -> FinetuneResult:
        cfg, d = self.config, self.d
        stop = cfg.until_epoch or cfg.epochs
        if self.d.is_main and not cfg.resume:
            write_json(self.out / "config.json", self._run_record())
        self._say(self._start_line())
        if self.epoch >= stop:
            self._say(f"nothing to do: {self.out} already holds {self.epoch} of {cfg.epochs} epochs")
        progress = self._progress()
        try:
            with progress or contextlib.nullcontext():
                while self.epoch < stop:
                    self._one_epoch(progress)
        except NonFiniteLoss as e:
            kept = (f"epoch {self.saved_epoch} is still saved in {self.out}" if self.saved_epoch
                    else "no checkpoint had been written yet")
            raise RetrofitError(
                f"loss became {e.value} at step {e.step} (epoch {self.epoch + 1}, batch {e.batch}); stopped without "
                f"saving that epoch: {kept}. Try a lower --lr or --clip-grad 1.0"
            ) from None
        except KeyboardInterrupt:
            kept = (f"epoch {self.saved_epoch} is saved in {self.out}; continue with --resume" if self.saved_epoch
                    else "no epoch had finished yet: run the same command again to start over")
            raise KeyboardInterrupt(kept) from None
        except ValueError as e:
            if "Expected more than 1 value per channel when training" not in str(e):
                raise
            # BatchNorm in training needs two values per channel: batch 1 with a 1×1 map has one.
            raise RetrofitError(
                f"--batch-size {cfg.batch_size} at --img-size {self.data_config['input_size'][-1]} leaves BatchNorm "
                "one value per channel (a 1×1 map): use --batch-size 2 or more, or a larger --img-size"
            ) from None
        except _OOM:
            b = cfg.batch_size
            raise RetrofitError(
                f"CUDA out of memory at --batch-size {b}; try --batch-size {max(1, b // 2)} "
                f"(add --accum-steps {2 * cfg.accum_steps} to keep the effective batch)"
            ) from None
        digests = self._rank_digests()
        seconds = time.perf_counter() - started
        if d.is_main:
            write_json(self.out / "summary.json", {
                "epochs_done": self.epoch, "epochs": cfg.epochs, "best": self.best,
                "last": self.history[-1] if self.history else None, "seconds": seconds,
                "world_size": d.world_size, "rank_weight_digests": digests,
                "ranks_agree": len(set(digests)) == 1,
            })
        if len(set(digests)) != 1:
            self._say("warning: the ranks ended with different weights (see summary.json)")
        if self.epoch < cfg.epochs:
            self._say(f"stopped after epoch {self.epoch} of {cfg.epochs}; continue with --resume")
        elif self.history:
            self._say(f"best val top-1 {100 * self.best['top1']:.2f}% (epoch {self.best['epoch']}, "
                      f"{self.best['weights']} weights) → {self.out / BEST}")
        return FinetuneResult(self.out, self.epoch, self.history, self.best, seconds, digests)

    def _one_epoch(self, progress: Any) -> None:
        cfg, d = self.config, self.d
        epoch = self.epoch
        self.enter_phase(epoch < cfg.freeze_backbone_epochs)
        self.train_sampler.set_epoch(epoch)
        train = self.train_one_epoch(epoch, self.train_loader, progress)
        distributed.average_batchnorm_stats(d, self.model, *([self.ema.module] if self.ema is not None else []))
        val = self.evaluate(self.model)
        ema_val = self.evaluate(self.ema.module) if self.ema is not None else None
        row = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train["train_loss"],
            "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "ema_val_loss": ema_val["loss"] if ema_val else None,
            "ema_val_top1": ema_val["top1"] if ema_val else None,
            "ema_val_top5": ema_val["top5"] if ema_val else None,
            "train_images_per_s": train["train_images_per_s"],
            "epoch_seconds": train["epoch_seconds"],
            "skipped_images": train["skipped_images"] + val["skipped"],
        }
        candidates = [(val["top1"], "model")] + ([(ema_val["top1"], "ema")] if ema_val else [])
        top1, which = max(candidates, key=lambda c: c[0])
        improved = which if top1 > self.best["top1"] else None
        if improved:
            self.best = {"epoch": epoch + 1, "top1": top1, "weights": which}
        self.epoch = epoch + 1
        self.history.append(row)
        rng = distributed.gather_objects(d, rng_state())
        if d.is_main:  # the state first: with it, a resumed run can rewrite everything else
            self._write_state(rng)
            self.saved_epoch = self.epoch  # resumable from here: --resume rewrites the other files from the state
            self._drop_replaced()
            self._write_outputs()
        distributed.barrier(d)
        self.saved_epoch = self.epoch  # the other ranks learn it here
        self._say(self._epoch_line(row, improved is not None))

    def _rank_digests(self) -> list[str]:
        from ..checkpoint import _contiguous_unshared, tensors_digest

        return distributed.gather_objects(self.d, tensors_digest(_contiguous_unshared(self.model.state_dict())))

    def _progress(self) -> Any:
        if not self.d.is_main or self.console is None:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[ips]:.0f} img/s"), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )

    def _run_record(self) -> dict[str, Any]:
        from ..recipe import versions

        params = sum(p.numel() for p in self.model.parameters())
        new = sum(p.numel() for n, p in self.model.named_parameters() if n in self.new_names)
        return {
            "config": self.config.to_dict(),
            "classes": self.splits.classes,
            "data": self.splits.description,
            "data_config": _jsonable(self.data_config),
            "head": {"classes_before": self.head_before, "classes": len(self.splits.classes), "replaced": self.head_replaced},
            "params": params, "new_params": new,
            "world_size": self.d.world_size, "device": str(self.device),
            "precision": "bf16-autocast" if self.autocast_dtype is not None else "fp32",
            "channels_last": self.channels_last,
            "batches_per_epoch": self.batches_per_epoch, "updates_per_epoch": self.updates_per_epoch,
            "versions": versions(),
        }

    def _start_line(self) -> str:
        cfg = self.config
        head = f"{len(self.splits.classes)} classes"
        if self.head_replaced:
            why = ", other class names than the checkpoint's" if self.renamed_classes else ""
            head = f"head {self.head_before} → {len(self.splits.classes)} classes (new{why})"
        precision = "bf16 autocast" if self.autocast_dtype is not None else "fp32"
        what = "resuming" if cfg.resume else "fine-tuning"
        return (f"{what} {describe_source(cfg)} · {self.splits.description} · {head} · {self.device} {precision} · "
                f"{self.d.world_size} process(es) × batch {cfg.batch_size} × accum {cfg.accum_steps} · "
                f"{self.batches_per_epoch} batches/epoch")

    def _epoch_line(self, row: dict[str, Any], improved: bool) -> str:
        text = (f"epoch {row['epoch']}/{self.config.epochs} · train loss {row['train_loss']:.4f} · "
                f"val loss {row['val_loss']:.4f} top-1 {100 * row['val_top1']:.2f}%")
        if len(self.splits.classes) > 5:  # with 5 classes or fewer top-5 is always 100%
            text += f" top-5 {100 * row['val_top5']:.2f}%"
        if row["ema_val_top1"] is not None:
            text += f" · EMA top-1 {100 * row['ema_val_top1']:.2f}%"
        text += f" · lr {row['lr']:.2e} · {row['train_images_per_s']:.0f} img/s · {row['epoch_seconds']:.1f} s"
        if self.frozen:
            text += " · backbone frozen"
        if row["skipped_images"]:
            text += f" · skipped {row['skipped_images']} unreadable images"
        return text + (" · best" if improved else "")


def _jsonable(value: Any) -> Any:
    """Tuples → lists, numpy/torch scalars → Python numbers, recursively (for JSON and the recipe)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value
