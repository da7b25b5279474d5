"""Issue 20, part 2: ``retrofit export`` writes ONNX / ExportedProgram files only once they reproduce the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import retrofit
from retrofit import export as export_module
from retrofit.cli import app
from retrofit.errors import RetrofitError


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """resnet18 + ECA at paper init with random gates (64 px), as a checkpoint and as an adapter with its base."""
    folder = tmp_path_factory.mktemp("export")
    model, _, _ = retrofit.load_model("resnet18", pretrained=False)
    base = folder / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    model, _ = retrofit.add_attention(model, "eca", init="paper", input_size=(3, 64, 64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".eca." in name:
                p.copy_(torch.randn_like(p))
    checkpoint = retrofit.save_checkpoint(model, folder / "r18-eca.safetensors")
    adapter = retrofit.save_adapter(model, folder / "r18-eca.adapter.safetensors")
    return model.eval(), checkpoint, adapter, base


def test_onnx_export_runs_in_onnxruntime_at_any_batch_size(r18, tmp_path):
    import onnx
    import onnxruntime

    model, checkpoint, _, _ = r18
    out = tmp_path / "r18-eca.onnx"
    result = run("export", checkpoint, "--format", "onnx", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["input_shape"] == ["batch", 3, 64, 64] and report["checked_batches"] == [2, 3]
    g = torch.Generator().manual_seed(0)  # the probes of the check: a batch of 2, then one of 3
    with torch.no_grad():
        peak = max(model(torch.randn(n, 3, 64, 64, generator=g)).abs().max().item() for n in (2, 3))
    assert report["tolerance"] == pytest.approx(1e-4 * max(1.0, peak))
    assert 0 < report["max_abs_diff"] <= report["tolerance"]
    assert report["bytes"] == out.stat().st_size
    graph = onnx.load(str(out)).graph
    assert graph.input[0].name == "input" and graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert sum(".eca." in init.name for init in graph.initializer) == 8  # every gate is in the file
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert got.shape == (5, 1000)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_exported_program_of_an_adapter_with_its_base(r18, tmp_path):
    model, _, adapter, base = r18
    out = tmp_path / "r18-eca.pt2"
    result = run("export", adapter, "--weights", base, "--format", "exported-program", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out} (exported-program, ") and "matches the model at batches 2, 3" in result.output
    program = torch.export.load(str(out)).module()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert (program(x) - model(x)).abs().max().item() <= 1e-5


def test_outputs_that_differ_are_refused_and_nothing_is_written(r18, tmp_path, monkeypatch):
    model, _, _, _ = r18
    real = export_module._run_onnx

    def off_by_a_bit(data, probes):
        outputs, runtime = real(data, probes)
        return [o + 0.01 for o in outputs], runtime

    monkeypatch.setattr(export_module, "_run_onnx", off_by_a_bit)
    with pytest.raises(RetrofitError, match=r"^the onnx export's outputs differ from the model's by 0\.01 \(tolerance "
                                            r"[0-9.e-]+ = 0\.0001 × max\(1, max \|output\|\)\); nothing written$"):
        export_module.export(model, tmp_path / "m.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "tflite"], "error: unknown export format 'tflite'; choose one of: onnx, exported-program"),
    (["--format", "onnx", "--input-size", "3,64"], "error: --input-size takes three positive integers C,H,W"),
])
def test_bad_input_is_one_line_before_anything_is_loaded(r18, tmp_path, args, message):
    _, checkpoint, _, _ = r18
    result = run("export", checkpoint, *args, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_an_existing_output_and_an_adapter_without_base_are_refused(r18, tmp_path):
    _, checkpoint, adapter, _ = r18
    out = tmp_path / "m.onnx"
    out.write_bytes(b"mine")
    result = run("export", checkpoint, "--format", "onnx", "-o", out)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {out} exists; pass --overwrite")
    assert out.read_bytes() == b"mine"
    result = run("export", adapter, "--format", "onnx", "-o", tmp_path / "a.onnx")
    assert result.exit_code == 2 and "is an adapter (inserted gates and head only)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_missing_onnxruntime_is_one_line(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    with pytest.raises(RetrofitError, match=r"^--format onnx checks the export with onnxruntime, which is not "
                                            r"installed: pip install 'retrofit\[export\]'$"):
        export_module.check_format("onnx")
    assert export_module.check_format("exported-program") == "exported-program"


def test_tolerance_is_relative_above_one():
    assert export_module.tolerance(torch.tensor([0.5, -0.2])) == pytest.approx(1e-4)
    assert export_module.tolerance(torch.tensor([30.0, -250.0])) == pytest.approx(0.025)
    assert np.isclose(export_module.RTOL, 1e-4)
