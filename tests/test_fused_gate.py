"""Issue 11: the gate is fused into the residual addition (one addcmul), exactly and trainably."""

from __future__ import annotations

import operator

import timm
import torch
from torch import fx, nn

import retrofit
from retrofit.blocks import ChannelGate
from retrofit.rewrite import gated_add
from retrofit.squeeze import exact_squeeze


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
    with torch.inference_mode(), exact_squeeze():
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


def _gate_inputs(model, sites, x):
    """The shape each gate was called with, in one forward of ``model`` on ``x``."""
    shapes = []
    hooks = [model.get_submodule(s.key).register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
             for s in sites]
    try:
        return model(x), shapes
    finally:
        for h in hooks:
            h.remove()


def test_without_autograd_the_squeeze_is_taken_before_the_last_projection():
    torch.manual_seed(0)
    model = timm.create_model("resnet50", zero_init_last=False).eval()
    native = timm.create_model("seresnet50", zero_init_last=False).eval()
    _, sites = retrofit.add_attention(model, "se", init="paper", input_size=(3, 64, 64))
    native.load_state_dict(model.state_dict())  # the same keys as timm's SEModule: an independent SE-ResNet-50
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        early, shapes = _gate_inputs(model, sites, x)
        want = native(x)
    # layer1's and layer2's gates get the pooled vector (256 × 56² squeezed from 64 × 56²: 37× fewer
    # elements than the pooled conv's MACs; layer2 4.6×); from layer3 on (0.6×) the gate squeezes the map
    assert shapes[:8] == [(1, 256, 1, 1)] * 3 + [(1, 512, 1, 1)] * 4 + [(1, 1024, 14, 14)] and len(shapes) == 16
    assert (early - want).abs().max().item() < 1e-5
    with torch.no_grad():
        assert torch.equal(model(x), early)  # no_grad takes it too, inference_mode or not
    exact, shapes = _gate_inputs(model, sites, x)  # autograd on: the gate squeezes the map itself
    assert shapes[0] == (1, 256, 56, 56) and (exact.detach() - want).abs().max().item() < 1e-5
    assert 0 < (exact.detach() - early).abs().max().item() < 1e-5  # float rounding apart, nothing else


def test_the_early_squeeze_steps_aside_for_hooks_swapped_modules_and_training():
    torch.manual_seed(0)
    model = timm.create_model("resnet50d", zero_init_last=False).eval()
    _, sites = retrofit.add_attention(model, "eca", init="paper", input_size=(3, 64, 64))
    x = torch.randn(1, 3, 224, 224)
    block = model.layer1[0]
    with torch.no_grad():
        with exact_squeeze():
            _, shapes = _gate_inputs(model, sites, x)
            assert shapes[0] == (1, 256, 56, 56)
        hook = block.bn3.register_forward_hook(lambda m, a, out: out * 2)  # a hook that changes the map
        _, shapes = _gate_inputs(model, sites, x)
        assert shapes[0] == (1, 256, 56, 56) and shapes[1][2:] == (1, 1)  # only the hooked block steps aside
        inp = torch.randn(1, 64, 56, 56)
        hooked = block(inp)
        with exact_squeeze():
            assert torch.equal(block(inp), hooked)  # the gate squeezed the hooked (doubled) map
        hook.remove()
        assert not torch.equal(block(inp), hooked)
        conv3 = block.conv3
        block.conv3 = nn.Sequential(conv3)  # swapped in after the retrofit (as a LoRA wrapper would be)
        _, shapes = _gate_inputs(model, sites, x)
        assert shapes[0] == (1, 256, 56, 56)
        block.conv3 = conv3
        block.bn3.train()  # batch statistics: not an affine map of each pixel
        _, shapes = _gate_inputs(model, sites, x)
        assert shapes[0] == (1, 256, 56, 56)


def test_se_excitation_is_a_matrix_product_unless_a_hook_watches():
    from retrofit.blocks import SqueezeExcite

    block = SqueezeExcite(256, 16, init="paper")
    s = torch.randn(8, 256, 1, 1)
    block.fc1.forward = None  # F.linear on fc1's weights: the conv module is not called
    fast = block.excite(s)
    del block.fc1.forward
    seen = []
    hook = block.fc1.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    slow = block.excite(s)
    hook.remove()
    assert seen == [(8, 16, 1, 1)]  # a hook sees the 1×1 conv's 4-D output, as before
    assert fast.shape == (8, 256, 1, 1) and (fast - slow).abs().max().item() < 1e-6
