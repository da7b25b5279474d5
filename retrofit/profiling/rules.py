"""The counting rules: which aten op costs how many element operations, and which ops only move data.

MACs of convolution, linear, matmul and attention come from the formulas of
:mod:`torch.utils.flop_counter`; this module adds the element operations (the table in
:mod:`retrofit.profile` and ``docs/profile.md``) as ``FlopCounterMode``'s ``custom_mapping``.
The norm rules are fvcore's (``fvcore/nn/jit_handles.py``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

aten = torch.ops.aten

#: Ops that only move, view or allocate memory: zero cost, and not reported as uncounted.
DATA_MOVEMENT = frozenset(
    "view _unsafe_view reshape _reshape_alias t transpose permute expand expand_as squeeze unsqueeze "
    "flatten unflatten clone contiguous copy_ _to_copy to detach alias lift_fresh as_strided slice select "
    "narrow cat stack split split_with_sizes chunk unbind empty empty_like empty_strided new_empty "
    "new_empty_strided zeros zeros_like new_zeros ones ones_like new_ones full full_like new_full fill_ zero_ "
    "constant_pad_nd reflection_pad2d replication_pad2d roll flip channel_shuffle pixel_shuffle "
    "pixel_unshuffle index_select index _unsafe_index gather unfold repeat arange".split()
)

_POINTWISE = (
    "add sub rsub mul div neg abs sigmoid relu hardtanh hardsigmoid hardswish silu gelu mish leaky_relu elu "
    "softplus tanh exp log sqrt rsqrt reciprocal pow clamp clamp_min clamp_max maximum minimum where".split()
)
_REDUCTIONS = "mean sum amax amin _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool2d".split()
_WINDOWED_POOLS = (
    "max_pool2d max_pool2d_with_indices max_pool3d_with_indices avg_pool2d avg_pool3d".split()
)


def _numel(shape: Sequence[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _first_shape(out_shape: Any) -> torch.Size:
    """The shape of an op's (first) output; ``out_shape`` is a ``Size`` or a tuple of them."""
    if isinstance(out_shape, torch.Size):
        return out_shape
    return out_shape[0]


def _pointwise(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(_first_shape(out_shape))


def _reduction(x_shape: torch.Size, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(x_shape)


def _windowed_pool(x_shape: torch.Size, kernel_size: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    window = [kernel_size] if isinstance(kernel_size, int) else list(kernel_size)
    spatial = len(x_shape) - 2
    if len(window) == 1 and spatial > 1:
        window = window * spatial
    return _numel(_first_shape(out_shape)) * math.prod(window)


def _bn_inference(x_shape: torch.Size, weight: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # (x - mean) / std * w + b folds to x * a + c with the running statistics.
    return _numel(x_shape) * (2 if weight is not None else 1)


def _bn(x_shape: torch.Size, weight: Any, bias: Any, mean: Any, var: Any, training: bool, *args: Any,
        out_shape: Any = None, **kwargs: Any) -> int:
    if not training and mean is not None:
        return _bn_inference(x_shape, weight)
    return _numel(x_shape) * (5 if weight is not None else 4)


def _bn_batch_stats(x_shape: torch.Size, weight: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(x_shape) * (5 if weight is not None else 4)


def _layer_norm(x_shape: torch.Size, normalized_shape: Any, weight: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    return _numel(x_shape) * (5 if weight is not None else 4)


def _element_rules() -> dict[Any, tuple[str, Callable[..., int]]]:
    """``{aten packet: (label, formula)}`` for the element operations (see the module docstring)."""
    rules: dict[Any, tuple[str, Callable[..., int]]] = {}

    def add(name: str, label: str, formula: Callable[..., int]) -> None:
        if hasattr(aten, name):  # an op missing from this torch version is simply not counted
            rules[getattr(aten, name)] = (label, formula)

    for name in _POINTWISE:
        add(name, name, _pointwise)
        add(name + "_", name, _pointwise)
    for name in _REDUCTIONS:
        add(name, name.lstrip("_"), _reduction)
    for name in _WINDOWED_POOLS:
        add(name, name.replace("_with_indices", ""), _windowed_pool)
    add("_native_batch_norm_legit_no_training", "batch_norm", _bn_inference)
    add("_native_batch_norm_legit", "batch_norm", _bn_batch_stats)
    add("native_batch_norm", "batch_norm", _bn)
    add("cudnn_batch_norm", "batch_norm", _bn)
    add("native_layer_norm", "layer_norm", _layer_norm)
    add("native_group_norm", "group_norm", _bn_batch_stats)
    return rules


ELEMENT_RULES = _element_rules()


def op_name(packet: Any) -> str:
    return str(packet).removeprefix("aten.")
