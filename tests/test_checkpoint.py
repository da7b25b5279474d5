"""Issue 2, acceptance 5: exact round trip; truncated or edited files refused with one line."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

import retrofit
from retrofit.checkpoint import read_recipe
from retrofit.cli import app
from retrofit.errors import RetrofitError


@pytest.fixture(scope="module")
def se_checkpoint(tmp_path_factory):
    model, _, _ = retrofit.load_model("resnet18", pretrained=False)
    model, _ = retrofit.add_attention(model, "se", reduction=8, init="paper")
    path = tmp_path_factory.mktemp("ckpt") / "r18-se.safetensors"
    retrofit.save_checkpoint(model, path)
    return model, path


def test_round_trip_is_exact(se_checkpoint):
    model, path = se_checkpoint
    loaded = retrofit.load_checkpoint(path)
    assert type(loaded) is type(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_recipe_records_source_block_sites_and_versions(se_checkpoint):
    _, path = se_checkpoint
    recipe = read_recipe(path)
    assert recipe.source == {"model": "resnet18", "zoo": "timm", "kwargs": {}, "weights": "random"}
    assert (recipe.block, recipe.placement, recipe.init) == ("se", "standard", "paper")
    assert len(recipe.sites) == 8
    assert recipe.sites[0]["owner"] == "layer1.0"
    assert recipe.sites[0]["options"] == {"rd_channels": 8, "reduction": 8, "rd_divisor": 8}
    assert recipe.sites[0]["site"]["add_node"] == "iadd"  # the fx graph is recorded: reloads need no probe
    assert recipe.options == {"reduction": 8, "rd_divisor": 8}
    assert set(recipe.versions) == {"retrofit", "torch", "torchvision", "timm"}


def test_truncated_file_is_refused(se_checkpoint, tmp_path):
    _, path = se_checkpoint
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrofitError, match="truncated or damaged"):
        retrofit.load_checkpoint(cut)


def test_edited_tensor_bytes_are_refused(se_checkpoint, tmp_path):
    _, path = se_checkpoint
    edited = tmp_path / "edited.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a byte inside the last tensor's data
    edited.write_bytes(bytes(data))
    with pytest.raises(RetrofitError, match="modified after it was written"):
        retrofit.load_checkpoint(edited)


def test_cli_refuses_damaged_checkpoint_in_one_line(se_checkpoint, tmp_path, photos):
    _, path = se_checkpoint
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:1000])
    result = CliRunner().invoke(app, ["predict", str(cut), str(photos[0])])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output


def test_channels_last_model_saves(tmp_path):
    model, _, _ = retrofit.load_model("resnet18", pretrained=False)
    model, _ = retrofit.add_attention(model, "eca")
    model = model.to(memory_format=torch.channels_last)
    path = retrofit.save_checkpoint(model, tmp_path / "cl.safetensors")
    loaded = retrofit.load_checkpoint(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval()(x) - loaded(x)).abs().max().item() <= 1e-6


def test_save_does_not_leave_temporary_files(tmp_path):
    model, _, _ = retrofit.load_model("resnet18", pretrained=False)
    retrofit.save_checkpoint(model, tmp_path / "plain.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["plain.safetensors"]
    with pytest.raises(RetrofitError, match="exists"):
        retrofit.save_checkpoint(model, tmp_path / "plain.safetensors", overwrite=False)


@pytest.mark.parametrize(("zoo", "model", "message"), [
    ("timm", "nosuchmodel", "cannot build the checkpoint's model 'nosuchmodel' with this timm (the checkpoint was written with timm"),
    ("keras", "resnet18", "the checkpoint's recipe names model 'resnet18' of zoo 'keras'; retrofit builds timm and torchvision"),
])
def test_a_recipe_naming_a_model_this_install_cannot_build_is_one_line(tmp_path, zoo, model, message):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from retrofit.checkpoint import DIGEST_KEY, RECIPE_KEY, tensors_digest

    net, _, _ = retrofit.load_model("resnet18", pretrained=False)
    retrofit.add_attention(net, "eca")
    path = retrofit.save_checkpoint(net, tmp_path / "r18.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta[RECIPE_KEY])
    recipe["source"].update(zoo=zoo, model=model)
    recipe_json = json.dumps(recipe)
    save_file(tensors, str(path), metadata={RECIPE_KEY: recipe_json, DIGEST_KEY: tensors_digest(tensors, recipe_json)})
    with pytest.raises(RetrofitError, match="^" + re.escape(message)):
        retrofit.load_checkpoint(path)
    result = CliRunner().invoke(app, ["report", "params-flops", str(path)])
    assert result.exit_code == 2 and result.output.startswith("error: " + message), result.output
