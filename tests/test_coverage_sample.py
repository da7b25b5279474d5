"""The coverage sweep (benchmarks/coverage.py, docs/coverage.md) on a fixed sample of both zoos.

Each model is built with random weights, retrofitted with ECA (identity init) at 64×64 (or the
smallest size it accepts), and checked: eval and train outputs unchanged, a pickle round trip
calls every gate, checkpoint round trip exact. Models without residual feature-map additions must be
refused with "no residual site". torchvision detectors and segmenters (benchmarks/coverage.py
``check_dense_model``) keep their detections and maps through insertion, pickle and checkpoint.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SWEEP_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "coverage.py"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("retrofit_coverage_sweep", _SWEEP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


NO_SITE = "no residual site found in {}: it has no addition of a residual branch and a shortcut"

#: (zoo, model, status, kind, sites or the start of the refusal).
SAMPLE = [
    # residual CNNs: every residual unit gets a gate
    ("torchvision", "resnet18", "pass", "all-sites", 8),
    ("torchvision", "resnet50", "pass", "all-sites", 16),
    ("torchvision", "resnext50_32x4d", "pass", "all-sites", 16),
    ("torchvision", "mobilenet_v2", "pass", "all-sites", 10),
    ("torchvision", "mobilenet_v3_small", "pass", "all-sites", 6),
    ("torchvision", "efficientnet_b0", "pass", "all-sites", 9),
    ("torchvision", "regnet_x_400mf", "pass", "all-sites", 22),
    ("torchvision", "regnet_y_400mf", "pass", "all-sites", 16),
    ("torchvision", "convnext_tiny", "pass", "all-sites", 18),
    ("torchvision", "mnasnet0_5", "pass", "all-sites", 10),  # its checkpoint needs module versions
    ("timm", "resnet18", "pass", "all-sites", 8),
    ("timm", "resnet50d", "pass", "all-sites", 16),
    ("timm", "seresnet18", "pass", "all-sites", 8),
    ("timm", "tf_efficientnet_b0", "pass", "all-sites", 9),  # Conv2dSame stays a leaf
    ("timm", "mobilenetv3_small_050", "pass", "all-sites", 7),
    ("timm", "convnext_atto", "pass", "all-sites", 12),
    ("timm", "regnety_002", "pass", "all-sites", 13),
    ("timm", "resnetv2_50", "pass", "all-sites", 16),
    ("timm", "res2net50_14w_8s", "pass", "all-sites", 16),  # not the hierarchical sp + spx[i]
    ("timm", "edgenext_xx_small", "pass", "all-sites", 12),  # the shortcut is a module call
    ("timm", "ghostnet_050", "pass", "all-sites", 16),
    ("timm", "hrnet_w18_small", "pass", "partial", 23),  # the root's incre sum is not offered (forward_features)
    ("timm", "levit_conv_128s", "pass", "all-sites", 20),
    ("timm", "dla34", "pass", "all-sites", 12),  # tree1 units get their shortcut as an argument
    # no residual connections
    ("torchvision", "vgg11", "no-site", "no-additions", NO_SITE.format("VGG")),
    ("torchvision", "densenet121", "no-site", "no-additions", NO_SITE.format("DenseNet")),
    ("torchvision", "shufflenet_v2_x0_5", "no-site", "no-additions", NO_SITE.format("ShuffleNetV2")),
    ("torchvision", "googlenet", "no-site", "no-additions", NO_SITE.format("GoogLeNet")),
    ("timm", "densenet121", "no-site", "no-additions", NO_SITE.format("DenseNet")),
    ("timm", "inception_v3", "no-site", "no-additions", NO_SITE.format("InceptionV3")),
    ("timm", "ese_vovnet19b_dw", "no-site", "no-additions", NO_SITE.format("VovNet")),
    # transformers: residuals on 3-D tokens or channels-last maps are not sites
    ("timm", "vit_tiny_patch16_224", "no-site", "tokens-only", NO_SITE.format("VisionTransformer")),
    ("timm", "swin_tiny_patch4_window7_224", "no-site", "channels-last", NO_SITE.format("SwinTransformer")),
    ("torchvision", "swin_t", "no-site", "channels-last", NO_SITE.format("SwinTransformer")),
    ("timm", "mambaout_femto", "no-site", "channels-last", NO_SITE.format("MambaOut")),
    # rotary embeddings add (N, heads, L, d) per-head tensors: 4-D, but tokens
    ("timm", "eva02_tiny_patch14_224", "no-site", "tokens-only", NO_SITE.format("Eva")),
]


@pytest.mark.slow
@pytest.mark.parametrize("zoo, name, status, kind, expected", SAMPLE, ids=[f"{z}:{n}" for z, n, *_ in SAMPLE])
def test_sweep_outcome(zoo, name, status, kind, expected, tmp_path):
    rec = sweep.check_model(zoo, name, tmp_path)
    assert (rec["status"], rec["kind"]) == (status, kind), rec.get("reason")
    if status == "pass":
        assert rec["sites"] == expected
        assert rec["eval_diff"] == 0.0
        assert rec["train_diff"] == 0.0
        assert rec["reload_diff"] == 0.0
        assert rec["pickle_diff"] == 0.0 and rec["pickle_gates_called"] == expected
        assert (rec["owners_without_site"] == []) == (kind == "all-sites")
    else:
        assert rec["reason"] == expected
        assert rec["census"]["residual"] == {}


def test_sample_covers_both_zoos_and_outcomes():
    zoos = {z for z, *_ in SAMPLE}
    kinds = {(s, k) for _, _, s, k, _ in SAMPLE}
    assert len(SAMPLE) >= 30 and zoos == {"timm", "torchvision"}
    assert {("pass", "all-sites"), ("pass", "partial"), ("no-site", "no-additions"), ("no-site", "tokens-only"),
            ("no-site", "channels-last")} <= kinds


def test_census_attributes_additions_to_their_module():
    import timm
    import torch

    model = timm.create_model("resnet18", pretrained=False).eval()
    census = sweep.addition_census(model, torch.randn(2, 3, 64, 64))
    assert census == {
        "residual": {f"layer{i}.{j}": 1 for i in range(1, 5) for j in range(2)},
        "channels_last": 0,
        "other_4d": 0,
        "tokens": 0,
        "other": 0,
    }


def _toy_hybrid():
    """A 64×64 image → 4×4 patches of 32 channels; one Swin-style block on the (N, 4, 4, 32)
    channels-last map, then one attention block on the 16 tokens with 16 heads, whose logits
    plus a relative-position bias are (N, 16, 16, 16): 4-D, with dims 1-2 that look like a
    16×16 grid. Only the block's input (3-D tokens) tells them from a map."""
    import torch
    from torch import nn

    class ChannelsLastBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):  # (N, H, W, C)
            return x + self.fc(x)

    class TokenAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qk = nn.Linear(32, 2 * 16 * 2)
            self.rel = nn.Parameter(torch.randn(16, 16, 16))

        def forward(self, t):  # (N, L, C)
            q, k = self.qk(t).reshape(t.shape[0], 16, 2, 16, 2).unbind(2)  # (N, L, heads, d)
            logits = torch.einsum("nlhd,nmhd->nhlm", q, k) + self.rel.expand(t.shape[0], -1, -1, -1)
            return t + logits.softmax(-1).mean(1) @ t

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 16, 16)
            self.block = ChannelsLastBlock()
            self.attn = TokenAttention()

        def forward(self, x):
            x = self.block(self.embed(x).permute(0, 2, 3, 1))
            return self.attn(x.flatten(1, 2))

    return Toy()


