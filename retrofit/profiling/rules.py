"""The counting rules: what each aten op costs, and which ops only move data.

MACs of convolution, linear and matmul come from the formulas of :mod:`torch.utils.flop_counter`
(registered there); this module adds, as ``FlopCounterMode``'s ``custom_mapping``:

* the attention kernels torch has no formula for (``_scaled_dot_product_flash_attention_for_cpu``,
  the kernel ``F.scaled_dot_product_attention`` runs on CPU): QKᵀ and A·V, as torch counts its
  CUDA kernels (``torch.utils.flop_counter.sdpa_flop_count``);
* the element operations (the table in :mod:`retrofit.profiling.profile` and ``docs/profile.md``); the
  norm rules are fvcore's (``fvcore/nn/jit_handles.py``);
* nearest-neighbour resizing: data movement, free, but counted as the op itself (never as the
  index arithmetic of its reference decomposition), so the fvcore-style total can add what fvcore
  charges for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

aten = torch.ops.aten

#: Ops that only move, view, copy or allocate memory: zero cost, and never reported as uncounted.
DATA_MOVEMENT = frozenset(
    "view _unsafe_view reshape _reshape_alias _reshape_copy t transpose permute expand expand_as squeeze "
    "unsqueeze flatten unflatten movedim diagonal view_as_real view_as_complex clone contiguous copy copy_ "
    "_to_copy to detach alias lift_fresh lift_fresh_copy as_strided as_strided_ slice select narrow cat stack "
    "split split_with_sizes chunk unbind squeeze_ unsqueeze_ transpose_ t_ detach_ resize_ set_ "
    "view_copy alias_copy detach_copy expand_copy permute_copy transpose_copy t_copy squeeze_copy "
    "unsqueeze_copy slice_copy select_copy unfold_copy split_copy unbind_copy as_strided_copy narrow_copy "
    "empty empty_like empty_strided empty_permuted new_empty new_empty_strided zeros zeros_like new_zeros "
    "ones ones_like new_ones full full_like new_full scalar_tensor fill fill_ zero_ arange linspace "
    "constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d "
    "replication_pad3d roll flip channel_shuffle pixel_shuffle pixel_unshuffle im2col col2im unfold repeat "
    "repeat_interleave index_select index _unsafe_index gather index_put index_put_ _unsafe_index_put "
    "_index_put_impl_ index_fill index_fill_ scatter scatter_ masked_scatter slice_scatter select_scatter "
    "_local_scalar_dense".split()
)

_POINTWISE = (
    "add sub rsub mul div neg abs sigmoid relu hardtanh hardsigmoid hardswish silu gelu mish leaky_relu elu "
    "softplus tanh exp log sqrt rsqrt reciprocal pow clamp clamp_min clamp_max maximum minimum where "
    "masked_fill eq ne lt le gt ge logical_not logical_and logical_or floor ceil round trunc sign erf sin cos "
    "remainder fmod lerp bitwise_not".split()
)
#: Pointwise ops of two arithmetic operations per element: ``a + b·c`` (retrofit's fused gate) and ``a + b/c``.
_POINTWISE_TWO_OPS = ("addcmul", "addcdiv")
_REDUCTIONS = (
    "mean sum amax amin cumsum linalg_vector_norm _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool2d"
).split()
_WINDOWED_POOLS = (
    "max_pool2d max_pool2d_with_indices max_pool3d_with_indices avg_pool2d avg_pool3d".split()
)
#: Interpolation: one element operation per neighbour blended into each output element.
_INTERPOLATIONS = {"upsample_linear1d": 2, "upsample_bilinear2d": 4, "upsample_trilinear3d": 8,
                   "upsample_bicubic2d": 16, "grid_sampler_2d": 4}
_NEAREST = ("upsample_nearest1d upsample_nearest2d upsample_nearest3d "
            "_upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d").split()
#: Fused attention kernels without a formula in torch.utils.flop_counter (it has the CUDA ones).
_ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")

#: Element-op labels that fvcore's FlopCountAnalysis counts besides MACs, with the same rules
#: (fvcore/nn/flop_count.py, ``_DEFAULT_SUPPORTED_OPS``): norms, bilinear upsampling and grid
#: sampling; nearest resizing (kind ``"resize"``) adds 1 per output element there too. fvcore also
#: counts adaptive average pooling, but timm's published GMACs (fvcore totals) leave out a pool run
#: as ``x.mean`` (timm's heads, every SE squeeze), and PyTorch runs a 1×1 adaptive pool as ``mean``
#: too, so pooling stays out: that reproduces timm's figures (docs/profile.md).
FVCORE_ELEMENT_LABELS = frozenset("batch_norm layer_norm group_norm upsample_bilinear2d grid_sampler_2d".split())


@dataclass(frozen=True)
class Rule:
    """How one aten op is counted.

    Attributes:
        kind: ``"element"`` (element operations), ``"macs"`` (the formula gives FLOPs, 2 per MAC,
            like torch's own formulas) or ``"resize"`` (nearest resizing: data movement, in no
            total; its output elements only enter :attr:`retrofit.Profile.fvcore_macs`).
        label: the name it is reported under (``batch_norm`` for all batch-norm kernels).
        formula: ``(input shapes…, out_shape=…) -> count``, the signature of
            ``torch.utils.flop_counter`` formulas.
        whole: count the op itself: all its overloads are registered, so ``FlopCounterMode``
            does not decompose it (interpolation would otherwise turn into index arithmetic
            under ``torch.inference_mode()``).
    """

    kind: str
    label: str
    formula: Callable[..., int]
    whole: bool = False


def _numel(shape: Sequence[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _first_shape(out_shape: Any) -> torch.Size:
    """The shape of an op's (first) output; ``out_shape`` is a ``Size`` or a tuple of them."""
    if isinstance(out_shape, torch.Size):
        return out_shape
    return out_shape[0]


