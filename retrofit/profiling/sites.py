"""Per-site rows: one :class:`SiteCost` per attention block a retrofit inserted (or swapped in).

The blocks' counts are their module rows from the counted pass; what the row adds is where the
block sits (owner, stage) and the map it gates in that pass (C×H×W), read by a forward pre-hook.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .costs import Cost, ModuleCost, unique_params


@dataclass(frozen=True)
class SiteCost(Cost):
    """The cost of one inserted attention block, or of one SE module swapped by ``--replace-existing``.

    ``key`` is its module path (``layer1.0.se``), ``owner`` the module it was inserted into
    (for a swap: the module holding it);
    ``channels``, ``height``, ``width`` describe the map it gates in the profiled forward pass;
    ``stage`` is the site's stage (:attr:`retrofit.graph.Site.stage`); ``setting`` reads like ``r=16 (16)``.
    For a swap, ``replaced`` is the former module's class (``SqueezeExcite``) and ``replaced_params``
    its parameters, which the base model holds: the Δ of the totals is then the rows' ``params``
    minus their ``replaced_params`` (for inserted blocks both are empty: the Δ is the rows' sum).
    """

    key: str = ""
    owner: str = ""
    block: str = ""
    channels: int = 0
    height: int = 0
    width: int = 0
    stage: int = 0
    setting: str = ""
    replaced: str = ""
    replaced_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "owner": self.owner, "block": self.block, "setting": self.setting,
                "channels": self.channels, "height": self.height, "width": self.width, "stage": self.stage,
                "replaced": self.replaced, "replaced_params": self.replaced_params, **super().to_dict()}


class SiteShapes:
    """Records the input shape of each inserted block during the profiled forward (hooks removed after)."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = {key: model.get_submodule(key) for key in block_keys(model)}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "SiteShapes":
        for key, block in self.blocks.items():
            def hook(module: nn.Module, args: tuple, key: str = key) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    self.shapes[key] = tuple(args[0].shape)

            self.handles.append(block.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def block_keys(model: nn.Module) -> list[str]:
    """Module paths of a retrofitted model's blocks: inserted ones, then ``--replace-existing`` swaps."""
    record = getattr(model, "_retrofit", None)
    if record is None:
        return []
    return [s.key for s in record.sites] + [r.path for r in record.replaced]


def site_rows(
    model: nn.Module, modules: tuple[ModuleCost, ...], shapes: dict[str, tuple[int, ...]],
    input_size: tuple[int, ...],
) -> tuple[SiteCost, ...]:
    record = getattr(model, "_retrofit", None)
    if record is None:
        return ()
    from ..blocks import block_class
    from ..stages import stage_numbers as _stages, stride_of as _stride

    rows_by_name = {m.name: m for m in modules}

    def row(key: str, owner: str, block: str, channels: int, options: dict[str, Any], height: int, width: int,
            stage: int, replaced: str = "", replaced_params: int = 0) -> SiteCost:
        counted = rows_by_name.get(key)
        block_module = model.get_submodule(key)
        params, _ = unique_params(block_module)
        element_ops = counted.element_ops if counted else 0
        by_op = dict(counted.element_ops_by_op) if counted else {}
        if getattr(block_module, "fused", False):
            # its multiply runs in the owner, inside the fused addition (rewrite.gated_add: one addcmul,
            # two element ops per element, one of them this gate's scaling of its (N, C, H, W) map)
            scale = math.prod(shapes.get(key, ()) or (0,))
            element_ops += scale
            by_op["mul"] = by_op.get("mul", 0) + scale
        return SiteCost(
            params,
            counted.macs if counted else 0,
            element_ops,
            by_op,
            key=key, owner=owner, block=block, channels=channels, height=height, width=width,
            stage=stage, setting=block_class(block).describe(options), replaced=replaced,
            replaced_params=replaced_params,
        )

    out = []
    for s in record.sites:
        shape = shapes.get(s.key, ())
        height, width = (shape[2], shape[3]) if len(shape) == 4 else (s.site.height, s.site.width)
        out.append(row(s.key, s.owner, s.block, s.channels, s.options, height, width, s.site.stage))
    for r in record.replaced:
        # A swapped SE module has no Site: its map and stage are read off the profiled forward.
        shape = shapes.get(r.path, ())
        height, width = (shape[2], shape[3]) if len(shape) == 4 else (0, 0)
        stage = _stages(model, [_stride(input_size[-2], height)])[0] if height else 0
        out.append(row(r.path, r.path.rpartition(".")[0], record.block, r.channels, r.options, height, width, stage,
                       r.was, r.params_before))
    return tuple(out)
