"""The fine-tuning engine: the epoch loop — train, evaluate, save — with exact resume and DDP.

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

The rest of a run lives beside it: :mod:`.run` (:func:`~retrofit.train.run.finetune`, start to end),
:mod:`.run_folder` (the output folder's life cycle), :mod:`.setup` (model and data), :mod:`.optim`
(optimizer, schedule, EMA), :mod:`.outputs` (the files written), :mod:`.report` (console lines, records).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RetrofitError
from ..interrupts import deferred
from . import distributed, report
from .config import FinetuneConfig
from .augment import make_criterion, make_mixup, mix
from .diagnostics import parameter_drift, parameter_snapshot, recording_gates
from .model import (
    freeze_batchnorm_stats, freeze_gates, gate_parameter_names, new_parameter_names, num_classes, set_backbone_frozen,
)
from .optim import apply_block_warmup, block_warmup_updates, make_ema, make_optimizer, make_scheduler
from .outputs import write_epoch_files, write_state
from .run_folder import RunFolder
from .setup import set_up
from .state import STATE_FILE, load_optimizer_state, rng_state, set_rng_state


def _main_logits(output: Any) -> torch.Tensor:
    """The classifier's logits: torchvision's GoogLeNet/Inception-v3 return ``(logits, aux…)`` tuples
    in train mode; their auxiliary heads are not trained (their output is not in the loss)."""
    return output if isinstance(output, torch.Tensor) else output.logits if hasattr(output, "logits") else output[0]


class NonFiniteLoss(Exception):
    """Internal: the loss of a step was NaN or infinite."""

    def __init__(self, step: int, batch: int, value: float):
        super().__init__(step, batch, value)
        self.step, self.batch, self.value = step, batch, value


class Trainer:
    """One run of :func:`retrofit.train.run.finetune` in this process (one rank of a torchrun job)."""

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
        self.folder = RunFolder(self.out, d, self.say)

    # ---------------------------------------------------------------- setup
    def build(self) -> None:
        """Set up model and data (:func:`retrofit.train.setup.set_up`), then :meth:`prepare`; a resumed run
        is restored from its trainer state and first rewrites its outputs from it."""
        inputs = set_up(self.config, self.d, self.out)
        self.state, self.data_config, self.splits = inputs.state, inputs.data_config, inputs.splits
        self.head_before, self.head_replaced = inputs.head_before, inputs.head_replaced
        self.renamed_classes = inputs.renamed_classes
        self.train_loader, self.val_loader, self.train_sampler = inputs.train_loader, inputs.val_loader, inputs.train_sampler
        self.prepare(inputs.model, len(self.train_loader))
        if self.state is not None:
            self._restore(self.state)
            if self.d.is_main and self.history:
                write_epoch_files(self)
        #: (epoch, parameters) that drift.csv measures from: the run's start, or the epoch a resume began at
        self.drift_start = (self.epoch, parameter_snapshot(self.model))
        self._step_schedule()

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
        self.has_blocks = bool(gate_parameter_names(model))  # inserted blocks with parameters (their own group)
        self.batches_per_epoch = batches_per_epoch
        self.updates_per_epoch = math.ceil(batches_per_epoch / cfg.accum_steps)

        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.updates_per_epoch)
        self.criterion = make_criterion(cfg)
        self.mixup = make_mixup(cfg, num_classes(model))
        self.ema = make_ema(model, cfg)
        self.block_warmup = block_warmup_updates(cfg, self.updates_per_epoch)

        self.epoch, self.updates = 0, 0
        self.saved_epoch = 0  # the last epoch whose trainer state is written: --resume continues from it
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "top1": -1.0, "weights": "model"}
        self.frozen: bool | None = None
        self.forward_model: nn.Module = model

    def _restore(self, state: Any) -> None:
        from ..weights import load_state_dict_strict

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

    def _step_schedule(self) -> None:
        """Set every group's learning rate for the next update: timm's schedule, then the blocks' warm-up."""
        self.scheduler.step_update(self.updates)
        apply_block_warmup(self.optimizer, self.updates, self.block_warmup)

    def enter_phase(self, frozen: bool) -> None:
        """Freeze or unfreeze the backbone and (re)wrap the model for DDP / torch.compile."""
        if frozen == self.frozen:
            return
        self.frozen = frozen
        set_backbone_frozen(self.model, frozen)
        if self.config.train == "head":
            freeze_gates(self.model)
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
        if self.frozen or cfg.bn_stats == "frozen":
            freeze_batchnorm_stats(self.model)
        n_batches = len(batches)
        accum = cfg.accum_steps
        # the running loss shows "–" until the first loss is read back (not "nan")
        task = progress.add_task("", total=n_batches, epoch=f"{epoch + 1}/{cfg.epochs}", loss="–", ips=0.0) if progress else None
        pending: list[torch.Tensor] = []
        loss_total, images_total, skipped, done = 0.0, 0, 0, 0
        images_read = 0  # images whose loss is in loss_total (read back from the device)
        group_has_grad = False
        start = time.perf_counter()
        for i, (images, labels, bad) in enumerate(batches):
            skipped += self._bad_images(bad)
            group_start = (i // accum) * accum
            group_size = min(accum, n_batches - group_start)
            last_micro = i + 1 == group_start + group_size
            if images is not None and self.mixup is not None and images.shape[0] < 2:
                images = None  # mixup pairs images: one left alone by skipped unreadable ones is not trained on
            if images is None:
                if d.distributed:
                    raise RetrofitError(f"every image of a batch on rank {d.rank} was unreadable; remove the bad images")
            else:
                images, labels = self._to_device(images, labels)
                if self.mixup is not None:
                    images, labels = mix(self.mixup, images, labels)
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
                self._step_schedule()
                if self.ema is not None:
                    self.ema.update(self.model, step=self.updates)
                group_has_grad = False
            if len(pending) >= self.sync_every or i + 1 == n_batches:
                loss_total += self._check_losses(pending, epoch, i + 1 - len(pending), n_batches)
                images_read, pending = images_total, []
            if task is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                shown = f"{loss_total / images_read:.4f}" if images_read else "–"
                progress.update(task, advance=i + 1 - done, loss=shown,
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

    def say(self, text: str) -> None:
        """One line on rank 0's console."""
        if self.d.is_main and self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def one_epoch(self, progress: Any) -> None:
        """Train and evaluate one epoch, then (rank 0) write the trainer state first and the other files after it."""
        cfg, d = self.config, self.d
        epoch = self.epoch
        frozen = epoch < cfg.freeze_backbone_epochs or cfg.train != "full"
        self.enter_phase(frozen)
        self.train_sampler.set_epoch(epoch)
        train = self.train_one_epoch(epoch, self.train_loader, progress)
        if not frozen and cfg.bn_stats != "frozen":  # frozen statistics are the same on every rank; a mean of 3 copies may round
            distributed.average_batchnorm_stats(d, self.model, *([self.ema.module] if self.ema is not None else []))
        with recording_gates(self.model) as gates:
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
            # diagnostics (gates.csv, drift.csv); rank 0's view, the same weights on every rank
            "gates": gates.rows(epoch + 1) if gates is not None else [],
            "drift": parameter_drift(self.model, self.drift_start[1], epoch + 1, since=self.drift_start[0]),
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
            with deferred():  # a signal during the write still finds saved_epoch telling the truth
                write_state(self, rng)
                self.saved_epoch = self.epoch  # resumable from here: --resume rewrites the other files from the state
            self.folder.drop_replaced()
            write_epoch_files(self)
        distributed.barrier(d)
        self.saved_epoch = self.epoch  # the other ranks learn it here
        self.say(report.epoch_line(self, row, improved is not None))

    def rank_digests(self) -> list[str]:
        """Every rank's SHA-256 of its model's state dict (equal after a correct DDP run)."""
        from ..checkpoint import _contiguous_unshared, tensors_digest

        return distributed.gather_objects(self.d, tensors_digest(_contiguous_unshared(self.model.state_dict())))
