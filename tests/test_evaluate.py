"""`retrofit evaluate` and the statistics behind comparisons (issue 10, acceptance items 1 and 2).

A real fine-tuning run (the real EfficientNet-Lite0 ImageNet weights on 100 digits, 32 px) is
evaluated by the command, by finetune's own metrics.csv and by a loop written here with timm's
transform; McNemar's test and the paired interval are checked against hand counts and scipy.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from retrofit import add_attention, load_checkpoint, read_recipe, save_checkpoint
from retrofit.cli import app
from retrofit.errors import RetrofitError
from retrofit.stats import BETTER, SAME, WORSE, PairedDifference, mcnemar_exact, paired_difference, verdict


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lite0_run(small_digits, lite0_weights, tmp_path_factory) -> Path:
    """3 epochs of Lite0 on 100 digits; on one thread its best epoch (2: 30 %) is not its last (3: 28 %)."""
    out = tmp_path_factory.mktemp("lite0_run") / "run"
    result = run("finetune", "tf_efficientnet_lite0", "--weights", lite0_weights, "--data", small_digits,
                 "--epochs", 3, "-b", 20, "--img-size", 32, "--lr", 2e-3, "--warmup-epochs", 0, "--hflip", 0,
                 "--scale", "0.5,1", "-j", 0, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_evaluate_json_equals_the_best_epoch_of_metrics_csv_and_a_timm_loop(lite0_run, small_digits, tmp_path):
    predictions = tmp_path / "predictions.csv"
    result = run("evaluate", lite0_run / "best.safetensors", "--data", small_digits, "--json", "-j", 0,
                 "--predictions", predictions)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["images"] == 50
    # the run's best epoch, as metrics.csv wrote it (6 significant digits)
    summary = json.loads((lite0_run / "summary.json").read_text())
    best = read_csv(lite0_run / "metrics.csv")[summary["best"]["epoch"] - 1]
    assert round(got["top1"] * 50) == round(float(best["val_top1"]) * 50)
    assert got["top1"] == pytest.approx(float(best["val_top1"]), abs=1e-6)
    assert got["top5"] == pytest.approx(float(best["val_top5"]), abs=1e-6)
    assert got["loss"] == pytest.approx(float(best["val_loss"]), rel=1e-5)
    # an independent loop: timm's transform from the data config the run recorded
    from PIL import Image
    from timm.data import create_transform

    extra = read_recipe(lite0_run / "best.safetensors").extra["finetune"]
    cfg = extra["data_config"]
    assert cfg["input_size"] == [3, 32, 32]
    transform = create_transform(tuple(cfg["input_size"]), interpolation=cfg["interpolation"], mean=tuple(cfg["mean"]),
                                 std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    files = sorted((small_digits / "val").glob("*/*.png"))
    model = load_checkpoint(lite0_run / "best.safetensors")
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    labels = torch.tensor([extra["classes"].index(f.parent.name) for f in files])
    predicted = logits.argmax(1)
    assert int((predicted == labels).sum()) == round(got["top1"] * 50)
    rows = read_csv(predictions)
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert [r["predicted"] for r in rows] == [extra["classes"][i] for i in predicted.tolist()]
    assert [r["label"] for r in rows] == [f.parent.name for f in files]


def test_identity_init_retrofit_and_its_base_give_identical_predictions(lite0_run, small_digits, tmp_path):
    base = lite0_run / "best.safetensors"
    model, sites = add_attention(load_checkpoint(base), "eca")  # identity init
    assert len(sites) == 9
    retrofit = save_checkpoint(model, tmp_path / "eca.safetensors", extra=read_recipe(base).extra)
    predictions = tmp_path / "both.csv"
    result = run("evaluate", base, retrofit, "--data", small_digits, "--json", "-j", 0, "--predictions", predictions)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["mcnemar"] == {"first_only_correct": 0, "second_only_correct": 0, "p": 1.0}
    assert got["top1_difference"] == 0.0
    assert [t["target"] for t in got["targets"]] == [str(base), str(retrofit)]
    assert got["targets"][0]["top1"] == got["targets"][1]["top1"]
    rows = read_csv(predictions)
    assert len(rows) == 50 and all(r["predicted"] == r["predicted_2"] for r in rows)
    assert max(abs(float(r["probability"]) - float(r["probability_2"])) for r in rows) < 1e-6


def test_evaluate_per_class_counts_every_image_once(lite0_run, small_digits):
    result = run("evaluate", lite0_run / "best.safetensors", "--data", small_digits, "--json", "--per-class", "-j", 0)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    per_class = got["per_class"]
    assert [c["class"] for c in per_class] == [str(i) for i in range(10)]
    assert [c["images"] for c in per_class] == [5] * 10
    assert sum(round(c["top1"] * 5) for c in per_class) == round(got["top1"] * 50)


def test_mcnemar_exact_matches_the_hand_count_and_scipy():
    # b = 10, c = 2: 2 · (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 · 79 / 4096
    assert mcnemar_exact(10, 2) == 158 / 4096
    assert round(mcnemar_exact(10, 2), 4) == 0.0386
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    from scipy.stats import binomtest

    for b, c in ((10, 2), (0, 7), (1, 0), (100, 130), (412, 380)):
        assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    with pytest.raises(RetrofitError):
        mcnemar_exact(-1, 3)


def test_paired_interval_is_scipys_one_sample_t_interval_and_the_verdict_needs_both_tests():
    from scipy.stats import ttest_1samp

    base, cell = [0.90, 0.92, 0.91], [0.92, 0.945, 0.94]  # differences 0.02, 0.025, 0.03
    diff = paired_difference(base, cell)
    reference = ttest_1samp([c - b for b, c in zip(base, cell)], 0.0).confidence_interval(0.95)
    assert diff.mean == pytest.approx(0.025)
    assert (diff.low, diff.high) == pytest.approx((reference.low, reference.high), rel=1e-9)
    assert diff.excludes_zero()
    assert verdict(diff, 0.01) == BETTER
    assert verdict(diff, 0.2) == SAME  # the interval alone is not enough
    wide = paired_difference([0.90, 0.95], [0.93, 0.94])
    assert wide.low < 0 < wide.high and verdict(wide, 0.001) == SAME  # nor is McNemar alone
    assert verdict(PairedDifference(1, -0.05, None, None, None), 0.01) == WORSE  # one seed: McNemar decides
    assert paired_difference([0.5], [0.6]).low is None


def test_evaluate_errors_are_one_line(lite0_run, small_digits, tmp_path):
    other = tmp_path / "letters"
    (other / "a").mkdir(parents=True)
    shutil.copy(sorted((small_digits / "val" / "0").iterdir())[0], other / "a" / "x.png")
    assert_one_line_error(run("evaluate", lite0_run / "best.safetensors", "--data", other, "-j", 0),
                          "has classes the model lacks: a")
    assert_one_line_error(run("evaluate", lite0_run / "best.safetensors", "--data", tmp_path / "nowhere"),
                          "data folder not found")
    kept = tmp_path / "kept.csv"
    kept.write_text("mine\n")
    assert_one_line_error(run("evaluate", lite0_run / "best.safetensors", "--data", small_digits, "--predictions", kept),
                          "exists")
    assert kept.read_text() == "mine\n"
    assert_one_line_error(run("evaluate", lite0_run / "best.safetensors", lite0_run.parent / "x.safetensors",
                              "--data", small_digits), "x.safetensors")
    assert_one_line_error(run("evaluate", "resnet18", "--no-pretrained", "--data", small_digits, "--other-weights", kept),
                          "--other-weights applies to TARGET2")
    ten = lite0_run / "best.safetensors"
    assert_one_line_error(run("evaluate", ten, "resnet18", "--no-pretrained", "--data", small_digits),
                          "name their classes differently")
