"""Issue 20, part 1: adapter-only checkpoints — gates (and head) only, exact round trip, base digest enforced."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import retrofit
from retrofit.adapter import adapter_keys, is_adapter
from retrofit.cli import app
from retrofit.errors import RetrofitError

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A resnet18 + ECA (paper init, gates set to non-trivial values), its base weights file, a full checkpoint
    and an adapter of it."""
    folder = tmp_path_factory.mktemp("adapter")
    model, _, _ = retrofit.load_model("resnet18", pretrained=False)
    base = folder / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    model, _ = retrofit.add_attention(model, "eca", init="paper", input_size=(3, 64, 64))
    with torch.no_grad():
        for name in adapter_keys(model, head=False):
            model.get_parameter(name).copy_(torch.randn_like(model.get_parameter(name)))
    full = retrofit.save_checkpoint(model, folder / "r18-eca.safetensors")
    adapter = retrofit.save_adapter(model, folder / "r18-eca.adapter.safetensors")
    return model.eval(), base, full, adapter


def test_an_adapter_holds_the_gates_alone(r18):
    model, _, _, adapter = r18
    tensors = load_file(str(adapter))
    # ECA's adaptive kernel on resnet18: C = 64 → k 3 (2 sites), 128 / 256 / 512 → k 5 (6 sites)
    assert sorted(tensors) == sorted(f"layer{s}.{b}.eca.conv.weight" for s in (1, 2, 3, 4) for b in (0, 1))
    assert sum(t.numel() for t in tensors.values()) == 2 * 3 + 6 * 5 == 36
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in tensors.items())
    assert is_adapter(adapter) and not is_adapter(r18[2])
    assert 3_000 < adapter.stat().st_size < 12_000  # bytes: the recipe (sites with fx node names) dominates


@pytest.mark.parametrize("kind", ["file", "pth", "module", "state_dict", "checkpoint"])
def test_round_trip_is_exact_from_every_kind_of_base(r18, tmp_path, kind):
    model, base_file, _, adapter = r18
    if kind == "file":
        base = base_file
    elif kind == "pth":
        base = tmp_path / "r18.pth"
        torch.save({"state_dict": load_file(str(base_file))}, base)
    elif kind == "module":
        base, _, _ = retrofit.load_model("resnet18", weights=base_file)
    elif kind == "state_dict":
        base = load_file(str(base_file))
    else:  # a full retrofit checkpoint of the base
        net, _, _ = retrofit.load_model("resnet18", weights=base_file)
        base = retrofit.save_checkpoint(net, tmp_path / "base.safetensors")
    loaded = retrofit.load_checkpoint(adapter, base=base)
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))


def test_resnet50_eca_adapter_is_about_11_kilobytes(tmp_path):
    model, _, _ = retrofit.load_model("resnet50", pretrained=False)
    model, sites = retrofit.add_attention(model, "eca", input_size=(3, 64, 64))
    path = retrofit.save_adapter(model, tmp_path / "r50-eca.safetensors")
    tensors = load_file(str(path))
    assert len(tensors) == len(sites) == 16
    assert sum(t.numel() for t in tensors.values()) == sum(s.params for s in sites) == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7
    assert 9_000 < path.stat().st_size < 14_000  # vs ~100 MB for the full checkpoint


def test_a_base_with_other_weights_is_refused(r18):
    _, base_file, _, adapter = r18
    other = load_file(str(base_file))
    other["layer3.1.bn2.running_var"] = other["layer3.1.bn2.running_var"] * 1.001
    with pytest.raises(RetrofitError, match=r"^the given state dict is not the base this adapter was made from "
                                            r"\(digest of its weights [0-9a-f]{12}…, the adapter's base [0-9a-f]{12}…"):
        retrofit.load_checkpoint(adapter, base=other)
    # resnet34 holds every resnet18 key at the same shape: only the digest tells them apart
    r34, _, _ = retrofit.load_model("resnet34", pretrained=False)
    with pytest.raises(RetrofitError, match="^the given ResNet is not the base this adapter was made from"):
        retrofit.load_checkpoint(adapter, base=r34)


def test_a_base_of_another_architecture_is_one_line_in_the_cli(r18, tmp_path):
    _, _, _, adapter = r18
    r50, _, _ = retrofit.load_model("resnet50", pretrained=False)
    r50_file = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in r50.state_dict().items()}, str(r50_file))
    out = tmp_path / "full.safetensors"
    result = run("save", adapter, "--weights", r50_file, "-o", out)
    assert_one_line_error(result, f"{r50_file} is not a base for this adapter, which applies to resnet18 (timm) "
                                  "weights: layer1.0.conv1.weight is (64, 64, 1, 1) there but (64, 64, 3, 3) in resnet18")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r50.safetensors"]


def test_an_adapter_needs_a_base_and_a_full_checkpoint_takes_none(r18):
    _, base_file, full, adapter = r18
    with pytest.raises(RetrofitError, match=r"is an adapter \(inserted gates and head only\): pass the base weights"):
        retrofit.load_checkpoint(adapter)
    with pytest.raises(RetrofitError, match="is a full checkpoint, which holds its own weights"):
        retrofit.load_checkpoint(full, base=base_file)
    with pytest.raises(RetrofitError, match="is itself an adapter"):
        retrofit.load_checkpoint(adapter, base=adapter)


def test_save_adapter_refuses_a_trained_backbone_when_given_the_base(r18, tmp_path):
    model, base_file, _, _ = r18
    import copy

    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.layer2[0].conv1.weight.add_(1e-3)
    with pytest.raises(RetrofitError, match=r"^layer2\.0\.conv1\.weight differs from .*r18\.safetensors: the model's "
                                            "backbone was trained"):
        retrofit.save_adapter(trained, tmp_path / "a.safetensors", base=base_file)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RetrofitError, match="has no inserted blocks with weights"):
        retrofit.save_adapter(retrofit.load_model("resnet18", pretrained=False)[0], tmp_path / "b.safetensors")


def test_cli_save_round_trip_adapter_then_full(r18, tmp_path):
    _, base_file, full, _ = r18
    adapter = tmp_path / "a.safetensors"
    result = run("save", full, "--adapter", "--weights", base_file, "-o", adapter)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {adapter}: adapter, 8 tensors, 36 parameters, ")
    merged = tmp_path / "merged.safetensors"
    result = run("save", adapter, "--weights", base_file, "-o", merged, "--json")
    assert result.exit_code == 0, result.output
    a, b = load_file(str(full)), load_file(str(merged))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = run("save", adapter, "--weights", base_file, "-o", merged)
    assert_one_line_error(again, f"{merged} exists; pass --overwrite")
    result = run("predict", adapter, "--weights", full, *[tmp_path / "none.png"])
    assert_one_line_error(result, "image not found")


def test_an_adapter_with_weights_works_where_a_checkpoint_does(r18):
    _, base_file, full, adapter = r18
    a = run("report", "params-flops", adapter, "--weights", base_file, "--input-size", "3,64,64", "--json")
    b = run("report", "params-flops", full, "--input-size", "3,64,64", "--json")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    import json

    ja, jb = json.loads(a.output), json.loads(b.output)
    assert ja["model"]["params"] == jb["model"]["params"] and ja["model"]["macs"] == jb["model"]["macs"]
    refused = run("report", "params-flops", full, "--weights", base_file)
    assert_one_line_error(refused)
