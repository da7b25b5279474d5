"""Issue 11: the gate is fused into the residual addition (one addcmul), exactly and trainably."""

from __future__ import annotations

import operator

import timm
import torch
from torch import fx, nn

import retrofit
from retrofit.blocks import ChannelGate
from retrofit.rewrite import gated_add


class _Owner(nn.Module):
    def __init__(self, owner: nn.Module):
        super().__init__()
        self.owner = owner

    def forward(self, x):
        return self.owner(x)


class _GateLeaves(fx.Tracer):
    """Traces the rewritten owner's own code: torch.nn layers and the gates are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelGate) or super().is_leaf_module(m, qualname)


def test_bottleneck_graph_has_one_addcmul_and_no_multiply_before_the_addition():
    model = timm.create_model("resnet50d")
    retrofit.add_attention(model, "eca", input_size=(3, 64, 64))
    graph = _GateLeaves().trace(_Owner(model.layer1[0]))
    fused = [n for n in graph.nodes if n.target is torch.addcmul]
    assert len(fused) == 1
    shortcut, branch, gate = fused[0].args
    assert (branch.target, gate.target) == ("owner.bn3", "owner.eca")
    assert shortcut.target == "owner.downsample.2"  # resnet50d's projection: avg pool, conv, BN
    assert not [n for n in graph.nodes if n.target in (operator.add, operator.iadd, operator.mul, torch.mul)]


def test_fused_gates_give_the_same_outputs_in_place_and_train():
    # equality with the unfused, hand-written seresnet50 / ecaresnet50d: tests/test_paper_equivalence.py
    model = timm.create_model("resnet50d", zero_init_last=False)
    _, sites = retrofit.add_attention(model, "se", init="paper", input_size=(3, 64, 64))
    assert all(model.get_submodule(s.key).fused for s in sites)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.inference_mode():
        in_place = model(x)
    out_of_place = model(x)  # autograd records: a new tensor per addition
    assert torch.equal(in_place, out_of_place.detach())
    model.train()
    model(x).sum().backward()
    grads = [model.get_submodule(s.key).fc2.weight.grad for s in sites]
    assert len(grads) == 16 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gated_add_writes_in_place_only_when_autograd_records_nothing():
    base, branch, gate = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(2, 3, 1, 1)
    expected = base + branch * gate
    with torch.inference_mode():
        b = branch.clone()
        out = gated_add(base, b, gate, into="gated")
        assert out.data_ptr() == b.data_ptr() and torch.allclose(out, expected)
    leaf = branch.clone().requires_grad_()
    out = gated_add(base, leaf, gate, into="gated")
    assert out.data_ptr() != leaf.data_ptr() and torch.allclose(out, expected)
    out.sum().backward()
    assert torch.equal(leaf.grad, gate.expand_as(leaf))
