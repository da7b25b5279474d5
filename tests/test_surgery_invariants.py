"""Issue 2, acceptance 4: class, keys, values, train/eval behaviour kept; new keys only under owners."""

from __future__ import annotations

import copy

import pytest
import torch

import retrofit

MODELS = ["resnet50", "mobilenetv2_035", "tf_efficientnet_lite0", "convnext_tiny", "torchvision:mobilenet_v2"]
SITES = {"resnet50": 16, "mobilenetv2_035": 10, "tf_efficientnet_lite0": 9, "convnext_tiny": 18,
         "torchvision:mobilenet_v2": 10}


@pytest.mark.parametrize("name", MODELS)
def test_identity_init_keeps_keys_values_and_outputs(name):
    base, _, _ = retrofit.load_model(name, pretrained=False)
    retro = copy.deepcopy(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    retro, sites = retrofit.add_attention(retro, "eca")
    assert len(sites) == SITES[name]
    assert type(retro) is type(base)

    after = retro.state_dict()
    for key, value in before.items():
        assert key in after, key
        assert torch.equal(after[key], value), key
    new_keys = set(after) - set(before)
    owners = {s.key for s in sites}
    assert new_keys and all(k.rsplit(".", 2)[0] in owners for k in new_keys), sorted(new_keys)[:5]

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (retro(x) - base(x)).abs().max().item() == 0.0  # eval, identity init: exact

    base.train()
    retro.train()
    torch.manual_seed(1)
    y_base = base(x)
    torch.manual_seed(1)
    y_retro = retro(x)
    assert (y_retro - y_base).abs().max().item() <= 1e-5
    rb, rr = base.state_dict(), retro.state_dict()
    for key in rb:
        assert torch.allclose(rb[key].float(), rr[key].float(), atol=1e-6), key  # same BN running stats


def test_mobilenetv2_keeps_all_314_keys_including_num_batches_tracked():
    model, _, _ = retrofit.load_model("mobilenetv2_035", pretrained=False)
    keys = list(model.state_dict())
    assert len(keys) == 314
    model, _ = retrofit.add_attention(model, "se")
    kept = [k for k in model.state_dict() if k in set(keys)]
    assert kept == keys
    assert sum(k.endswith("num_batches_tracked") for k in kept) == 52


def test_timm_methods_survive():
    model, _, _ = retrofit.load_model("resnet50", pretrained=False)
    model, _ = retrofit.add_attention(model, "eca")
    assert model.pretrained_cfg["architecture"] == "resnet50"
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 2048, 2, 2)
    model.reset_classifier(10)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_train_eval_switch_still_reaches_dropout_and_batchnorm():
    model, _, _ = retrofit.load_model("torchvision:mobilenet_v2", pretrained=False)
    model, _ = retrofit.add_attention(model, "eca")
    x = torch.randn(4, 3, 64, 64)
    model.train()
    bn = model.features[3].conv[3]  # inside a rewritten owner (a residual unit)
    seen = bn.num_batches_tracked.item()
    model(x)
    assert bn.num_batches_tracked.item() == seen + 1
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    assert bn.num_batches_tracked.item() == seen + 1


def test_discovery_changes_nothing():
    model, _, _ = retrofit.load_model("resnet50", pretrained=False)
    model.train()
    model.layer2.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
    modes = {n: m.training for n, m in model.named_modules()}
    sites, failures = retrofit.find_sites(model)
    assert len(sites) == 16 and failures == []
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_deepcopy_of_retrofitted_model_is_independent():
    # torchvision's resnet18: timm zero-initialises each block's last BN, which would hide the gate
    model, _, _ = retrofit.load_model("torchvision:resnet18", pretrained=False)
    model, _ = retrofit.add_attention(model, "se", init="paper")
    clone = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        clone.layer1[0].se.fc2.bias.add_(1.0)
        x = torch.randn(1, 3, 64, 64)
        assert not torch.equal(clone(x), model(x))


class _DataDependentBlock(torch.nn.Module):
    """A residual unit whose forward branches on tensor values: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.conv(x)
        return x - self.conv(x)


def test_untraceable_model_error_names_module_and_reason():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _DataDependentBlock())
    with pytest.raises(retrofit.RetrofitError) as info:
        retrofit.add_attention(model, "eca", input_size=(3, 16, 16))
    message = str(info.value)
    assert "no residual site found in Sequential" in message
    assert "1 (_DataDependentBlock)" in message and "control flow" in message


def test_add_attention_costs_two_forwards_of_convolutions():
    """Issue 18: discovery runs the model once and replays each owner's graph once (no third call of
    the owners to check the replay); timm resnet50 has 53 convolutions, 52 of them in its 16 owners."""
    model, _, _ = retrofit.load_model("resnet50", pretrained=False)
    calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    per_forward = len(calls)
    calls.clear()
    retrofit.add_attention(model, "eca", input_size=(3, 64, 64))
    assert per_forward == 53
    assert len(calls) == 53 + 52  # before issue 18: 53 + 52 + 52
