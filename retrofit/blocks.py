"""Channel-attention blocks: SE, ECA and the ECA paper's SE variants, plus a name registry.

Every block maps a feature map ``(N, C, H, W)`` to a recalibrated map of the same shape:
squeeze (global average over H×W → ``(N, C)``), excite (a small map C → C), gate (sigmoid),
scale (channel-wise multiply). Every block takes ``channels`` as its first argument, like
``timm.layers.create_attn``.

Gate and init (``init=``):

* ``"paper"`` — the papers' form: ``gate = sigmoid(z)`` with PyTorch's default init.
* ``"identity"`` — ``gate = 2·sigmoid(z)`` with the excitation's last layer zero-initialised,
  so ``z = 0`` and every gate is exactly 1 at insertion: the retrofitted network computes
  exactly what the pretrained one did (the analogue of LoRA's B = 0). Training then moves the
  gates away from 1 in either direction.

Parameter names match timm's ``SEModule`` (``fc1``, ``fc2``) and ``EcaModule`` (``conv``), so
weights of timm's ``seresnet*`` / ``ecaresnet*`` load into a retrofitted ``resnet*`` directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .errors import RetrofitError

INITS = ("identity", "paper")


def _check_init(init: str) -> None:
    if init not in INITS:
        raise RetrofitError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")


def _squeeze(x: torch.Tensor) -> torch.Tensor:
    """Global average pool ``(N, C, H, W) → (N, C, 1, 1)``.

    ``mean`` rather than ``AdaptiveAvgPool2d``: AMP- and channels_last-safe (pytorch issue 43992).
    """
    return x.mean((2, 3), keepdim=True)


class ChannelGate(nn.Module):
    """Base class: ``forward(x) = x * gate(x)``, ``gate(x) = gate_scale * sigmoid(excite(squeeze(x)))``.

    Subclasses implement :meth:`excite` ``(N, C, 1, 1) → (N, C, 1, 1)`` and the class methods
    :meth:`resolve` (CLI options → constructor kwargs for one site) and :meth:`describe`, and
    name the user options they take in ``OPTIONS``.
    """

    OPTIONS: tuple[str, ...] = ()

    def __init__(self, channels: int, init: str = "identity"):
        super().__init__()
        _check_init(init)
        if channels < 1:
            raise RetrofitError(f"channels must be ≥ 1, got {channels}")
        self.channels = channels
        self.init = init
        # 2·sigmoid(0) = 1 exactly in floating point, so an identity-initialised gate is exact.
        self.gate_scale = 2.0 if init == "identity" else 1.0
        #: True when the owner multiplies by the gate itself, fused into the residual addition.
        self.fused = False

    def excite(self, s: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel gate of ``x``: ``(N, C, H, W) → (N, C, 1, 1)``, ``gate_scale · sigmoid(excite(squeeze(x)))``."""
        gate = torch.sigmoid(self.excite(_squeeze(x)))
        if self.gate_scale != 1.0:
            gate = gate * self.gate_scale
        return gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x · gate(x)``; or ``gate(x)`` alone when the owner applies it fused with its residual
        addition (``fused``, set by :func:`retrofit.rewrite.rewrite_owner`)."""
        gate = self.gate(x)
        return gate if self.fused else x * gate

    @classmethod
    def resolve(cls, channels: int, **options: Any) -> dict[str, Any]:
        """Turn user options into this block's constructor kwargs for a site with ``channels``."""
        return {}

    @staticmethod
    def describe(kwargs: dict[str, Any]) -> str:
        """Short text for tables, e.g. ``r=16`` or ``k=5``."""
        return "-"

    def extra_repr(self) -> str:
        return f"channels={self.channels}, init={self.init}"


