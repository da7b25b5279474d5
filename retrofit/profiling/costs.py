"""The row types of a profile: counts of one module, site or model (:class:`Cost`) and of one module (:class:`ModuleCost`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Cost:
    """Counts for one module, site or whole model.

    Attributes:
        params: parameters (unique tensors).
        macs: multiply-accumulates of convolutions and matmuls (per forward of the batch).
        element_ops: element operations (pooling, activations, gates, multiplies, adds, norms).
        element_ops_by_op: ``element_ops`` split by op label (``mean``, ``sigmoid``, ``mul``, …).
    """

    params: int
    macs: int
    element_ops: int
    element_ops_by_op: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """2 × MACs (one multiply and one add per MAC)."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops, "element_ops": self.element_ops,
                "element_ops_by_op": dict(sorted(self.element_ops_by_op.items()))}


@dataclass(frozen=True)
class ModuleCost(Cost):
    """One module's counts, inclusive of its children. ``name`` is its qualified path (``""``: root)."""

    name: str = ""
    type: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, **super().to_dict()}


def unique_params(module: nn.Module) -> tuple[int, int]:
    """``(params, trainable_params)`` of ``module``: unique tensors (``parameters()`` deduplicates by identity)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
