"""Stage numbers of residual sites: timm's ``feature_info`` index, else the stride level.

ResNet's ``layer1`` … ``layer4`` are stages 1 … 4 either way; ConvNeXt's ``stages.N`` is N.
A probe so small that maps shrink to one pixel cannot tell stages apart (:func:`stages_measurable`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from torch import nn

if TYPE_CHECKING:
    from .graph import Site

def stages_measurable(sites: Sequence["Site"]) -> bool:
    """Whether the sites' stride stages can be read off the probe: no residual map of 1 pixel.

    A map that has shrunk to one pixel (a probe input smaller than the model's stride) looks the
    same at every later stride, so its stage number would be wrong; ``--stages`` and per-stage
    kernel sizes refuse such a probe.
    """
    return all(min(s.height, s.width) > 1 for s in sites)



def stride_of(input_h: int, h: int) -> int:
    """The power-of-two stride that shrinks ``input_h`` rows to ``h``."""
    return 2 ** round(math.log2(max(input_h / h, 1)))



def stage_numbers(model: nn.Module, strides: list[int]) -> list[int]:
    """Stage numbers for sites at ``strides``.

    timm's numbering when it covers every site: the index of the ``model.feature_info`` entry with
    that reduction (ResNet ``layer1`` … ``layer4`` → 1 … 4, ConvNeXt ``stages.0`` … ``stages.3`` →
    0 … 3). Otherwise (torchvision, or a site at a stride feature_info does not list) the stride
    level: stride 4 → 1, 8 → 2, 16 → 3, 32 → 4, which is the same for ResNets.
    """
    info = getattr(model, "feature_info", None)
    by_reduction: dict[int, int] = {}
    if isinstance(info, list):
        for i, entry in enumerate(info):
            if isinstance(entry, dict) and isinstance(entry.get("reduction"), int):
                by_reduction.setdefault(entry["reduction"], i)
    if strides and all(s in by_reduction for s in strides):
        return [by_reduction[s] for s in strides]
    return [max(0, s.bit_length() - 2) for s in strides]