def _pointwise(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(_first_shape(out_shape))


def _pointwise_two_ops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * _numel(_first_shape(out_shape))


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


def _attention(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
    """FLOPs of ``softmax(Q Kᵀ) V`` for ``Q`` ``(B, H, L, E)``, ``K`` ``(B, Hkv, S, E)``, ``V`` ``(B, Hkv, S, Ev)``.

    2·B·H·L·S·E for Q Kᵀ plus 2·B·H·L·S·Ev for A·V (2 FLOPs per MAC; key/value heads are
    broadcast to the query's H), as ``torch.utils.flop_counter.sdpa_flop_count``; the softmax,
    the scaling and a causal mask are not counted, as there.
    """
    b, h, length, e = query
    return 2 * b * h * length * key[-2] * (e + value[-1])


def _interpolation(neighbours: int) -> Callable[..., int]:
    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return neighbours * _numel(_first_shape(out_shape))

    return formula


def _rules() -> dict[Any, Rule]:
    """``{aten packet: Rule}`` (see the module docstring); an op missing from this torch version is skipped."""
    rules: dict[Any, Rule] = {}

    def add(name: str, kind: str, label: str, formula: Callable[..., int], whole: bool = False) -> None:
        if hasattr(aten, name):
            rules[getattr(aten, name)] = Rule(kind, label, formula, whole)

    for name in _POINTWISE:
        add(name, "element", name, _pointwise)
        add(name + "_", "element", name, _pointwise)
    for name in _POINTWISE_TWO_OPS:
        add(name, "element", name, _pointwise_two_ops)
        add(name + "_", "element", name, _pointwise_two_ops)
    for name in _REDUCTIONS:
        add(name, "element", name.lstrip("_"), _reduction)
    for name in _WINDOWED_POOLS:
        add(name, "element", name.replace("_with_indices", ""), _windowed_pool)
    add("_native_batch_norm_legit_no_training", "element", "batch_norm", _bn_inference)
    add("_native_batch_norm_legit", "element", "batch_norm", _bn_batch_stats)
    add("native_batch_norm", "element", "batch_norm", _bn)
    add("cudnn_batch_norm", "element", "batch_norm", _bn)
    add("native_layer_norm", "element", "layer_norm", _layer_norm)
    add("native_group_norm", "element", "group_norm", _bn_batch_stats)
    for name, neighbours in _INTERPOLATIONS.items():
        add(name, "element", name, _interpolation(neighbours), whole=True)
    for name in _NEAREST:
        add(name, "resize", name, _pointwise, whole=True)
    for name in _ATTENTION:
        add(name, "macs", name, _attention)
    return rules


RULES = _rules()


def flop_mapping() -> dict[Any, Callable[..., int]]:
    """``FlopCounterMode``'s ``custom_mapping``: every rule by packet, and by overload where ``whole``."""
    mapping: dict[Any, Callable[..., int]] = {}
    for packet, rule in RULES.items():
        mapping[packet] = rule.formula
        if rule.whole:
            for overload in packet.overloads():
                mapping[getattr(packet, overload)] = rule.formula
    return mapping


def op_name(packet: Any) -> str:
    """``aten.addmm`` → ``addmm``."""
    return str(packet).removeprefix("aten.")
