"""torchrun / DDP plumbing: process group, device, reductions, rank agreement.

Run unchanged under ``torchrun --nproc-per-node N retrofit finetune …``: torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` joins the
group with NCCL on CUDA and Gloo on CPU. Without them the run is a single process and every
helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import RetrofitError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world_size``, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is present, else ``cpu``; ``cuda`` without CUDA is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RetrofitError("--device cuda was asked for but CUDA is not available")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup(device_choice: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, Gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # torch._dynamo (imported by timm) keeps a reference to a process group that exists when
        # it is first imported; destroy_process_group then cannot free it, and Gloo's threads,
        # torn down at interpreter exit, can abort a run that succeeded. Import it first.
        import torch._dynamo  # noqa: F401

        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=30)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return Dist(rank, world_size, local_rank, device)


def teardown(d: Dist) -> None:
    """Leave the process group: collect what still refers to it (a dropped DDP wrapper), then destroy it."""
    if d.distributed and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def all_reduce_sum(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place); the tensor itself for one process."""
    if d.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (small picklable objects only)."""
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def average_batchnorm_stats(d: Dist, *modules: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (timm ``distribute_bn(reduce=True)``).

    Each rank updates its running stats from its own batches; averaging at the end of an epoch
    makes evaluation and the saved weights the same on every rank.
    """
    if not d.distributed:
        return
    from timm.utils import distribute_bn

    for m in modules:
        distribute_bn(m, d.world_size, reduce=True)
