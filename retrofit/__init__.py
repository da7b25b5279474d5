"""retrofit: add SE or ECA channel attention to a pretrained CNN, fine-tune it, save safetensors.

Public API (imported lazily, so ``retrofit --help`` does not import torch)::

    from retrofit import load_model, add_attention, save_checkpoint, load_checkpoint

    model, spec, origin = load_model("resnet50")          # timm / torchvision: / hf-hub:
    model, sites = add_attention(model, "eca")             # identity init: outputs unchanged
    save_checkpoint(model, "resnet50-eca.safetensors")     # tensors + JSON recipe
    profile(model).macs                                    # params, MACs, FLOPs, element ops
    model = load_checkpoint("resnet50-eca.safetensors")    # rebuilt without downloads
    save_adapter(model, "eca-only.safetensors")            # gates only + digest of the base weights
    model = load_checkpoint("eca-only.safetensors", base="resnet50.safetensors")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BLOCKS": "blocks",
    "create_block": "blocks",
    "eca_kernel_size": "blocks",
    "load_checkpoint": "checkpoint",
    "read_recipe": "checkpoint",
    "save_checkpoint": "checkpoint",
    "save_adapter": "adapter",
    "RetrofitError": "errors",
    "Site": "graph",
    "find_sites": "graph",
    "load_model": "models",
    "Profile": "profiling.profile",
    "profile": "profiling.profile",
    "PLACEMENTS": "surgery",
    "InsertedSite": "surgery",
    "add_attention": "surgery",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
