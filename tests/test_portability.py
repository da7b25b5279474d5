"""A retrofitted model goes wherever a PyTorch model goes (issue 8): pickle, torch.save, deepcopy,
spawn, compile, export, ONNX, jit; every construction path saves and reloads as the same model."""

from __future__ import annotations

import copy
import io
import multiprocessing
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

import retrofit
from retrofit.blocks import ChannelGate
from retrofit.errors import RetrofitError
from retrofit.verify import training_settings

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _retrofitted(make, block="se"):
    base = make().eval()
    model = copy.deepcopy(base)
    retrofit.add_attention(model, block, init="paper", input_size=(3, 64, 64))
    return base, model.eval()


MAKERS = {
    # zero_init_last=False: timm zeroes each block's last BN by default, so every branch (and gate) would be 0
    "timm:resnet18": lambda: timm.create_model("resnet18", zero_init_last=False),
    "timm:mobilenetv2_035": lambda: timm.create_model("mobilenetv2_035"),
    "torchvision.models.resnet18()": lambda: torchvision.models.resnet18(),
}


def _round_trips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buffer, weights_only=False),
        "deepcopy": copy.deepcopy(model),
    }


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_pickle_and_torch_save_keep_every_gate(name):
    base, model = _retrofitted(MAKERS[name])
    with torch.no_grad():
        expected, original = model(X), base(X)
        assert (expected - original).abs().max().item() > 1e-3  # the gates do something
        for how, loaded in _round_trips(model).items():
            assert torch.equal(loaded(X), expected), how
            assert type(loaded) is type(base)
            gates = [m for m in loaded.modules() if isinstance(m, ChannelGate)]
            assert len(gates) == len([m for m in model.modules() if isinstance(m, ChannelGate)])


def test_unpickled_model_is_independent_and_trains():
    _, model = _retrofitted(MAKERS["timm:resnet18"], "eca")
    loaded = pickle.loads(pickle.dumps(model))
    loaded.train()
    loaded(X).sum().backward()
    gate = loaded.layer1[0].eca.conv.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.layer1[0].eca.conv.weight.grad is None
    # the unpickled owner's code is bound to the unpickled owner, not to the original
    assert loaded.layer1[0].forward.owner is loaded.layer1[0]


def _forward_in_child(model):
    with torch.no_grad():
        return model(X)


def test_spawned_process_runs_the_retrofitted_model():
    _, model = _retrofitted(MAKERS["timm:resnet18"])
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out = pool.apply(_forward_in_child, (model,))
    with torch.no_grad():
        assert torch.equal(out, model(X))


def test_compile_export_jit_and_onnx_keep_the_gates():
    _, model = _retrofitted(MAKERS["timm:resnet18"], "eca")
    with torch.no_grad():
        expected = model(X)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert (compiled(X) - expected).abs().max().item() <= 1e-6
        exported = torch.export.export(model, (X,))
        assert (exported.module()(X) - expected).abs().max().item() <= 1e-6
        traced = torch.jit.trace(model, (X,))
        assert (traced(X) - expected).abs().max().item() <= 1e-6
    onnx = pytest.importorskip("onnx")
    buffer = io.BytesIO()
    torch.onnx.export(model, (X,), buffer, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert sum(node.op_type == "Sigmoid" for node in graph.node) == 8  # one gate per BasicBlock


@pytest.mark.parametrize(
    "kwargs",
    [{"global_pool": "max"}, {"drop_path_rate": 0.2}, {"in_chans": 1}, {"drop_rate": 0.3}],
    ids=lambda k: next(iter(k)),
)
def test_timm_constructor_options_survive_a_checkpoint(kwargs, tmp_path):
    channels = kwargs.get("in_chans", 3)
    model = timm.create_model("resnet18", zero_init_last=False, **kwargs)
    retrofit.add_attention(model, "eca", init="paper", input_size=(channels, 64, 64))
    path = retrofit.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = retrofit.load_checkpoint(path)
    x = torch.randn(2, channels, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert training_settings(loaded) == training_settings(model)
    assert retrofit.read_recipe(path).source["kwargs"][next(iter(kwargs))] == next(iter(kwargs.values()))


def test_convnext_layer_scale_survives_a_checkpoint(tmp_path):
    model = timm.create_model("convnext_atto", ls_init_value=0.5)
    retrofit.add_attention(model, "eca", init="paper", input_size=(3, 64, 64))
    loaded = retrofit.load_checkpoint(retrofit.save_checkpoint(model, tmp_path / "m.safetensors"))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_an_option_the_recipe_cannot_record_is_refused_and_nothing_written(tmp_path):
    model = timm.create_model("resnet18", zero_init_last=False)
    model.fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 7))  # a head no constructor option makes
    with pytest.raises(RetrofitError, match="faithfully") as e:
        retrofit.save_checkpoint(model, tmp_path / "m.safetensors")
    assert "\n" not in str(e.value) and "retrofit.load_model('resnet18'" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    # a changed dropout rate alone (same keys, same eval outputs) is named too
    model = timm.create_model("resnet18")
    model.layer1[0].drop_path = timm.layers.DropPath(0.3)
    with pytest.raises(RetrofitError, match=r"layer1\.0\.drop_path\.drop_prob is 0\.3 here"):
        retrofit.save_checkpoint(model, tmp_path / "m.safetensors")


