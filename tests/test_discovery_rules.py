"""Site-discovery rules and rewrite fidelity found by the coverage sweep (docs/coverage.md).

Each case is a tiny module shaped like the zoo model that exposed it.
"""

from __future__ import annotations

import torch
from torch import nn

import retrofit

SIZE = (8, 16, 16)


def _conv():
    return nn.Conv2d(8, 8, 3, padding=1)


def _run(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


class _InplaceResidual(nn.Module):
    """timm Bottleneck's tail: ``x += shortcut``."""

    def __init__(self):
        super().__init__()
        self.conv = _conv()

    def forward(self, x):
        shortcut = x
        x = self.conv(x)
        x += shortcut
        return x


def test_regenerated_forward_adds_in_place_into_the_branch():
    model = nn.Sequential(_conv(), _InplaceResidual())
    seen = {}
    model, inserted = retrofit.add_attention(model, "eca", input_size=SIZE)
    assert [s.key for s in inserted] == ["1.eca"]
    model[1].conv.register_forward_hook(lambda m, a, out: seen.setdefault("branch", out))
    out = _run(model, torch.randn(2, *SIZE))
    # `x += shortcut` became `x = shortcut + x · gate` written into x (one addcmul), not a new tensor
    assert out.data_ptr() == seen["branch"].data_ptr()


class _ChannelsLast(nn.Module):
    """A Swin / MambaOut block: the residual runs on ``(N, H, W, C)``."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = x + self.mlp(x)
        return x.permute(0, 3, 1, 2)


class _ChannelsFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _conv()

    def forward(self, x):
        return x + self.conv(x)


def test_channels_last_residual_is_no_site():
    sites, failures = retrofit.find_sites(nn.Sequential(_conv(), _ChannelsLast(), _ChannelsFirst()), SIZE)
    assert [s.owner for s in sites] == ["2"] and failures == []
    assert (sites[0].channels, sites[0].height, sites[0].width) == (8, 16, 16)


class _OptionalShortcut(nn.Module):
    """DLA's ``DlaBasic``: the caller may hand in the shortcut; ``None`` means identity."""

    def __init__(self):
        super().__init__()
        self.conv = _conv()

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        out = self.conv(x)
        out += shortcut
        return out


class _Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.project = _conv()
        self.tree1 = _OptionalShortcut()
        self.tree2 = _OptionalShortcut()

    def forward(self, x):
        x1 = self.tree1(x, self.project(x))
        return self.tree2(x1)


def test_none_argument_is_fixed_and_a_handed_in_shortcut_is_a_site():
    model = nn.Sequential(_conv(), _Tree())
    x = torch.randn(2, *SIZE)
    before = _run(model, x)
    sites, failures = retrofit.find_sites(model, SIZE)
    assert failures == []
    assert [(s.owner, s.shortcut, s.unit_input, s.fixed_args) for s in sites] == [
        ("1.tree1", "shortcut", "x", ()),
        ("1.tree2", "x", "x", (("shortcut", None),)),
    ]
    model, _ = retrofit.add_attention(model, "eca", input_size=SIZE)
    assert torch.equal(_run(model, x), before)
    with torch.no_grad():  # the fixed argument keeps its name: keyword calls still work
        assert torch.equal(model[1].tree2(before, shortcut=None), model[1].tree2(before))


class _AppendingChild(nn.Module):
    """timm's ``SequentialAppendList``: appends to a list its caller reads afterwards."""

    def __init__(self):
        super().__init__()
        self.conv = _conv()

    def forward(self, x, feats):
        feats.append(self.conv(x))
        return x


class _ReadsAppendedList(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = _AppendingChild()

    def forward(self, x):
        feats = [x]
        x = self.child(x, feats)
        return x + feats[-1]  # fx sees feats == [x] at trace time: the graph would add x + x


def test_owner_whose_graph_misses_a_mutation_is_refused():
    sites, failures = retrofit.find_sites(nn.Sequential(_conv(), _ReadsAppendedList()), SIZE)
    assert sites == []
    assert [(f.owner, f.reason) for f in failures] == [
        ("1", "its traced graph does not reproduce its output (Python-side state or in-place argument updates)")
    ]


class _Hierarchical(nn.Module):
    """Res2Net's ``Bottle2neck``: ``sp + spx[i]`` inside the residual branch."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a, b = self.conv1(x).chunk(2, dim=1)
        b = self.conv2(a + b)
        return self.conv3(torch.cat([a, b], dim=1)) + x


def test_addition_nested_in_a_residual_branch_is_no_site():
    sites, _ = retrofit.find_sites(nn.Sequential(_conv(), _Hierarchical()), SIZE)
    assert [(s.owner, s.shortcut, s.channels) for s in sites] == [("1", "x", 8)]


class _ModuleShortcut(nn.Module):
    """EdgeNeXt's ``ConvBlock``: the shortcut is itself a module call, and the first operand."""

    def __init__(self):
        super().__init__()
        self.conv_dw, self.mlp = _conv(), _conv()
        self.drop_path = nn.Identity()

    def forward(self, x):
        x = self.conv_dw(x)
        return x + self.drop_path(self.mlp(x))


def test_gate_goes_on_the_branch_when_the_shortcut_is_a_module_call():
    model = nn.Sequential(_conv(), _ModuleShortcut())
    x = torch.randn(2, *SIZE)
    before = _run(model, x)
    model, inserted = retrofit.add_attention(model, "eca", input_size=SIZE)
    assert [(s.site.residual_branch, s.site.shortcut) for s in inserted] == [("mlp", "conv_dw")]
    seen = {}
    model[1].eca.register_forward_hook(lambda m, a, out: seen.setdefault("input", a[0]))
    assert torch.equal(_run(model, x), before)
    assert torch.equal(seen["input"], model[1].mlp(model[1].conv_dw(model[0](x))).detach())


class _ShapeOnlyHead(nn.Module):
    """torchvision ``LRASPPHead``: the high branch meets ``low`` only through ``low.shape``."""

    def __init__(self):
        super().__init__()
        self.low_classifier, self.high_classifier = _conv(), _conv()

    def forward(self, low, high):
        high = nn.functional.interpolate(self.high_classifier(high), size=low.shape[-2:], mode="nearest")
        return self.low_classifier(low) + high


class _TwoResolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.down, self.head = _conv(), nn.Conv2d(8, 8, 3, stride=2, padding=1), _ShapeOnlyHead()

    def forward(self, x):
        low = self.stem(x)
        return self.head(low, self.down(low))


def test_operands_that_meet_only_through_a_shape_are_no_site():
    sites, failures = retrofit.find_sites(_TwoResolutions(), SIZE)
    assert (sites, failures) == ([], [])
    message = retrofit.surgery.no_site_message(
        _TwoResolutions(), [retrofit.graph.TraceFailure(f"m{i}", "Conv2d", "untraceable") for i in range(5)]
    )
    assert message.endswith("m1 (Conv2d): untraceable (and 3 more)")


class _UpdatesItsInput(nn.Module):
    """A unit that adds into its own input (``x += f(x)``): the probe's record of that input must be
    taken before the call, or the replay would start from the updated map."""

    def __init__(self):
        super().__init__()
        self.conv = _conv()

    def forward(self, x):
        x += self.conv(x)
        return x


def test_owner_that_updates_its_input_in_place_is_a_site():
    model = nn.Sequential(_conv(), _UpdatesItsInput(), nn.ReLU(inplace=True))  # the ReLU updates the unit's output
    sites, failures = retrofit.find_sites(model, SIZE)
    assert failures == []
    assert [(s.owner, s.residual_branch, s.shortcut, s.channels) for s in sites] == [("1", "conv", "x", 8)]


def test_same_output_tolerance_nans_and_infinities():
    from retrofit.probe import same_output

    a = torch.tensor([1000.0, -2.0, 0.5])
    assert same_output(a, a + torch.tensor([0.009, 0.0, 0.0]))  # within 1e-5 of the scale 1000
    assert not same_output(a, a + torch.tensor([0.0, 0.0, 0.011]))
    nan, inf = float("nan"), float("inf")
    assert same_output(torch.tensor([nan, inf, 1.0]), torch.tensor([nan, inf, 1.0]))
    assert not same_output(torch.tensor([nan, 1.0]), torch.tensor([1.0, 1.0]))
    assert not same_output(torch.tensor([1.0, 1.0]), torch.tensor([1.0, nan]))
    assert not same_output(torch.tensor([inf, 1.0]), torch.tensor([1.0, 1.0]))
    assert not same_output(torch.tensor([3e38, 1.0]), torch.tensor([-3e38, 1.0]))  # a difference past float range
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert same_output(half, half.clone()) and not same_output(half, half * 2)
