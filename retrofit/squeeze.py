"""The squeeze taken before the residual branch's last 1×1 projection, when that is exact.

A gate's squeeze is the mean over H×W of the map it gates, ``s = mean(y)``; on a ResNet bottleneck
or an MBConv block that map is ``y = bn(conv(z))`` with a 1×1, stride-1 ``conv`` and a batch norm
that uses its running statistics (eval mode). Both are affine maps of each pixel, so they commute
with the mean: ``mean(y) = bn(conv(mean(z)))``. ``z`` has the bottleneck's inner width (a quarter
of ``y``'s channels in a ResNet bottleneck, a sixth in an MBConv block), so the squeeze reads a
quarter (a sixth) of the bytes; the 1×1 conv and the batch norm then run on one pixel per image
(arXiv 1709.01507 §3.1 defines the squeeze; the identity is plain linearity). On a small map
with many channels the pooled conv costs more than the mean it saves, so it is taken only on the
large early maps (``PAYOFF``: ResNet-50's layer1 and layer2).

The early squeeze is taken only where it computes the same numbers up to float rounding and
changes nothing else: the gate is fused into the addition (:func:`retrofit.rewrite.gated_add`),
autograd is off (``torch.no_grad`` / ``inference_mode``: nothing to differentiate), the modules are
exactly ``nn.Conv2d`` and ``nn.BatchNorm2d`` (or timm's ``BatchNormAct2d`` with neither activation
nor dropout) as when the model was rewritten (not a LoRA or quantised replacement swapped in
later), the batch norm is in eval mode with running statistics,
and no hook sits on either module (a hook may change what they return). Otherwise the gate
squeezes the map itself. Under :func:`exact_squeeze` (what :func:`retrofit.profile` counts, so MACs
stay those of the blocks as the papers define them) it always does.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _module

_enabled = True


@contextlib.contextmanager
def exact_squeeze() -> Iterator[None]:
    """Within this block every gate squeezes the map it gates (no early squeeze)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _plain_projection(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid", "same")
    )


def _plain_norm(bn: nn.Module) -> bool:
    """``nn.BatchNorm2d``, or timm's ``BatchNormAct2d`` with neither activation nor dropout (the
    norm that ends an EfficientNet / MobileNet block: ``apply_act=False``)."""
    if type(bn) is nn.BatchNorm2d:
        return True
    cls = type(bn)
    return (
        cls.__name__ == "BatchNormAct2d"
        and cls.__module__.startswith("timm.")
        and type(getattr(bn, "act", None)) is nn.Identity
        and type(getattr(bn, "drop", None)) is nn.Identity
    )


#: The early squeeze is taken where the elements it spares reading are at least this many times
#: the multiply-adds its pooled 1×1 conv costs. ResNet-50 at 224²: layer1 (256 × 56² from 64 × 56²)
#: spares 37× its cost, layer2 4.6× (measured: 0.29 ms against the mean's 0.67 ms, batch 8, NCHW),
#: layer3 0.6×, layer4 0.07× (there a 2048 × 512 conv on the pooled vector costs more than the mean
#: over a 7 × 7 map it replaces: 0.45–1.43 ms against 0.14–0.28 ms).
PAYOFF = 4


def _pays(y: torch.Tensor, z: torch.Tensor) -> bool:
    """``H·W·(C − C_in) ≥ PAYOFF · C_in · C``: the squeeze of ``z`` reads enough fewer elements."""
    c, (c_in, h, w) = y.shape[1], z.shape[1:]
    return h * w * (c - c_in) >= PAYOFF * c_in * c


def projected_squeeze(y: torch.Tensor, z: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """What the gate of ``y = bn(conv(z))`` squeezes: ``bn(conv(mean(z)))``, ``(N, C, 1, 1)``, when that
    is exact (see the module docstring), else ``y`` itself, ``(N, C, H, W)``.

    The gate's squeeze (a mean over H×W) leaves a ``(N, C, 1, 1)`` tensor as it is, so either way
    the gate sees ``mean(y)``; a hook on the gate sees the map whenever autograd is on.
    ``z``: ``(N, C_in, H, W)``, the projection's input.
    """
    if (
        _enabled
        and not torch.is_grad_enabled()
        and _plain_projection(conv)
        and _plain_norm(bn)
        and not bn.training
        and bn.running_mean is not None
        and not (_hooked(conv) or _hooked(bn) or _global_hooks())
        and _pays(y, z)
    ):
        if conv.groups == 1:  # a 1×1 conv of one pixel is a matrix product: F.linear is several times faster on CPU
            s = F.linear(z.mean((2, 3)), conv.weight.flatten(1), conv.bias)
        else:
            s = F.conv2d(z.mean((2, 3), keepdim=True), conv.weight, conv.bias, groups=conv.groups).flatten(1)
        s = F.batch_norm(s, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return s.view(*s.shape, 1, 1)
    return y


def projection_of(gm: fx.GraphModule, gated: fx.Node) -> tuple[fx.Node, str, str] | None:
    """``(z, conv_target, bn_target)`` when the node ``gated`` is ``bn(conv(z))`` with a plain 1×1
    ``nn.Conv2d`` and a batch norm (``_plain_norm``) that tracks running statistics; else None."""
    if gated.op != "call_module" or len(gated.args) != 1 or gated.kwargs:
        return None
    bn, proj = gm.get_submodule(gated.target), gated.args[0]
    if not _plain_norm(bn) or not bn.track_running_stats or not isinstance(proj, fx.Node):
        return None
    if proj.op != "call_module" or len(proj.args) != 1 or proj.kwargs or not isinstance(proj.args[0], fx.Node):
        return None
    if not _plain_projection(gm.get_submodule(proj.target)):
        return None
    return proj.args[0], proj.target, gated.target
