"""Issue 3, acceptance 1-4 and 6: placements, ECA-paper variants, site selection, --replace-existing."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.errors import RetrofitError


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet50():
    return timm.create_model("resnet50").eval()


#: The probe's size where it changes no assertion (channels, parameters, owners, stages): a 64-px probe of
#: ResNet-50 costs a quarter of the default 224 px (test_sites_command_lists_without_changing probes at 224).
PROBE = (3, 64, 64)


# SE r=16 on timm resnet50. standard/post/identity gate C of the addition (256…2048);
# pre gates the unit's input (64 at layer1.0, then 256/512/1024 at the first unit of each stage).
SE_PARAMS = {"standard": 28_088_024, "post": 28_088_024, "identity": 28_088_024, "pre": 27_562_656}  # pre: C=64 at layer1.0 gets 8 hidden units (timm rounding), not 4


@pytest.mark.parametrize("placement", sorted(SE_PARAMS))
def test_se_placements_exact_params_and_identity_outputs(resnet50, placement):
    model, sites = retrofit.add_attention(copy.deepcopy(resnet50), "se", reduction=16, placement=placement,
                                          input_size=PROBE)
    assert len(sites) == 16
    assert _count(model) == SE_PARAMS[placement]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - resnet50(x)).abs().max().item() <= 1e-5
    if placement == "pre":
        assert [s.channels for s in sites[:2]] == [64, 256]


@pytest.mark.parametrize("placement", ["pre", "post", "identity"])  # standard (fused): tests/test_fused_gate.py
def test_paper_init_placements_change_outputs_and_train(resnet50, placement):
    model, _ = retrofit.add_attention(copy.deepcopy(resnet50), "eca", placement=placement, init="paper",
                                      input_size=PROBE)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model(x).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".eca." in n]
    assert len(grads) == 16 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_eca_adaptive_adds_86_and_release_kernels_add_80(resnet50):
    model, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", input_size=PROBE)
    assert _count(model) - 25_557_032 == 86
    assert [s.options["kernel_size"] for s in sites] == [5] * 13 + [7] * 3
    model, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", kernel_size=[3, 5, 5, 7], input_size=PROBE)
    assert _count(model) - 25_557_032 == 80
    assert retrofit.eca_kernel_size(128) == 5
    assert [retrofit.eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]


def test_kernel_list_must_match_stage_count(resnet50):
    with pytest.raises(RetrofitError, match="3 kernel sizes given for 4 stage"):
        retrofit.add_attention(copy.deepcopy(resnet50), "eca", kernel_size=[3, 5, 7], input_size=PROBE)


def test_stages_refused_when_the_probe_collapses_maps_to_one_pixel(resnet50):
    # at 8×8 layer2…layer4 are all 1×1: their strides (8, 16, 32) cannot be told apart
    for kwargs in ({"stages": [4]}, {"kernel_size": [3, 5, 5, 7]}):
        with pytest.raises(RetrofitError, match="shrink to 1 pixel"):
            retrofit.add_attention(copy.deepcopy(resnet50), "eca", input_size=(3, 8, 8), **kwargs)
    model, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", input_size=(3, 8, 8))  # stages unused
    assert len(sites) == 16
    model, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", input_size=(3, 64, 64), stages=[4])
    assert [s.site.stage for s in sites] == [4, 4, 4]


def test_stage_numbers_follow_timm_feature_info_else_the_stride():
    import torchvision

    from retrofit.graph import find_sites

    convnext = timm.create_model("convnext_atto").eval()  # feature_info: stages.0 … stages.3 at stride 4 … 32
    sites, _ = find_sites(convnext)
    assert {(s.owner.split(".")[1], s.stage) for s in sites} == {("0", 0), ("1", 1), ("2", 2), ("3", 3)}
    _, chosen = retrofit.add_attention(convnext, "eca", stages=[3])
    assert [s.owner for s in chosen] == ["stages.3.blocks.0", "stages.3.blocks.1"]
    sites, _ = find_sites(torchvision.models.resnet18().eval())  # no feature_info: stride 4 → 1 … 32 → 4
    assert [(s.owner, s.stage) for s in sites][::2] == [("layer1.0", 1), ("layer2.0", 2), ("layer3.0", 3), ("layer4.0", 4)]


def test_variant_parameter_counts_and_backward(resnet50):
    sum_c = 3 * 256 + 4 * 512 + 6 * 1024 + 3 * 2048
    sum_c2 = 3 * 256**2 + 4 * 512**2 + 6 * 1024**2 + 3 * 2048**2
    expected = {"se-var1": 0, "se-var2": sum_c, "se-var3": sum_c2, "se-gc": sum_c2 // 16}
    x = torch.randn(2, 3, 64, 64)
    for block, added in expected.items():
        init = "paper" if block == "se-var1" else "identity"
        model, sites = retrofit.add_attention(copy.deepcopy(resnet50), block, init=init, input_size=PROBE)
        assert _count(model) - 25_557_032 == added, block
        model.train()
        out = model(x)
        out.sum().backward()
        assert out.shape == (2, 1000)
    assert sum_c == 15_104 and sum_c2 == 20_119_552  # SE-Var3's FC has no bias: Σ C², not Σ C² + Σ C


def test_se_var1_cannot_start_as_identity(resnet50):
    with pytest.raises(RetrofitError, match="cannot start as an identity gate"):
        retrofit.add_attention(copy.deepcopy(resnet50), "se-var1", input_size=PROBE)


def test_se_gc_groups_divide_each_sites_channels(resnet50):
    model, sites = retrofit.add_attention(copy.deepcopy(resnet50), "se-gc", groups=64, input_size=PROBE)
    assert _count(model) - 25_557_032 == 20_119_552 // 64
    assert sites[0].options == {"groups": 64}
    _, sites = retrofit.add_attention(copy.deepcopy(resnet50), "se-gc", groups=3, input_size=PROBE)
    assert {s.options["groups"] for s in sites} == {2}  # every C is a power of two: 2 is the largest divisor ≤ 3


def test_include_layer4_gives_three_sites(resnet50):
    _, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", include=["layer4.*"], input_size=PROBE)
    assert [s.owner for s in sites] == ["layer4.0", "layer4.1", "layer4.2"]
    _, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", include=[r"re:layer[34]\.0"], input_size=PROBE)
    assert [s.owner for s in sites] == ["layer3.0", "layer4.0"]
    _, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", exclude=["layer1.*", "layer2.*"], stages=[4],
                                      input_size=PROBE)
    assert [s.owner for s in sites] == ["layer4.0", "layer4.1", "layer4.2"]
    _, sites = retrofit.add_attention(copy.deepcopy(resnet50), "eca", stages=[3, 4], input_size=PROBE)
    assert len(sites) == 9


def test_include_matching_nothing_fails_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(app, ["add-eca", "resnet50", "--no-pretrained", "--include", "nomatch*", "-o", str(out)])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'nomatch*' matches no site" in lines[0]
    assert not out.exists()


def test_add_command_with_variant_and_placement(tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(
        app,
        ["add", "se-var2", "resnet18", "--no-pretrained", "--placement", "post", "--include", "layer4.*",
         "-o", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["owner"] for s in report["sites"]] == ["layer4.0", "layer4.1"]
    assert report["params_after"] - report["params_before"] == 2 * 512
    recipe = retrofit.read_recipe(out)
    assert recipe.placement == "post" and recipe.block == "se-var2"
    loaded = retrofit.load_checkpoint(out)
    assert _count(loaded) == report["params_after"]


def test_sites_command_lists_without_changing(tmp_path):
    result = CliRunner().invoke(app, ["sites", "resnet50", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["sites"]
    assert len(rows) == 16
    assert rows[0] == {"owner": "layer1.0", "index": 0, "channels": 256, "in_channels": 64, "height": 56,
                       "width": 56, "stage": 1, "shortcut": "projection"}
    assert rows[-1]["shortcut"] == "identity" and rows[-1]["stage"] == 4
    assert json.loads(result.output)["untraced"] == []
    assert json.loads(result.output)["stages_measurable"] is True
    tiny = CliRunner().invoke(app, ["sites", "resnet50", "--json", "--input-size", "3,8,8"])
    assert json.loads(tiny.output)["stages_measurable"] is False


def test_replace_existing_on_mobilenetv3_swaps_se_for_eca(tmp_path):
    out = tmp_path / "mv3.safetensors"
    result = CliRunner().invoke(
        app, ["add-eca", "mobilenetv3_large_100", "--no-pretrained", "--replace-existing", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["replaced"]) == 8 and report["sites"] == []
    assert {r["was"] for r in report["replaced"]} == {"SqueezeExcite"}
    assert report["params_before"] == 5_483_032
    assert report["params_after"] == 5_483_032 - sum(r["params_before"] - r["params_after"] for r in report["replaced"])
    model = retrofit.load_checkpoint(out)
    assert type(model.blocks[2][0].se).__name__ == "EfficientChannelAttention"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_replace_existing_takes_no_placement():
    model = timm.create_model("mobilenetv3_small_050")
    with pytest.raises(RetrofitError, match="it takes no --placement"):
        retrofit.add_attention(model, "eca", replace_existing=True, placement="post")


def test_replace_existing_without_se_is_an_error():
    with pytest.raises(RetrofitError, match="no squeeze-and-excitation module"):
        retrofit.add_attention(timm.create_model("resnet18"), "eca", replace_existing=True)


def test_se_hidden_width_follows_timm_semodule_and_paper_on_request():
    from timm.layers import SEModule

    from retrofit.blocks import SqueezeExcite

    # timm's own SEModule (rd_ratio 1/16, divisor 8) is the reference, for every C up to 2048
    assert all(
        SqueezeExcite.resolve(c, reduction=16)["rd_channels"] == SEModule(c).fc1.out_channels for c in range(1, 2049)
    )
    assert SqueezeExcite.resolve(24, reduction=16)["rd_channels"] == 8  # not a single, easily dead unit
    assert SqueezeExcite.resolve(24, reduction=16, rd_divisor=1)["rd_channels"] == 1  # the paper's C // r
    model = timm.create_model("resnet18")
    _, sites = retrofit.add_attention(model, "se", rd_divisor=1, input_size=(3, 64, 64))
    assert [s.options["rd_channels"] for s in sites] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert sum(s.params for s in sites) == 89_080  # Σ 2·C·(C//16) + C//16 + C over C = 64, 64, 128, …, 512


def test_se_gc_takes_the_largest_divisor_of_each_sites_channels():
    from retrofit.blocks import SEGroupConv

    model = timm.create_model("mobilenetv2_035")
    _, sites = retrofit.add_attention(model, "se-gc", input_size=(3, 64, 64))
    by_c = {s.channels: s.options["groups"] for s in sites}
    assert by_c == {8: 8, 16: 16, 24: 12, 32: 16, 56: 14}  # 24 and 56 are no multiples of 16
    assert all(s.params == s.channels**2 // s.options["groups"] for s in sites)  # C²/G each
    assert SEGroupConv.resolve(7, groups=16) == {"groups": 7}
    with pytest.raises(retrofit.RetrofitError, match="C=1 has no divisor between 2 and 16"):
        SEGroupConv.resolve(1, groups=16)
