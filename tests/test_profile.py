"""Issue 4: ``retrofit.profile`` and ``retrofit report params-flops`` count what the field counts.

Reference numbers: torchvision's ResNet50 weights metadata (``_ops`` = 4.089 GMACs of conv +
linear, ``num_params`` = 25,557,032), timm's tf_efficientnet_lite0 (4.65 M params, 0.4 GMACs),
and the small cases of the public FLOP-counter reports (fvcore / ptflops / torch issues).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import retrofit
from retrofit.blocks import SqueezeExcite
from retrofit.cli import app
from retrofit.errors import RetrofitError
from retrofit import profile

RESNET50_PARAMS = 25_557_032
RESNET50_MACS = 4_089_184_256  # conv 4,087,136,256 + fc 2,048,000
SE_R16_PARAMS = 28_088_024

runner = CliRunner()


def _within(value: float, reference: float, tolerance: float) -> bool:
    return abs(value - reference) <= tolerance * reference


# --- acceptance 1 and 2: published totals -------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "torchvision:resnet50"])
def test_resnet50_matches_published_params_and_macs(name):
    model, _, _ = retrofit.load_model(name, pretrained=False)
    p = profile(model)
    assert p.params == RESNET50_PARAMS
    assert p.trainable_params == RESNET50_PARAMS
    assert _within(p.macs, 4.089e9, 0.001)
    assert p.macs == RESNET50_MACS
    assert p.macs_by_op == {"convolution": 4_087_136_256, "addmm": 2_048_000}
    assert p.flops == 2 * p.macs
    assert p.uncounted_ops == {}


def test_lite0_counts_the_convolutions_inside_conv2dsame():
    model, _, _ = retrofit.load_model("tf_efficientnet_lite0", pretrained=False)
    p = profile(model)
    assert p.params == 4_652_008
    assert _within(p.macs, 0.385e9, 0.005)
    assert p.macs == 385_187_552
    same = [row for row in p.modules if row.type == "Conv2dSame"]
    assert len(same) == 5  # stem and the four stride-2 depthwise convs pad with F.pad, then F.conv2d
    assert p.module("conv_stem").macs == 112 * 112 * 32 * 3 * 3 * 3
    assert all(row.macs > 0 for row in same)
    assert p.element_ops_by_op["hardtanh"] > 0  # ReLU6


# --- acceptance 4: small exact cases --------------------------------------------------------


class _TwiceLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(self.fc(x))


class _MatMul(nn.Module):
    def forward(self, x):  # (1, 1, 100) @ (1, 100, 1)
        return x @ x.transpose(1, 2)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Sequential(conv, nn.ReLU())
        self.b = nn.Sequential(conv, nn.ReLU())

    def forward(self, x):
        return self.b(self.a(x))


def test_conv1x1_macs():
    assert profile(nn.Conv2d(128, 128, 1), (128, 16, 16)).macs == 4_194_304


def test_linear_used_twice_counts_macs_twice_and_params_once():
    p = profile(_TwiceLinear(), (10,))
    assert (p.macs, p.params) == (200, 110)
    assert p.module("fc").macs == 200


def test_transposed_conv_macs():
    assert profile(nn.ConvTranspose2d(32, 1, 3), (32, 1, 1)).macs == 288


def test_batched_matmul_macs():
    p = profile(_MatMul(), (1, 100))
    assert p.macs == 100
    assert p.macs_by_op == {"bmm": 100}


def test_grouped_depthwise_and_1d_conv_macs():
    assert profile(nn.Conv2d(64, 64, 3, padding=1, groups=64), (64, 8, 8)).macs == 64 * 9 * 64
    assert profile(nn.Conv2d(64, 128, 3, padding=1, groups=4), (64, 8, 8)).macs == 128 * 16 * 9 * 64
    assert profile(nn.Conv1d(1, 1, 5, padding=2, bias=False), (1, 256)).macs == 256 * 5


def test_shared_module_params_count_once():
    p = profile(_Shared(), (4, 8, 8))
    assert p.params == 4 * 4 * 9 + 4
    assert p.macs == 2 * 64 * 4 * 4 * 9


def test_resnet18_counts_the_same_inside_inference_mode():
    model, _, _ = retrofit.load_model("torchvision:resnet18", pretrained=False)
    outside = profile(model)
    with torch.inference_mode():
        inside = profile(model)
    with torch.no_grad():
        no_grad = profile(model)
    assert outside.macs == inside.macs == no_grad.macs == 1_814_073_344
    assert outside.element_ops == inside.element_ops == no_grad.element_ops == 9_859_584
    assert outside.element_ops_by_op == inside.element_ops_by_op
    assert [(m.name, m.macs, m.element_ops) for m in outside.modules] == [
        (m.name, m.macs, m.element_ops) for m in inside.modules
    ]


# --- element operations ------------------------------------------------------------------


def test_se_block_element_ops_follow_the_rules():
    # C=8, r=4 on 8×4×4: squeeze 128 (mean), relu 2, sigmoid 8, ×2 gate 8, x * gate 128.
    p = profile(SqueezeExcite(8, 2, init="identity"), (8, 4, 4))
    assert p.element_ops_by_op == {"mean": 128, "relu": 2, "sigmoid": 8, "mul": 8 + 128}
    assert p.element_ops == 274
    assert p.macs == 8 * 2 + 2 * 8  # fc1 and fc2, 1×1 convs on a 1×1 map


def test_pooling_and_batch_norm_element_ops():
    pool = profile(nn.MaxPool2d(3, 2, 1), (1, 8, 8))
    assert pool.element_ops_by_op == {"max_pool2d": 4 * 4 * 9}
    bn = profile(nn.BatchNorm2d(4), (4, 2, 2))
    assert bn.element_ops_by_op == {"batch_norm": 16 * 2}
    plain = profile(nn.BatchNorm2d(4, affine=False), (4, 2, 2))
    assert plain.element_ops_by_op == {"batch_norm": 16}
    ln = profile(nn.LayerNorm(6), (3, 6))
    assert ln.element_ops_by_op == {"layer_norm": 18 * 5}


def test_ops_without_a_rule_are_listed_not_dropped():
    class Soft(nn.Module):
        def forward(self, x):
            return x.softmax(1).log_softmax(1)

    p = profile(Soft(), (2, 4, 4))
    assert p.uncounted_ops == {"_softmax": 1, "_log_softmax": 1}
    assert (p.macs, p.element_ops) == (0, 0)


# --- the model is not changed ---------------------------------------------------------------


def test_profile_restores_modes_and_leaves_batch_norm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    model[3].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, (3, 8, 8), batch_size=2)
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.is_grad_enabled()


def test_batch_size_scales_macs_not_params():
    one, four = profile(nn.Conv2d(3, 8, 3), (3, 10, 10)), profile(nn.Conv2d(3, 8, 3), (3, 10, 10), batch_size=4)
    assert four.macs == 4 * one.macs == 4 * 64 * 8 * 27
    assert four.params == one.params == 8 * 27 + 8


def test_bad_sizes_raise_one_line_errors():
    with pytest.raises(RetrofitError, match="positive integers"):
        profile(nn.Conv2d(3, 8, 3), (3, 0, 10))
    with pytest.raises(RetrofitError, match="batch size"):
        profile(nn.Conv2d(3, 8, 3), (3, 10, 10), batch_size=0)
    with pytest.raises(RetrofitError, match=r"forward pass on an input of shape \(1, 4, 10, 10\) failed"):
        profile(nn.Conv2d(3, 8, 3), (4, 10, 10))
    with pytest.raises(RetrofitError, match=r"cannot allocate an input of 1000000×3×224×224 .*smaller --batch-size"):
        profile(nn.Conv2d(3, 8, 3), (3, 224, 224), batch_size=1_000_000)  # 602 GB


def test_latency_is_a_median_of_20_runs_naming_device_and_threads():
    p = profile(nn.Conv2d(3, 8, 3), (3, 16, 16), latency=True)
    lat = p.latency
    assert (lat.runs, lat.warmup, lat.device, lat.threads, lat.batch_size) == (20, 5, "cpu", torch.get_num_threads(), 1)
    assert 0 < lat.min_ms <= lat.p25_ms <= lat.median_ms <= lat.p75_ms
    assert lat.spread_ms == lat.p75_ms - lat.p25_ms
    with pytest.raises(RetrofitError, match="at least 20"):
        profile(nn.Conv2d(3, 8, 3), (3, 16, 16), latency=True, runs=5)


def test_latency_delta_inside_the_run_spread_is_called_no_difference():
    import dataclasses

    from retrofit.cli.report import _latency_spread
    from retrofit.profiling.latency import Latency
    from retrofit.profiling.report import TargetReport

    counted = profile(nn.Conv2d(3, 8, 3), (3, 16, 16))

    def report(base_ms, model_ms):
        lat = lambda q1, m, q3: Latency(m, q1, q1, q3, 20, 5, "cpu", 1, 1)  # noqa: E731
        timed = lambda ms: dataclasses.replace(counted, latency=lat(*ms))  # noqa: E731
        return TargetReport("x.safetensors", "checkpoint", "x", timed(model_ms), timed(base_ms))

    noisy = report((9.0, 10.0, 11.0), (9.5, 10.5, 11.5))  # Δ 0.5 ms, spread 2 ms
    assert noisy.latency_delta_measured() is False and noisy.to_dict()["latency_delta_measured"] is False
    text = _latency_spread(noisy.to_dict())
    assert text.startswith("latency spread (p25–p75 of the runs): base 9.00–11.00 ms, retrofitted 9.50–11.50 ms")
    assert "no difference was measured" in text
    clear = report((9.9, 10.0, 10.1), (10.9, 11.0, 11.1))  # Δ 1 ms, spread 0.2 ms
    assert clear.latency_delta_measured() is True and "no difference" not in _latency_spread(clear.to_dict())
    assert clear.to_dict()["model"]["latency"]["spread_ms"] == pytest.approx(0.2)
    untimed = TargetReport("x.safetensors", "checkpoint", "x", counted, counted)
    assert untimed.latency_delta_measured() is None and _latency_spread(untimed.to_dict()) is None


# --- acceptance 3 and 5: a checkpoint through the CLI ------------------------------------


@pytest.fixture(scope="module")
def se_checkpoint(tmp_path_factory):
    model, _, _ = retrofit.load_model("resnet50", pretrained=False)
    model, sites = retrofit.add_attention(model, "se", reduction=16, init="identity")
    assert len(sites) == 16
    return retrofit.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "resnet50-se.safetensors")


def test_json_report_of_se_checkpoint_shows_base_retrofitted_and_sites(se_checkpoint):
    result = runner.invoke(app, ["report", "params-flops", str(se_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"schema", "target", "kind", "name", "input_size", "batch_size", "model", "base", "delta",
                         "delta_percent", "latency_delta_measured", "uncounted_ops"}
    assert data["uncounted_ops"] == {}
    assert data["latency_delta_measured"] is None  # not timed
    assert (data["schema"], data["kind"], data["name"]) == ("retrofit.params-flops/1", "checkpoint", "resnet50")
    assert set(data["model"]) == {"input_size", "batch_size", "params", "trainable_params", "macs", "flops",
                                  "fvcore_macs", "element_ops", "macs_by_op", "element_ops_by_op", "uncounted_ops",
                                  "sites", "latency"}
    # fvcore-style: + batch norms (2 per element in eval); the SE blocks add MACs only
    base = data["base"]
    assert base["fvcore_macs"] == RESNET50_MACS + base["element_ops_by_op"]["batch_norm"]
    assert data["delta"]["fvcore_macs"] == data["delta"]["macs"] == 2_514_944
    assert data["base"]["params"] == RESNET50_PARAMS
    assert data["base"]["macs"] == RESNET50_MACS
    assert data["model"]["params"] == SE_R16_PARAMS
    assert data["delta"]["params"] == 2_530_992
    assert data["delta_percent"]["params"] == pytest.approx(100 * 2_530_992 / RESNET50_PARAMS)
    assert data["delta"]["latency_ms"] is None
    sites = data["model"]["sites"]
    assert len(sites) == 16
    assert sum(s["params"] for s in sites) == data["delta"]["params"]
    assert sum(s["macs"] for s in sites) == data["delta"]["macs"] == 2_514_944
    assert sum(s["element_ops"] for s in sites) == data["delta"]["element_ops"] == 11_069_872
    first = sites[0]
    assert (first["key"], first["channels"], first["height"], first["width"]) == ("layer1.0.se", 256, 56, 56)
    assert (first["params"], first["macs"], first["flops"]) == (8_464, 8_192, 16_384)
    # squeeze 256·56·56, relu 16, sigmoid 256, ×2 gate 256 + scale 256·56·56
    assert first["element_ops_by_op"] == {"mean": 802_816, "relu": 16, "sigmoid": 256, "mul": 803_072}
    assert all(s["element_ops"] > 0 and s["element_ops_by_op"]["sigmoid"] == s["channels"] for s in sites)


def test_markdown_report_pastes_as_a_readme_table(se_checkpoint):
    # 112×112 keeps the test fast; the site rows show the maps the blocks gate at that size.
    result = runner.invoke(app, ["report", "params-flops", str(se_checkpoint), "--markdown", "--per-site",
                                 "--input-size", "3,112,112"])
    assert result.exit_code == 0, result.output
    tables = result.stdout.strip().split("\n\n")
    assert len(tables) == 2
    for table in tables:
        lines = table.splitlines()
        assert all(line.startswith("| ") and line.endswith(" |") for i, line in enumerate(lines) if i != 1)
        assert re.fullmatch(r"\|:---(\|---:)+\|", lines[1])
        assert len({line.count("|") for line in lines}) == 1  # every row has the header's columns
    totals = tables[0].splitlines()
    assert totals[0].endswith("· base resnet50 · input 1×3×112×112 | base | retrofitted | Δ | Δ % |")
    assert totals[2] == "| params | 25,557,032 | 28,088,024 | +2,530,992 | +9.90% |"
    assert totals[4] == "| MACs | 1.078 G | 1.080 G | +2.515 M | +0.23% |"
    sites = tables[1].splitlines()
    assert sites[2] == "| layer1.0.se | se r=16 (16) | 256×28×28 | 8,464 | 8.192 K | 401.936 K |"
    assert sites[-1] == "| all 16 sites |  |  | 2,530,992 | 2.515 M | 2.837 M |"


def test_csv_report_of_a_model_name_has_exact_integers():
    result = runner.invoke(app, ["report", "params-flops", "torchvision:resnet18", "--no-pretrained", "--csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:4] == [
        "metric,value", "params,11689512", "trainable_params,11689512", "macs,1814073344"]


def test_table_report_names_latency_device_and_threads():
    result = runner.invoke(app, ["report", "params-flops", "torchvision:resnet18", "--no-pretrained", "--latency",
                                 "--input-size", "3,32,32"])
    assert result.exit_code == 0, result.output
    assert "resnet18 · input 1×3×32×32" in result.stdout
    assert "11,689,512" in result.stdout
    n = torch.get_num_threads()
    assert f"latency: median of 20 runs after 5 warm-up, cpu, {n} thread{'s' if n != 1 else ''}" in result.stdout


def test_no_pretrained_with_a_checkpoint_is_refused(se_checkpoint):
    result = runner.invoke(app, ["report", "params-flops", str(se_checkpoint), "--no-pretrained"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: --no-pretrained applies to a model name; {se_checkpoint} is a checkpoint, "
                                     "which holds its own weights")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resnet18", "--no-pretrained", "--input-size", "3,x"], "--input-size must be integers"),
        (["resnet18", "--no-pretrained", "--per-site"], "--per-site needs a retrofit checkpoint"),
        (["resnet18", "--json", "--csv"], "choose one of --json, --markdown, --csv"),
        (["missing.safetensors"], "checkpoint not found: missing.safetensors"),
        (["torchvision:resnet18", "--no-pretrained", "--input-size", "4,64,64"], "forward pass on an input"),
        (["resnet18", "--no-pretrained", "--input-size", "3,5000,5000"], "too large (at most 64 channels and 4096×4096)"),
        (["resnet18", "--no-pretrained", "--input-size", "3,224"], "--input-size takes three positive integers C,H,W"),
        (["resnet18", "--no-pretrained", "--batch-size", str(10**23)], "cannot allocate an input of 1000"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, message):
    result = runner.invoke(app, ["report", "params-flops", *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


# --- issue 9: no weights needed; uncounted ops in every format ------------------------------


def test_report_of_a_model_name_needs_no_network_and_no_weights(monkeypatch):
    import socket

    import retrofit.models

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    def no_download(*args, **kwargs):
        raise AssertionError("report fetched weights")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(retrofit.models, "_load_pretrained", no_download)
    result = runner.invoke(app, ["report", "params-flops", "resnet18", "--csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1] == "params,11689512"


def test_googlenet_is_counted_as_its_pretrained_architecture():
    from torchvision.models import get_model_weights

    from retrofit.models import parse_name
    from retrofit.models import pretrained_architecture_kwargs

    meta = get_model_weights("googlenet").DEFAULT.meta  # num_params 6,624,904; _ops 1.498 GMACs
    counts = {}
    for flags in ([], ["--no-pretrained"]):
        result = runner.invoke(app, ["report", "params-flops", "torchvision:googlenet", "--json", *flags])
        assert result.exit_code == 0, result.output
        counts[bool(flags)] = json.loads(result.stdout)["model"]
    pretrained, random_init = counts[False], counts[True]
    assert pretrained["params"] == meta["num_params"] == 6_624_904  # torchvision drops the two aux classifiers
    assert random_init["params"] == 13_004_888  # built without weights, torchvision keeps them
    assert pretrained["macs"] == random_init["macs"] == 1_498_376_192  # aux heads do not run in eval
    assert round(pretrained["macs"] / 1e9, 3) == meta["_ops"]
    assert pretrained["element_ops"] > random_init["element_ops"]  # transform_input rescales the input
    assert pretrained_architecture_kwargs(parse_name("torchvision:vit_h_14")) == {"image_size": 518}
    assert pretrained_architecture_kwargs(parse_name("resnet50")) == {}


def test_every_format_says_which_ops_went_uncounted():
    args = ["report", "params-flops", "levit_128s", "--no-pretrained"]  # 11 softmax calls, no rule
    note = "ran without a counting rule (not in any total): _softmax ×11"
    as_csv = runner.invoke(app, [*args, "--csv"])
    assert as_csv.exit_code == 0, as_csv.output
    assert as_csv.stderr.strip() == f"warning: {note}"
    assert [row.split(",")[0] for row in as_csv.stdout.splitlines()] == [
        "metric", "params", "trainable_params", "macs", "flops", "fvcore_macs", "element_ops"]
    as_json = runner.invoke(app, [*args, "--json"])
    assert json.loads(as_json.stdout)["uncounted_ops"] == {"_softmax": 11}
    assert runner.invoke(app, [*args, "--markdown"]).stdout.strip().endswith(note)
    assert note in runner.invoke(app, args).stdout


def test_retrofit_profile_stays_the_function_whatever_was_imported_first():
    # A submodule named retrofit.profile would replace the lazily exported function once imported.
    code = ("import retrofit.profiling.report, retrofit.profiling.profile, retrofit.cli.report; import retrofit; "
            "from torch import nn; assert retrofit.profile(nn.Linear(3, 4), (3,)).macs == 12; "
            "from retrofit import profile, Profile; assert profile is retrofit.profile and Profile is retrofit.Profile")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from retrofit.cli import app; "
            "r = CliRunner().invoke(app, ['report', 'params-flops', '--help']); "
            "assert r.exit_code == 0 and 'Counting rules' in r.output, r.output; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_site_report_of_a_replace_existing_checkpoint_lists_the_swapped_blocks(tmp_path):
    out = tmp_path / "mv3.safetensors"
    added = CliRunner().invoke(app, ["add-eca", "mobilenetv3_small_050", "--no-pretrained", "--replace-existing",
                                     "-o", str(out), "--json"])
    assert added.exit_code == 0, added.output
    replaced = json.loads(added.output)["replaced"]
    result = CliRunner().invoke(app, ["report", "params-flops", str(out), "--per-site", "--json"])
    assert result.exit_code == 0, result.output
    sites = json.loads(result.output)["model"]["sites"]
    assert [s["key"] for s in sites] == [r["path"] for r in replaced] and len(sites) == 9
    assert [s["params"] for s in sites] == [r["params_after"] for r in replaced]
    first = sites[0]  # blocks.0.0.se gates 16 channels at stride 4 (56×56): timm stage 1
    assert (first["key"], first["owner"], first["channels"], first["height"], first["width"], first["stage"]) == (
        "blocks.0.0.se", "blocks.0.0", 16, 56, 56, 1)
    # ECA with k=3 on C=16: C·k MACs (one 1-D conv across channels per image).
    assert first["setting"] == "k=3" and first["macs"] == 16 * 3
    assert [s["stage"] for s in sites] == sorted(s["stage"] for s in sites)
    # the swapped SE modules' parameters are in the base: Δ = new blocks − replaced modules
    assert {s["replaced"] for s in sites} == {"SqueezeExcite"}
    assert [s["replaced_params"] for s in sites] == [r["params_before"] for r in replaced]
    delta = json.loads(result.output)["delta"]["params"]
    assert delta == sum(s["params"] for s in sites) - sum(s["replaced_params"] for s in sites) < 0
    table = CliRunner().invoke(app, ["report", "params-flops", str(out), "--per-site"])
    new, old = sum(s["params"] for s in sites), sum(s["replaced_params"] for s in sites)
    assert f"Δ params = {new:,} − {old:,} (the 9 SqueezeExcite modules they replaced)" in table.output