class SqueezeExcite(ChannelGate):
    """Squeeze-and-Excitation (Hu et al., arXiv 1709.01507, §3): FC C→C/r, ReLU, FC C/r→C, sigmoid.

    The FCs are 1×1 convolutions with bias, as in timm's ``SEModule`` (same keys and shapes).
    Parameters added: ``2·C·rd + rd + C``. The hidden width ``rd`` follows timm's ``SEModule``
    by default (:func:`se_hidden_width`: C/r rounded to a multiple of 8, at least 8), so a
    narrow site never gets a single hidden unit that, once dead for a batch, stops both FCs
    from learning; ``rd_divisor=1`` gives the paper's exact ``C // r`` (at least 1).

    Args:
        channels: C, channels of the feature map it gates.
        rd_channels: hidden width C/r.
        init: ``"identity"`` (fc2 zeroed, gate 2·sigmoid) or ``"paper"``.
    """

    OPTIONS = ("reduction", "rd_divisor")

    def __init__(self, channels: int, rd_channels: int, init: str = "identity"):
        super().__init__(channels, init)
        self.rd_channels = rd_channels
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        if init == "identity":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        """``fc2(relu(fc1(s)))``, ``(N, C, 1, 1) → (N, C, 1, 1)``.

        On a pooled vector a 1×1 convolution is a matrix product, and ``F.linear`` on the same
        weights computes it several times faster on CPU (batch 8, C 256–2048: 15–224 µs against
        80–540 µs, docs/benchmarks.md). Taken only where it is the same computation: ``fc1``,
        ``fc2`` are plain ``nn.Conv2d`` (not a LoRA or quantised replacement) and no hook sits on
        them, on ``act`` or on every module (a hook sees the 4-D tensors, and
        :func:`retrofit.profile` counts under a global hook, so its MACs stay those of the convs).
        """
        if s.dim() == 4 and s.shape[2:] == (1, 1) and self._plain_excitation():
            hidden = self.act(F.linear(s.flatten(1), self.fc1.weight.flatten(1), self.fc1.bias))
            return F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias).view(s.shape)
        return self.fc2(self.act(self.fc1(s)))

    def _plain_excitation(self) -> bool:
        return (
            type(self.fc1) is nn.Conv2d
            and type(self.fc2) is nn.Conv2d
            and type(self.act) is nn.ReLU
            and not any(m._forward_hooks or m._forward_pre_hooks for m in (self.fc1, self.act, self.fc2))
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
        )

    @classmethod
    def resolve(cls, channels: int, *, reduction: int = 16, rd_divisor: int = 8, **_: Any) -> dict[str, Any]:
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise RetrofitError(f"SE reduction ratio must be a positive integer, got {reduction}")
        if isinstance(rd_divisor, bool) or not isinstance(rd_divisor, int) or rd_divisor < 1:
            raise RetrofitError(f"SE hidden-width divisor must be a positive integer, got {rd_divisor}")
        rd = se_hidden_width(channels, reduction, rd_divisor)
        return {"rd_channels": rd, "reduction": reduction, "rd_divisor": rd_divisor}

    @staticmethod
    def describe(kwargs: dict[str, Any]) -> str:
        return f"r={kwargs['reduction']} ({kwargs['rd_channels']})"


