"""The probe: a seeded input of the right shape, eval mode under ``no_grad``, and one forward call.

Shared by counting (:mod:`.counter`) and timing (:mod:`.latency`): both run the model the
same way, and both turn a failing forward pass into one :class:`~retrofit.errors.RetrofitError` line.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import RetrofitError


def check_size(input_size: Sequence[int], batch_size: int) -> tuple[int, ...]:
    """``input_size`` as a tuple; :class:`RetrofitError` unless it and ``batch_size`` are positive integers."""
    size = tuple(input_size)
    if not size or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise RetrofitError(f"input size must be positive integers such as (3, 224, 224), got {input_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RetrofitError(f"batch size must be a positive integer, got {batch_size!r}")
    return size


def probe_input(model: nn.Module, size: tuple[int, ...], batch_size: int) -> torch.Tensor | list[torch.Tensor]:
    """``(batch_size, *size)`` standard-normal input on the model's device and dtype (seeded, global RNG
    untouched), or a list of images for a detector: :func:`retrofit.probe.probe_input`, with a one-line
    error when it cannot be allocated."""
    from ..probe import probe_input as make

    try:
        return make(model, size, batch=batch_size)
    except (RuntimeError, MemoryError, TypeError, OverflowError) as e:  # "can't allocate memory"; a size past int64
        shape = "×".join(map(str, (batch_size, *size)))
        raise RetrofitError(
            f"cannot allocate an input of {shape} ({type(e).__name__}); try a smaller --batch-size or --input-size"
        ) from None


class EvalNoGrad:
    """Eval mode and no_grad for the duration; every module's train/eval flag restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        for m, training in self.modes:
            m.training = training


def forward(model: nn.Module, x: torch.Tensor) -> None:
    """``model(x)``; any failure becomes one :class:`RetrofitError` line naming the input shape and a hint.

    An ``nn.MultiheadAttention`` takes query, key and value: it gets self-attention on the tokens
    ``x`` ``(N, L, E)`` (as ``(L, N, E)`` unless ``batch_first``), with ``need_weights=False`` as
    ``nn.TransformerEncoderLayer`` and torchvision's ViT call it.
    """
    try:
        if isinstance(model, nn.MultiheadAttention):
            tokens = x if model.batch_first else x.transpose(0, 1)
            model(tokens, tokens, tokens, need_weights=False)
        else:
            model(x)
    except RetrofitError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        memory = isinstance(e, MemoryError) or "allocate" in str(e) or "out of memory" in str(e)
        hint = "try a smaller --batch-size or --input-size" if memory else "check --input-size"
        raise RetrofitError(
            f"the forward pass on an input of shape {tuple(x.shape)} failed "
            f"({type(e).__name__}: {text[0][:200] if text else ''}); {hint}"
        ) from e
