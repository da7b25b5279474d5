"""Forward-pass wall time: median of timed runs after warm-up, interleaved across models for a fair comparison."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import RetrofitError
from .probe import EvalNoGrad, check_size, forward, probe_input


@dataclass(frozen=True)
class Latency:
    """Forward-pass wall time: the median over ``runs`` timed runs after ``warmup`` untimed ones.

    Attributes:
        median_ms: median of the timed runs, milliseconds.
        min_ms: fastest timed run, milliseconds.
        p25_ms, p75_ms: first and third quartile of the timed runs, milliseconds: the
            run-to-run spread; a difference of medians smaller than it is not a measured one.
        runs, warmup: how many timed and untimed forward passes.
        device: ``"cpu"`` or the CUDA device's name, e.g. ``"cuda:0 (NVIDIA H200)"``.
        threads: ``torch.get_num_threads()`` during the runs (intra-op CPU threads).
        batch_size: N of the input.
    """

    median_ms: float
    min_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    warmup: int
    device: str
    threads: int
    batch_size: int

    @property
    def spread_ms(self) -> float:
        """Interquartile range of the timed runs (``p75_ms - p25_ms``), milliseconds."""
        return self.p75_ms - self.p25_ms

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "p25_ms": self.p25_ms, "p75_ms": self.p75_ms,
                "spread_ms": self.spread_ms, "runs": self.runs, "warmup": self.warmup, "device": self.device, "threads": self.threads,
                "batch_size": self.batch_size}


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    *,
    runs: int = 20,
    warmup: int = 5,
) -> Latency:
    """Median forward time of ``model`` on ``(batch_size, *input_size)``, eval mode, no grad.

    ``warmup`` untimed passes first (allocator, cuDNN autotuning, caches), then ``runs`` timed
    ones with ``time.perf_counter``; on CUDA each timed pass is bracketed by
    ``torch.cuda.synchronize``. Runs on the model's own device with the current
    ``torch.get_num_threads()``; the model's train/eval flags are restored.

    Raises:
        RetrofitError: ``runs`` < 20 (a median of fewer is noise on a shared machine), negative
            ``warmup``, a bad size, or a failing forward pass.
    """
    return measure_latencies([model], input_size, batch_size, runs=runs, warmup=warmup)[0]


def measure_latencies(
    models: Sequence[nn.Module],
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    *,
    runs: int = 20,
    warmup: int = 5,
) -> list[Latency]:
    """:func:`measure_latency` for several models, their timed runs interleaved.

    Run ``i`` of every model happens before run ``i + 1`` of any, so a load change on the
    machine while measuring (other processes, thermal throttling) shifts all models alike and
    the comparison of base and retrofitted stays fair.
    """
    if not isinstance(runs, int) or runs < 20:
        raise RetrofitError(f"latency needs at least 20 timed runs, got {runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise RetrofitError(f"warm-up runs must be a non-negative integer, got {warmup!r}")
    size = check_size(input_size, batch_size)
    inputs = [probe_input(m, size, batch_size) for m in models]
    times: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(EvalNoGrad(m))
        for m, x in zip(models, inputs):
            for _ in range(warmup):
                forward(m, x)
        for _ in range(runs):
            for m, x, t in zip(models, inputs, times):
                t.append(_timed_forward(m, x))
    out = []
    for x, t in zip(inputs, times):
        q1, _, q3 = statistics.quantiles(t, n=4)
        out.append(Latency(1e3 * statistics.median(t), 1e3 * min(t), 1e3 * q1, 1e3 * q3, runs, warmup,
                           _device_name(x.device), torch.get_num_threads(), batch_size))
    return out


def _timed_forward(model: nn.Module, x: torch.Tensor) -> float:
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    forward(model, x)
    if cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
