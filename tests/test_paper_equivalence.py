"""Issue 2, acceptance 2-3: paper-init SE/ECA equal timm's hand-written seresnet50 / ecaresnet50d."""

from __future__ import annotations

import timm
import torch

import retrofit


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_se_r16_on_timm_resnet50_equals_seresnet50():
    model = timm.create_model("resnet50").eval()
    model, sites = retrofit.add_attention(model, "se", reduction=16, init="paper")
    assert len(sites) == 16
    assert _count(model) == 28_088_024
    reference = timm.create_model("seresnet50").eval()
    model.load_state_dict(reference.state_dict(), strict=True)  # same keys: layer1.0.se.fc1.weight …
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5


def test_se_r16_on_torchvision_resnet50_has_seresnet50_size():
    model, _, _ = retrofit.load_model("torchvision:resnet50", pretrained=False)
    model, sites = retrofit.add_attention(model, "se", reduction=16, init="paper")
    assert len(sites) == 16
    assert _count(model) == 28_088_024


def test_eca_on_timm_resnet50d_equals_ecaresnet50d():
    model = timm.create_model("resnet50d").eval()
    model, sites = retrofit.add_attention(model, "eca", init="paper")
    assert _count(model) == 25_576_350
    assert [s.options["kernel_size"] for s in sites] == [5] * 3 + [5] * 4 + [5] * 6 + [7] * 3
    reference = timm.create_model("ecaresnet50d").eval()
    state = {k.replace(".se.conv.", ".eca.conv."): v for k, v in reference.state_dict().items()}
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5
