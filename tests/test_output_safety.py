"""Outputs other than `add`'s -o and finetune's run folder: never replaced without --overwrite, one writer at a time,
a bad path refused in one line before the work.

Each test is a few seconds on CPU (resnet18 --no-pretrained on two 32×32 images, or no model at all).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrofit.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def two_images(tmp_path):
    """An ImageFolder root with val/a/1.png and val/b/1.png."""
    from PIL import Image

    root = tmp_path / "data"
    for name, colour in (("a", (10, 200, 30)), ("b", (200, 10, 30))):
        (root / "val" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(root / "val" / name / "1.png")
    return root


def _evaluate(data, *more):
    return run("evaluate", "resnet18", "--no-pretrained", "--num-classes", 2, "--data", data, "--device", "cpu",
               "-j", 0, "--json", *more)


def test_evaluate_does_not_replace_a_predictions_file_made_while_it_ran(two_images, tmp_path, monkeypatch):
    # the file did not exist when the command started (so the early check passed); another command (or the user)
    # wrote it while the model was evaluated: without --overwrite it must not be replaced
    import retrofit.evaluate as evaluate_module

    out = tmp_path / "p.csv"
    original = evaluate_module.evaluate

    def meanwhile(*args, **kwargs):
        out.write_text("another command's predictions")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", meanwhile)
    result = _evaluate(two_images, "--predictions", out)
    assert out.read_text() == "another command's predictions"
    assert result.exit_code != 0 and "exists" in result.output, result.output


def test_evaluate_takes_the_output_lock_of_its_predictions_file(two_images, tmp_path):
    # `add` refuses an output another retrofit command is writing; evaluate --predictions ignores that lock
    from retrofit.lock import output_lock

    out = tmp_path / "p.csv"
    with output_lock(out, "-o"):  # as `retrofit add … -o p.csv` or another `evaluate --predictions p.csv` holds it
        result = _evaluate(two_images, "--predictions", out)
    assert_one_line_error(result, "is in use by another retrofit command")
    assert not out.exists()


def test_evaluate_predictions_path_that_cannot_be_created_fails_before_evaluating(two_images, tmp_path, monkeypatch):
    import retrofit.evaluate as evaluate_module

    (tmp_path / "afile").write_text("x")
    calls = []
    original = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = _evaluate(two_images, "--predictions", tmp_path / "afile" / "sub" / "p.csv")
    assert_one_line_error(result, "cannot write")
    assert calls == [], "the whole evaluation ran, then its results were lost to the output error"


def test_evaluate_never_writes_predictions_over_its_own_target(two_images, tmp_path):
    # add refuses `-o` = `--weights` even with --overwrite; evaluate replaced the checkpoint with a CSV
    ckpt = tmp_path / "r18-eca.safetensors"
    assert run("add-eca", "resnet18", "--no-pretrained", "--num-classes", 2, "-o", ckpt).exit_code == 0
    kept = ckpt.read_bytes()
    result = run("evaluate", ckpt, "--data", two_images, "--device", "cpu", "-j", 0, "--json",
                 "--predictions", ckpt, "--overwrite")
    assert ckpt.read_bytes() == kept
    assert_one_line_error(result)


def test_evaluate_predictions_of_a_model_with_more_outputs_than_the_data_has_classes(two_images, tmp_path):
    # a 1000-class model on a 2-class folder is accepted (top-1 printed) but --predictions crashed with IndexError
    out = tmp_path / "p.csv"
    result = run("evaluate", "resnet18", "--no-pretrained", "--data", two_images, "--device", "cpu", "-j", 0,
                 "--json", "--predictions", out)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3


def test_ablate_does_not_overwrite_the_users_tables(two_images, tmp_path):
    # finetune never replaces files of a folder that it did not write; ablate replaced ablation.md/.csv silently
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ablation.md").write_text("# my own notes")
    result = run("ablate", "resnet18", "--no-pretrained", "--data", two_images, "-o", notes, "--report-only",
                 "--device", "cpu")
    assert (notes / "ablation.md").read_text() == "# my own notes"
    assert_one_line_error(result, "ablation.md")


def test_ablate_output_that_cannot_be_created_is_a_user_error(two_images, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run("ablate", "resnet18", "--no-pretrained", "--data", two_images, "-o", tmp_path / "afile" / "sub",
                 "--report-only", "--device", "cpu")
    assert_one_line_error(result, "cannot")
    assert "NotADirectoryError" not in result.output and "--debug" not in result.output


def test_demo_weights_does_not_replace_a_file_made_while_it_converted(tmp_path, monkeypatch):
    import torch

    import retrofit.demo as demo

    out = tmp_path / "lite0.safetensors"

    def meanwhile():
        out.write_bytes(b"another command's file")
        return {"w": torch.zeros(1)}

    monkeypatch.setattr(demo, "lite0_state_dict", meanwhile)
    result = run("demo", "weights", "-o", out)
    assert out.read_bytes() == b"another command's file"
    assert result.exit_code != 0 and "exists" in result.output, result.output
