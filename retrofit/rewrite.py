"""Rewrite one owner module: insert gate calls into its own fx graph and make that its forward.

Placements (SE paper, arXiv 1709.01507, §6.5 "integration strategy", Fig. 5):

* ``standard`` — on the residual branch, just before the addition (before drop-path);
* ``pre`` — on the unit's input, so branch and shortcut both see the recalibrated map;
* ``post`` — on the sum, before whatever follows the addition (e.g. the final ReLU);
* ``identity`` — on the shortcut, after its projection when there is one.

The owner is re-traced in train and eval mode (:func:`retrofit.trace.trace_owner`), one
``call_module`` node per site goes into each graph, the blocks become the owner's children, and
the regenerated code becomes the instance's ``forward`` (:class:`retrofit.forward.RewrittenForward`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .errors import RetrofitError
from .forward import RewrittenForward, portable_code
from .graph import Site
from .squeeze import projected_squeeze, projection_of
from .trace import Traced, trace_owner


def free_names(owner: nn.Module, base: str, count: int) -> list[str]:
    """Child names for new blocks: ``eca``, ``eca_1``, … (a ``None`` placeholder such as timm's
    ``self.se = None`` is taken over, so timm ``seresnet`` weights load under the same keys)."""
    names: list[str] = []
    i = 0
    while len(names) < count:
        name = base if i == 0 else f"{base}_{i}"
        i += 1
        taken = name in owner._modules and owner._modules[name] is not None
        taken = taken or (name not in owner._modules and getattr(owner, name, None) is not None)
        taken = taken or name in owner._parameters or name in owner._buffers
        if not taken:
            names.append(name)
    return names


def _node(gm: fx.GraphModule, name: str, owner: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise RetrofitError(
        f"cannot rewrite {owner or '<root>'}: its forward takes a different path in train and eval mode"
    )


def _insert(gm: fx.GraphModule, site: Site, attr: str, placement: str, owner_path: str) -> None:
    graph = gm.graph
    add = _node(gm, site.add_node, owner_path)
    if placement in ("standard", "identity") and _fuse(gm, site, attr, placement, owner_path):
        return
    if placement == "standard":
        branch = _node(gm, site.residual_branch, owner_path)
        shortcut = _node(gm, site.shortcut, owner_path)
        consumer = add
        while branch not in consumer.args:  # the gate goes before trailing drop-path / identity
            # follow the branch side: the shortcut may be a module call too (EdgeNeXt's conv_dw)
            consumer = next(a for a in consumer.args if isinstance(a, fx.Node) and a is not shortcut)
        with graph.inserting_after(branch):
            gate = graph.call_module(attr, (branch,))
        consumer.replace_input_with(branch, gate)
    elif placement == "identity":
        shortcut = _node(gm, site.shortcut, owner_path)
        with graph.inserting_before(add):
            gate = graph.call_module(attr, (shortcut,))
        add.replace_input_with(shortcut, gate)
    elif placement == "post":
        with graph.inserting_after(add):
            gate = graph.call_module(attr, (add,))
        add.replace_all_uses_with(gate, delete_user_cb=lambda user: user is not gate)
    else:  # pre
        unit_input = _node(gm, site.unit_input, owner_path)
        anchor = unit_input
        if unit_input.op == "placeholder":
            anchor = next(n for n in graph.nodes if n.op != "placeholder")
            ctx = graph.inserting_before(anchor)
        else:
            ctx = graph.inserting_after(anchor)
        with ctx:
            gate = graph.call_module(attr, (unit_input,))
        unit_input.replace_all_uses_with(gate, delete_user_cb=lambda user: user is not gate)


#: Additions that write into their first operand (``x += y``, ``x.add_(y)``).
_INPLACE_ADDS = (operator.iadd, "add_")


def gated_add(base: torch.Tensor, gated: torch.Tensor, gate: torch.Tensor, into: str | None = None) -> torch.Tensor:
    """``base + gated · gate`` in one pass over the map (``torch.addcmul``): a gate fused into a residual addition.

    Shapes: ``base`` and ``gated`` ``(N, C, H, W)``, ``gate`` ``(N, C, 1, 1)``. ``into`` (``"base"`` or
    ``"gated"``) writes the sum into that operand, as the original in-place addition did
    (timm's ``x += shortcut``), whenever autograd has nothing to record (inference, ``no_grad``);
    otherwise the sum is a new tensor (``out=`` is not differentiable). Under fx tracing (proxies),
    always the out-of-place form.
    """
    if (
        into is not None
        and all(isinstance(t, torch.Tensor) for t in (base, gated, gate))
        and not (torch.is_grad_enabled() and (base.requires_grad or gated.requires_grad or gate.requires_grad))
    ):
        return torch.addcmul(base, gated, gate, out=base if into == "base" else gated)
    return torch.addcmul(base, gated, gate)


def _fuse(gm: fx.GraphModule, site: Site, attr: str, placement: str, owner_path: str) -> bool:
    """Put the gate of ``standard`` (branch) or ``identity`` (shortcut) into the addition itself.

    ``shortcut + branch · gate`` becomes one :func:`gated_add` instead of a multiply that writes a
    whole map and an addition that reads it again (issue 11: memory traffic, not arithmetic, is
    ECA's cost). Only when the gated operand feeds the addition directly (a drop-path between
    them acts on the gated map). Where the gated branch ends in ``bn(conv1x1(z))``, the gate is
    handed :func:`retrofit.squeeze.projected_squeeze` (the squeeze of the narrower ``z`` when that is
    exact) instead of the map. Returns False when the site does not fit.
    """
    add = _node(gm, site.add_node, owner_path)
    branch, shortcut = _node(gm, site.residual_branch, owner_path), _node(gm, site.shortcut, owner_path)
    gated, base = (branch, shortcut) if placement == "standard" else (shortcut, branch)
    if set(add.args[:2]) != {gated, base} or add.kwargs or gated is base:
        return False
    inplace = add.target in _INPLACE_ADDS
    into = None if not inplace else ("gated" if add.args[0] is gated else "base")
    gm.get_submodule(attr).fused = True
    projection = projection_of(gm, gated) if placement == "standard" else None
    if projection is not None:  # squeeze the projection's narrower input when that is exact (squeeze.py)
        z, conv, bn = projection
        with gm.graph.inserting_before(gated.next):  # right after the norm, nodes in the order made
            refs = gm.graph.get_attr(conv), gm.graph.get_attr(bn)
            squeezed = gm.graph.call_function(projected_squeeze, (gated, z, *refs))
    with gm.graph.inserting_before(add):
        gate = gm.graph.call_module(attr, (gated if projection is None else squeezed,))
        fused = gm.graph.call_function(gated_add, (base, gated, gate), {"into": into} if into else {})
    add.replace_all_uses_with(fused)
    gm.graph.erase_node(add)
    return True


def rewrite_owner(owner: nn.Module, plan: list[tuple[Site, str, nn.Module]], placement: str, path: str = "",
                  traced: Traced | None = None) -> None:
    """Insert ``plan``'s blocks into ``owner``'s forward and register them as its children.

    ``plan`` holds ``(site, attr, block)`` per site of this owner. The owner's class is kept;
    its ``forward`` becomes the regenerated graph code (one per mode when train and eval
    graphs differ). ``traced``: discovery's graph of the owner, used (and changed) for its mode
    when it still fits the owner. Raises :class:`RetrofitError` when the owner cannot be re-traced.
    """
    owner_path = plan[0][0].owner if plan else path
    try:
        fixed = dict(plan[0][0].fixed_args) if plan else None
        modes = {
            mode: traced.graph if traced is not None and traced.fits(owner, mode, fixed)
            else trace_owner(owner, training=mode, fixed_args=fixed)
            for mode in (True, False)
        }
    except Exception as e:
        raise RetrofitError(f"cannot re-trace {owner_path or '<root>'}: {str(e).splitlines()[0]}") from e
    for gm in modes.values():
        for site, attr, block in plan:
            gm.add_submodule(attr, block)
            _insert(gm, site, attr, placement, owner_path)
        gm.graph.lint()
    for site, attr, block in plan:
        if attr in owner.__dict__:  # a `None` placeholder attribute (timm's `self.se = None`)
            del owner.__dict__[attr]
        owner.add_module(attr, block)
    for gm in modes.values():
        for name, value in gm.__dict__.get("_buffers", {}).items():
            if name.startswith("_tensor_constant") and not hasattr(owner, name):
                owner.register_buffer(name, value, persistent=False)
        for name, value in gm.__dict__.items():
            if name.startswith("_tensor_constant") and not hasattr(owner, name):
                owner.register_buffer(name, value, persistent=False)
    codes = {mode: portable_code(gm.graph) for mode, gm in (("train", modes[True]), ("eval", modes[False]))}
    if codes["train"][0] == codes["eval"][0]:
        codes = {"any": codes["eval"]}
    owner.forward = RewrittenForward(owner, codes)
