"""Swap a model's existing Squeeze-and-Excitation modules for another block (``--replace-existing``).

Models such as timm ``regnety_*``, ``efficientnet_b*``, ``mobilenetv3_*`` or torchvision's
``mobilenet_v3_*`` already have SE. The ECA paper (arXiv 1910.03151, Tables 2-4) claims ECA
matches or beats SE with a fraction of the parameters; this module lets users test that on
their pretrained network: each SE module is replaced in place, under the same attribute
name, by the chosen block sized for the SE's input channels.

The SE gates of a pretrained network are not 1, so a replacement cannot keep the outputs: with
identity init every new gate starts at 1 (the network as if SE were removed), and fine-tuning
is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .blocks import ChannelGate, block_class, create_block
from .errors import RetrofitError

#: Class names of SE modules in timm (SEModule, EffectiveSEModule, efficientnet's
#: SqueezeExcite, legacy senet's SEModule) and torchvision (ops.SqueezeExcitation).
SE_CLASS_NAMES = frozenset({"SEModule", "EffectiveSEModule", "SqueezeExcite", "SqueezeExcitation"})


@dataclass(frozen=True)
class Replacement:
    """One swapped module: its path, former class, channels C, new block's options and size."""

    path: str
    was: str
    channels: int
    options: dict[str, Any]
    params_before: int
    params_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "was": self.was,
            "channels": self.channels,
            "options": dict(self.options),
            "params_before": self.params_before,
            "params_after": self.params_after,
        }


def _input_channels(module: nn.Module) -> int | None:
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            return child.in_channels
        if isinstance(child, nn.Linear):
            return child.in_features
    return None


def find_existing_se(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(path, module, C)`` of every existing SE module (outermost only), in module order."""
    found: list[tuple[str, nn.Module, int]] = []
    for path, module in model.named_modules():
        if isinstance(module, ChannelGate) or type(module).__name__ not in SE_CLASS_NAMES:
            continue
        if any(path.startswith(p + ".") for p, _, _ in found):
            continue
        channels = _input_channels(module)
        if channels is not None:
            found.append((path, module, channels))
    return found


def replace_existing_se(
    model: nn.Module,
    block: str,
    *,
    init: str = "identity",
    reduction: int = 16,
    rd_divisor: int = 8,
    kernel_size: int | None = None,
    groups: int | None = None,
    planned: list[tuple[str, int, dict[str, Any]]] | None = None,
) -> list[Replacement]:
    """Replace every existing SE module of ``model`` by ``block``, in place.

    Args:
        planned: ``(path, C, options)`` to apply instead of searching (used to rebuild a
            checkpoint from its recipe).

    Returns: one :class:`Replacement` per swapped module.

    Raises:
        RetrofitError: the model has no SE module, or an option is out of range.
    """
    cls = block_class(block)
    if planned is None:
        existing = find_existing_se(model)
        if not existing:
            raise RetrofitError(
                f"--replace-existing: {type(model).__name__} has no squeeze-and-excitation module to replace"
            )
        if isinstance(kernel_size, (list, tuple)):
            raise RetrofitError("--replace-existing takes one --kernel-size, not one per stage")
        planned = [
            (path, c, cls.resolve(c, reduction=reduction, rd_divisor=rd_divisor, kernel_size=kernel_size, groups=groups))
            for path, _, c in existing
        ]
    new_blocks = [create_block(block, c, init=init, **options) for _, c, options in planned]
    param = next(model.parameters(), None)
    replaced = []
    for (path, channels, options), new in zip(planned, new_blocks):
        if param is not None:
            new = new.to(param.device, param.dtype)
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        setattr(parent, name, new)
        replaced.append(
            Replacement(
                path,
                type(old).__name__,
                channels,
                options,
                sum(p.numel() for p in old.parameters()),
                sum(p.numel() for p in new.parameters()),
            )
        )
    return replaced