def test_census_tells_channels_last_maps_from_attention_logits():
    import torch

    census = sweep.addition_census(_toy_hybrid(), torch.randn(2, 3, 64, 64))
    assert census == {"residual": {}, "channels_last": 1, "other_4d": 1, "tokens": 1, "other": 0}
    assert sweep.no_site_kind(census) == "channels-last"
    assert sweep.no_site_kind({**census, "channels_last": 0}) == "tokens-only"


#: (timm model, channels_last, other_4d, tokens), hand-counted from timm's code at 64×64.
CENSUS = [
    # 12 SwinTransformerBlocks (depths 2, 2, 6, 2): x + attn on (N, H, W, C), then x + mlp on (N, L, C)
    ("swin_tiny_patch4_window7_224", 12, 0, 12),
    # 12 blocks: rotary embedding added to q and k, (N, heads, L, d); two token residuals each
    ("eva02_tiny_patch14_224", 0, 24, 24),
    # NesT: 12 TransformerLayers (depths 2, 2, 8), both residuals on (N, blocks, tokens, C); at 64×64
    # the first level's (2, 16, 16, 96) looks like a 16×16 grid, the others (2, 4, 16, 192) do not
    ("nest_tiny", 0, 24, 0),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, channels_last, other_4d, tokens", CENSUS, ids=[c[0] for c in CENSUS])
def test_census_counts_channels_last_residuals(name, channels_last, other_4d, tokens):
    model, kwargs, size, _ = sweep.build_and_probe("timm", name)
    assert kwargs == {"img_size": 64}
    census = sweep.addition_census(model, sweep._example(size))
    assert census["residual"] == {}
    assert (census["channels_last"], census["other_4d"], census["tokens"]) == (channels_last, other_4d, tokens)


def test_max_difference_is_relative_and_catches_misplaced_nans():
    import torch

    y = torch.tensor([[100.0, -2.0]])
    assert sweep.max_difference(y, y.clone()) == 0.0
    assert sweep.max_difference(y, y + torch.tensor([[0.5, 0.0]])) == pytest.approx(0.005)
    assert sweep.max_difference(torch.tensor([0.5]), torch.tensor([0.25])) == 0.25
    assert sweep.max_difference(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
    assert sweep.max_difference((y,), (y, y)) == float("inf")


def test_dense_kwargs_keep_every_box():
    assert sweep.dense_kwargs("fasterrcnn_resnet50_fpn") == {"box_score_thresh": 0.0}
    assert sweep.dense_kwargs("retinanet_resnet50_fpn") == {"score_thresh": 0.0}
    assert sweep.dense_kwargs("ssdlite320_mobilenet_v3_large") == {"score_thresh": 0.0}
    assert sweep.dense_kwargs("deeplabv3_resnet50") == {"aux_loss": True}
    assert sweep.dense_kwargs("lraspp_mobilenet_v3_large") == {}
    assert len(sweep.list_dense_models()) == 18


#: (torchvision builder, sites, outputs compared, boxes over the two probe images). MobileNetV3-Large
#: has 10 inverted residuals with a shortcut (stride 1, same width: 1 + 1 + 2 + 3 + 1 + 2 over its
#: six widths 16, 24, 40, 80, 112, 160), all in the backbone; the detector returns its
#: detections_per_img = 100 boxes per image at box_score_thresh=0.0.
DENSE = [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 10, ["boxes", "labels", "scores"], 200),
    ("deeplabv3_mobilenet_v3_large", 10, ["out", "aux"], None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, sites, outputs, boxes", DENSE, ids=[d[0] for d in DENSE])
def test_dense_model_keeps_its_outputs(name, sites, outputs, boxes, tmp_path):
    rec = sweep.check_dense_model(name, tmp_path)
    assert (rec["status"], rec["kind"]) == ("pass", "all-equal"), rec.get("reason")
    assert rec["sites"] == sites and rec["sites_by_part"] == {"backbone": sites} and rec["head_sites"] == []
    assert rec["outputs"] == outputs and rec.get("detections") == boxes
    assert rec["eval_diff"] == 0.0 and rec["pickle_diff"] == 0.0 and rec["reload_diff"] == 0.0
    assert rec["pickle_gates_called"] == sites


@pytest.mark.slow
def test_dense_model_without_residuals_is_refused(tmp_path):
    # SSD300's VGG-16 (torchvision detection/ssd.py, SSDFeatureExtractorVGG) adds nothing
    rec = sweep.check_dense_model("ssd300_vgg16", tmp_path)
    assert (rec["status"], rec["resized_to"], rec["detections"]) == ("no-site", 300, 400)
    assert rec["reason"].startswith("no residual site found in SSD")
    assert rec["backbone_census"] == {"residual": {}, "channels_last": 0, "other_4d": 0, "tokens": 0, "other": 0}
