"""Issue 2, acceptance 1 and the README demo: real Lite0 ImageNet weights, real photos."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.predict import predict


@pytest.mark.slow
def test_add_eca_on_real_lite0_keeps_logits_and_classes(lite0_weights, photos, tmp_path):
    out = tmp_path / "lite0-eca.safetensors"
    result = CliRunner().invoke(
        app, ["add-eca", "tf_efficientnet_lite0", "--weights", str(lite0_weights), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["sites"]) == 9
    assert [s["owner"] for s in report["sites"]] == [
        "blocks.1.1", "blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.1",
        "blocks.4.2", "blocks.5.1", "blocks.5.2", "blocks.5.3",
    ]
    assert report["params_before"] == 4_652_008
    assert report["params_after"] == 4_652_008 + 33  # k = 3,3,3,3,3,3,5,5,5

    base, _, _ = retrofit.load_model("tf_efficientnet_lite0", weights=lite0_weights)
    retro = retrofit.load_checkpoint(out)
    before = predict(base, photos)
    after = predict(retro, photos)
    assert [p.classes[0] for p in before] == [285, 967]
    assert [p.classes[0] for p in after] == [285, 967]
    assert [p.classes for p in after] == [p.classes for p in before]  # top-5 unchanged
    for b, a in zip(before, after):
        assert (b.logits - a.logits).abs().max().item() <= 1e-5


def test_demo_commands_write_weights_and_photos(tmp_path):
    runner = CliRunner()
    w = tmp_path / "w.safetensors"
    assert runner.invoke(app, ["demo", "weights", "-o", str(w)]).exit_code == 0
    from safetensors.torch import load_file

    state = load_file(str(w))
    assert len(state) == 296
    assert state["conv_stem.weight"].shape == (32, 3, 3, 3)
    again = runner.invoke(app, ["demo", "weights", "-o", str(w)])
    assert again.exit_code != 0 and "exists" in again.output
    assert runner.invoke(app, ["demo", "photos", str(tmp_path / "p")]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["chelsea.png", "coffee.png"]


def test_predict_command_names_classes(lite0_weights, photos):
    result = CliRunner().invoke(
        app, ["predict", "tf_efficientnet_lite0", *map(str, photos), "--weights", str(lite0_weights), "--json"]
    )
    assert result.exit_code == 0, result.output
    preds = json.loads(result.output)["predictions"]
    assert [p["classes"][0] for p in preds] == [285, 967]
    assert all(len(p["classes"]) == 5 for p in preds)


@pytest.mark.slow
def test_compare_command_reports_unchanged_top5(lite0_weights, photos, tmp_path):
    out = tmp_path / "se.safetensors"
    runner = CliRunner()
    assert runner.invoke(app, ["add-se", "tf_efficientnet_lite0", "--weights", str(lite0_weights), "-o", str(out)]).exit_code == 0
    result = runner.invoke(
        app, ["compare", "tf_efficientnet_lite0", str(out), *map(str, photos), "--weights", str(lite0_weights), "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["images"]
    assert [r["base"][0] for r in rows] == [285, 967]
    assert all(r["same_top_k"] and r["max_abs_logit_diff"] <= 1e-5 for r in rows)


def test_compare_two_model_names_each_with_its_own_weights(lite0_weights, photos, tmp_path):
    from safetensors.torch import load_file, save_file

    shifted = load_file(str(lite0_weights))
    shifted["classifier.bias"] = shifted["classifier.bias"] + 1.0  # every logit +1: same ranking
    other = tmp_path / "lite0-shifted.safetensors"
    save_file(shifted, str(other))
    result = CliRunner().invoke(app, ["compare", "tf_efficientnet_lite0", "tf_efficientnet_lite0", *map(str, photos),
                                      "--weights", str(lite0_weights), "--other-weights", str(other), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["images"]
    assert [r["other"][0] for r in rows] == [285, 967] and all(r["same_top_k"] for r in rows)
    assert all(abs(r["max_abs_logit_diff"] - 1.0) < 1e-4 for r in rows)


def test_16_bit_greyscale_photos_are_seen_like_8_bit_ones(lite0_weights, photos, tmp_path):
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(photos[0]).convert("L"), dtype=np.uint16)  # chelsea
    eight, sixteen = tmp_path / "grey8.png", tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint8)).save(eight)
    Image.fromarray(grey * 257).save(sixteen)  # 16-bit PNG: PIL mode I;16 (or I)
    assert Image.open(sixteen).mode.startswith("I")
    model, _, _ = retrofit.load_model("tf_efficientnet_lite0", weights=lite0_weights)
    a, b = predict(model, [eight, sixteen], top=1)
    assert a.classes == b.classes
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