def test_verification_runs_once_per_recipe(tmp_path, monkeypatch):
    model, _, _ = retrofit.load_model("resnet18", pretrained=False)
    retrofit.add_attention(model, "eca", input_size=(3, 64, 64))
    calls = []
    import retrofit.checkpoint as checkpoint

    real = checkpoint.rebuild
    monkeypatch.setattr(checkpoint, "rebuild", lambda recipe: calls.append(1) or real(recipe))
    for epoch in range(3):
        retrofit.save_checkpoint(model, tmp_path / "last.safetensors", extra={"epoch": epoch})
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnety_002", "dpn68"])
def test_train_mode_model_keeps_every_buffer(name):
    model = timm.create_model(name)  # train mode, as timm returns it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, sites = retrofit.add_attention(model, "eca", input_size=(3, 64, 64))
    after = model.state_dict()
    assert sites and model.training
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_torchvision_builder_model_saves_and_reloads(tmp_path):
    base, model = _retrofitted(lambda: torchvision.models.resnet18(num_classes=10))
    path = retrofit.save_checkpoint(model, tmp_path / "m.safetensors")
    assert retrofit.read_recipe(path).source["model"] == "torchvision:resnet18"
    assert retrofit.read_recipe(path).source["kwargs"] == {"num_classes": 10}
    with torch.no_grad():
        assert torch.equal(retrofit.load_checkpoint(path)(X), model(X))


def test_timm_features_only_backbone_saves_and_reloads(tmp_path):
    model = timm.create_model("resnet18", features_only=True, out_indices=(2, 3), zero_init_last=False)
    _, sites = retrofit.add_attention(model, "eca", init="paper", input_size=(3, 64, 64))
    assert len(sites) == 6  # layer1…layer3: timm drops the stages after the last out_index
    loaded = retrofit.load_checkpoint(retrofit.save_checkpoint(model, tmp_path / "m.safetensors"))
    model.eval()
    with torch.no_grad():
        ours, theirs = model(X), loaded(X)
    assert [t.shape[1] for t in ours] == [128, 256]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_detector_backbone_gets_sites_and_round_trips(tmp_path):
    name = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    base, _, _ = retrofit.load_model(name, pretrained=False, box_score_thresh=0.0)
    model = copy.deepcopy(base)
    _, sites = retrofit.add_attention(model, "eca")
    assert len(sites) == 10 and all(s.owner.startswith("backbone.body.") for s in sites)
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        ours, theirs = model(images), base(images)
        assert len(ours[0]["boxes"]) > 0
        for a, b in zip(ours, theirs):  # identity init: the same detections
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["boxes"], b["boxes"])
        loaded = retrofit.load_checkpoint(retrofit.save_checkpoint(model, tmp_path / "det.safetensors"))
        for a, b in zip(loaded(images), ours):
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["boxes"], b["boxes"])


def test_add_eca_on_a_segmenter_segments_at_full_size(tmp_path):
    from typer.testing import CliRunner

    from retrofit.cli import app

    out = tmp_path / "seg.safetensors"
    result = CliRunner().invoke(
        app, ["add-eca", "torchvision:deeplabv3_mobilenet_v3_large", "--no-pretrained", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    model = retrofit.load_checkpoint(out)
    with torch.no_grad():
        mask = model(torch.rand(1, 3, 96, 96))["out"]
    assert mask.shape == (1, 21, 96, 96)


def test_weights_with_another_class_count_keep_it(tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from retrofit.cli import app

    source = timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval()
    save_file(source.state_dict(), tmp_path / "my_10_class.safetensors")
    out = tmp_path / "r18-eca.safetensors"
    result = CliRunner().invoke(
        app, ["add-eca", "resnet18", "--weights", str(tmp_path / "my_10_class.safetensors"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    model = retrofit.load_checkpoint(out)
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert torch.equal(model(X), source(X))


def test_hrnet_root_site_is_not_offered_and_every_forward_path_agrees():
    model = timm.create_model("hrnet_w18_small").eval()
    _, sites = retrofit.add_attention(model, "eca", init="paper", input_size=(3, 64, 64))
    assert "" not in {s.owner for s in sites}
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(X)), model(X))


class _ListUnit(nn.Module):
    """A residual unit handed a list of maps: its shortcut is one of them."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 1)

    def forward(self, maps):
        return self.mix(maps[1]) + maps[0]


class _ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.unit = _ListUnit()

    def forward(self, x):
        y = self.stem(x)
        return self.unit([y, x])


def test_pre_placement_on_a_list_input_is_refused_at_insertion():
    model = _ListNet()
    assert len(retrofit.find_sites(model, (3, 32, 32))[0]) == 1
    with pytest.raises(RetrofitError, match="placement 'pre' gates the residual unit's input, which at unit is not"):
        retrofit.add_attention(model, "eca", placement="pre", input_size=(3, 32, 32))
    assert not any(isinstance(m, ChannelGate) for m in model.modules())


def test_every_model_building_command_takes_num_classes(photos, tmp_path):
    import json

    from typer.testing import CliRunner

    from retrofit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["predict", "resnet18", str(photos[0]), "--no-pretrained", "--num-classes", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["predictions"][0]["classes"]) == [0, 1, 2]
    result = runner.invoke(app, ["sites", "resnet18", "--num-classes", "3", "--json"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)["sites"]) == 8
    out = tmp_path / "r18.safetensors"
    assert runner.invoke(app, ["add-se", "resnet18", "--no-pretrained", "--num-classes", "3", "-o", str(out)]).exit_code == 0
    assert retrofit.load_checkpoint(out).fc.out_features == 3
    result = runner.invoke(app, ["predict", str(out), str(photos[0]), "--num-classes", "3"])
    assert result.exit_code == 2 and "--num-classes applies to a model name" in result.output
    result = runner.invoke(app, ["report", "params-flops", "resnet18", "--num-classes", "10", "--json"])
    assert json.loads(result.stdout)["model"]["params"] == 11_689_512 - 990 * 513  # a 10-class fc: 513 per class