def se_hidden_width(channels: int, reduction: int, divisor: int = 8) -> int:
    """SE's hidden width for C channels and reduction ratio r.

    ``divisor`` 1: the paper's ``C // r`` (arXiv 1709.01507, §3.2), at least 1. Otherwise timm's
    ``make_divisible(C / r, divisor, round_limit=0)`` as ``SEModule`` uses it: C/r rounded to the
    nearest multiple of ``divisor``, at least ``divisor`` (C=64, r=16 → 8; C=256 → 16; C=2048 → 128).
    """
    if divisor == 1:
        return max(1, channels // reduction)
    return max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """ECA's adaptive kernel size (Wang et al., arXiv 1910.03151, Eq. 12).

    ``k = |log2(C)/γ + β/γ|`` truncated, raised to the next odd number, at least 3.
    C=64→3, 128→5, 256→5, 512→5, 1024→5, 2048→7 (as timm's ``EcaModule``).
    """
    t = int(abs((math.log2(channels) + beta) / gamma))
    return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttention(ChannelGate):
    """Efficient Channel Attention (Wang et al., arXiv 1910.03151, §3.3).

    A 1-D convolution of odd size k across the pooled channel vector, no bias, no reduction.
    Parameters added: k. Keys and shapes match timm's ``EcaModule`` (``conv.weight``: (1, 1, k)).

    Args:
        channels: C.
        kernel_size: odd k ≥ 1; :func:`eca_kernel_size` when resolved from ``None``.
        init: ``"identity"`` (conv zeroed, gate 2·sigmoid) or ``"paper"``.
    """

    OPTIONS = ("kernel_size",)

    def __init__(self, channels: int, kernel_size: int = 3, init: str = "identity"):
        super().__init__(channels, init)
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        if init == "identity":
            nn.init.zeros_(self.conv.weight)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        n, c = s.shape[:2]
        return self.conv(s.view(n, 1, c)).view(n, c, 1, 1)

    @classmethod
    def resolve(cls, channels: int, *, kernel_size: int | None = None, **_: Any) -> dict[str, Any]:
        if kernel_size is None:
            return {"kernel_size": eca_kernel_size(channels)}
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise RetrofitError(f"ECA kernel size must be a positive odd integer, got {kernel_size}")
        if kernel_size > channels:
            raise RetrofitError(f"ECA kernel size {kernel_size} is larger than the {channels} channels of a site it mixes")
        return {"kernel_size": kernel_size}

    @staticmethod
    def describe(kwargs: dict[str, Any]) -> str:
        return f"k={kwargs['kernel_size']}"


class SEVar1(ChannelGate):
    """SE-Var1 (ECA paper, Table 2): squeeze → sigmoid, no parameters.

    Having no parameters it cannot start as an identity gate: use ``init="paper"``.
    """

    def __init__(self, channels: int, init: str = "paper"):
        super().__init__(channels, init)
        if init == "identity":
            raise RetrofitError(
                "se-var1 has no parameters, so it cannot start as an identity gate; use --init paper"
            )

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        return s


class SEVar2(ChannelGate):
    """SE-Var2 (ECA paper, Table 2): one weight per channel (a diagonal matrix), no bias. C parameters."""

    def __init__(self, channels: int, init: str = "identity"):
        super().__init__(channels, init)
        self.weight = nn.Parameter(torch.empty(channels))
        if init == "identity":
            nn.init.zeros_(self.weight)
        else:
            nn.init.uniform_(self.weight, -1.0, 1.0)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        return s * self.weight.view(1, -1, 1, 1)


class SEVar3(ChannelGate):
    """SE-Var3 (ECA paper, Table 2): one FC C→C, no bias. C² parameters."""

    def __init__(self, channels: int, init: str = "identity"):
        super().__init__(channels, init)
        self.fc = nn.Conv2d(channels, channels, 1, bias=False)
        if init == "identity":
            nn.init.zeros_(self.fc.weight)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        return self.fc(s)


class SEGroupConv(ChannelGate):
    """SE-GC (ECA paper, Table 2): one grouped FC C→C with G groups, no bias. C²/G parameters.

    ``groups`` must divide C. Resolved per site from the user's ``--groups`` (default 16, the
    paper's SE-GC1): the largest divisor of C not above it, so a site whose C is not a multiple
    of 16 still gets a grouped FC (C=24 → 12 groups).
    """

    OPTIONS = ("groups",)

    def __init__(self, channels: int, groups: int = 16, init: str = "identity"):
        super().__init__(channels, init)
        self.groups = groups
        self.fc = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)
        if init == "identity":
            nn.init.zeros_(self.fc.weight)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        return self.fc(s)

    @classmethod
    def resolve(cls, channels: int, *, groups: int | None = None, **_: Any) -> dict[str, Any]:
        groups = 16 if groups is None else groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise RetrofitError(f"se-gc groups must be a positive integer, got {groups}")
        fitted = max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)
        if groups > 1 and fitted == 1:
            raise RetrofitError(f"se-gc: C={channels} has no divisor between 2 and {groups}, so it cannot be grouped")
        return {"groups": fitted}

    @staticmethod
    def describe(kwargs: dict[str, Any]) -> str:
        return f"g={kwargs['groups']}"


#: CLI word → block class. Adding a block is its class plus one line here.
BLOCKS: dict[str, type[ChannelGate]] = {
    "se": SqueezeExcite,
    "eca": EfficientChannelAttention,
    "se-var1": SEVar1,
    "se-var2": SEVar2,
    "se-var3": SEVar3,
    "se-gc": SEGroupConv,
}


def block_class(name: str) -> type[ChannelGate]:
    """Look up a block by its CLI word. Raises :class:`RetrofitError` for an unknown name."""
    try:
        return BLOCKS[name]
    except KeyError:
        raise RetrofitError(f"unknown block {name!r}; choose one of: {', '.join(BLOCKS)}") from None


def create_block(name: str, channels: int, init: str = "identity", **kwargs: Any) -> ChannelGate:
    """Build block ``name`` for ``channels`` from resolved kwargs (see ``ChannelGate.resolve``)."""
    cls = block_class(name)
    ctor = {k: v for k, v in kwargs.items() if k not in ("reduction", "rd_divisor")}
    return cls(channels, init=init, **ctor)
