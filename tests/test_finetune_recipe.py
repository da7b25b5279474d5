"""The fine-tuning recipe for inserted blocks (issue 17): parameter groups, block warm-up, BatchNorm statistics,
common random numbers between a base run and its retrofit, the gates.csv / drift.csv records, and bad input.

Real inputs: the scikit-learn digits and the real EfficientNet-Lite0 ImageNet weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from retrofit import add_attention, load_checkpoint
from retrofit.ablation.grid import Grid
from retrofit.ablation.runner import run_config
from retrofit.checkpoint import save_checkpoint
from retrofit.cli import app
from retrofit.models import load_model
from retrofit.train import FinetuneConfig
from retrofit.train.config import BLOCK_LR_MULT, resume_mismatch
from retrofit.train.faces import write_faces
from retrofit.train.model import param_groups, replace_head
from retrofit.train.optim import apply_block_warmup

#: 32-px digits, no flips, no worker processes: deterministic and fast
DIGIT_AUG = ["--hflip", "0", "--scale", "0.5,1", "--workers", "0", "--img-size", "32"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ parameter groups and warm-up
def test_param_groups_split_backbone_blocks_and_head_with_their_own_rates():
    plain = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    # the backbone counted on the model without blocks: weights (≥ 2-D) decay, norms and biases do not
    backbone = [p for n, p in plain.named_parameters() if not n.startswith("classifier.")]
    assert sum(p.numel() for p in backbone if p.ndim > 1) == 3_328_992
    assert sum(p.numel() for p in backbone if p.ndim <= 1) == 42_016
    model, _ = add_attention(plain, "eca")
    groups = param_groups(model, weight_decay=0.05, head_lr_mult=10.0, block_lr_mult=0.5)
    summary = [(g["group"], g["weight_decay"], g["lr_scale"], sum(p.numel() for p in g["params"])) for g in groups]
    # Lite0: 3,371,008 backbone parameters, the 9 ECA convs' 33 (k = 3, 3, 5 × 7), a 1280×10 head
    assert summary == [
        ("backbone", 0.05, 1.0, 3_328_992), ("backbone", 0.0, 1.0, 42_016),
        ("blocks", 0.0, 0.5, 33),
        ("head", 0.05, 10.0, 12_800), ("head", 0.0, 10.0, 10),
    ]
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(".eca." in n for g in groups if g["group"] == "blocks" for n in g["names"])


def test_block_warmup_ramps_only_the_blocks_on_top_of_timms_schedule():
    from timm.scheduler import CosineLRScheduler

    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.AdamW([
        {"params": [weights[0]], "group": "backbone", "lr_scale": 1.0},
        {"params": [weights[1]], "group": "blocks", "lr_scale": 2.0},
        {"params": [weights[2]], "group": "head", "lr_scale": 10.0},
    ], lr=1e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, lr_min=0.0, t_in_epochs=False)
    seen = []
    for updates in range(6):
        scheduler.step_update(updates)
        apply_block_warmup(optimizer, updates, 4)
        cosine = scheduler._get_lr(updates)[0]
        seen.append([round(g["lr"] / cosine, 9) for g in optimizer.param_groups])
    # updates 1…4 of the blocks run at 1/4 … 4/4 of their rate, then stay there; the others never change
    assert seen == [[1, 0.5, 10], [1, 1.0, 10], [1, 1.5, 10], [1, 2, 10], [1, 2, 10], [1, 2, 10]]


def test_old_run_records_read_new_lr_mult_as_both_multipliers(tmp_path):
    record = FinetuneConfig("resnet18", data=str(tmp_path), output=str(tmp_path / "o")).to_dict()
    for key in ("head_lr_mult", "block_lr_mult", "block_warmup_epochs", "bn_stats"):
        del record[key]
    record["new_lr_mult"] = 10.0  # retrofit 0.1: blocks and head × 10
    old = FinetuneConfig.from_dict(record)
    assert (old.head_lr_mult, old.block_lr_mult) == (10.0, 10.0)
    now = FinetuneConfig("resnet18", data=str(tmp_path), output=str(tmp_path / "o"))
    assert now.block_lr_mult_used() == BLOCK_LR_MULT
    assert resume_mismatch(record, now) == ("--block-lr-mult is not given but the run being resumed used 10.0; "
                                           "resume with the same settings (or start a new run in another --output)")


# ------------------------------------------------------------------ common random numbers, gates.csv, drift.csv
@pytest.fixture(scope="module")
def paired_runs(small_digits, lite0_weights, tmp_path_factory):
    """One epoch of the base model and of ECA whose blocks barely train (lr × 1e-9), same seed."""
    root = tmp_path_factory.mktemp("paired")
    common = ["--weights", lite0_weights, "--data", small_digits, "--epochs", 1, "-b", 25, "--lr", 2e-3,
              "--warmup-epochs", 0, *DIGIT_AUG]
    base = run("finetune", "tf_efficientnet_lite0", *common, "-o", root / "base")
    eca = run("finetune", "tf_efficientnet_lite0", "--block", "eca", "--block-lr-mult", 1e-9, *common, "-o", root / "eca")
    assert base.exit_code == 0, base.output
    assert eca.exit_code == 0, eca.output
    return root


@pytest.mark.slow
def test_a_base_run_and_its_identity_init_retrofit_draw_the_same_random_numbers(paired_runs, small_digits):
    # same new head, same augmentations, same dropout masks: with gates held at 1 the two runs train the same
    # network, so their models agree to float rounding (before, the block's init draws gave ECA another head)
    base = load_checkpoint(paired_runs / "base" / "last.safetensors").eval()
    eca = load_checkpoint(paired_runs / "eca" / "last.safetensors").eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        diff = (base(x) - eca(x)).abs().max().item()
    assert diff < 1e-4, diff
    a, b = read_csv(paired_runs / "base" / "metrics.csv"), read_csv(paired_runs / "eca" / "metrics.csv")
    assert a[0]["val_top1"] == b[0]["val_top1"]
    assert abs(float(a[0]["train_loss"]) - float(b[0]["train_loss"])) < 1e-4


@pytest.mark.slow
def test_gates_and_drift_are_recorded_per_stage_and_group(paired_runs):
    gates = read_csv(paired_runs / "eca" / "gates.csv")
    # Lite0's 9 residual sites by stage: 1, 1, 4, 3; gates held at 1 (lr × 1e-9)
    assert [(r["epoch"], r["stage"], r["sites"]) for r in gates] == [("1", "1", "1"), ("1", "2", "1"), ("1", "3", "4"),
                                                                     ("1", "4", "3")]
    assert all(abs(float(r[k]) - 1) < 1e-6 for r in gates for k in ("gate_mean", "gate_min", "gate_max"))
    drift = read_csv(paired_runs / "eca" / "drift.csv")
    assert [(r["group"], r["params"], r["since_epoch"]) for r in drift] == [
        ("backbone", "3371008", "0"), ("blocks", "33", "0"), ("head", "12810", "0")]
    by_group = {r["group"]: r for r in drift}
    assert float(by_group["blocks"]["rms_change"]) < 1e-9 < float(by_group["backbone"]["rms_change"])
    assert by_group["blocks"]["relative_change"] == ""  # identity init starts the ECA convs at 0
    assert not (paired_runs / "base" / "gates.csv").exists()
    assert [r["group"] for r in read_csv(paired_runs / "base" / "drift.csv")] == ["backbone", "head"]
    record = json.loads((paired_runs / "eca" / "config.json").read_text())
    assert (record["config"]["block_lr_mult"], record["lr_mults"]) == (1e-9, {"backbone": 1.0, "blocks": 1e-9, "head": 10.0})
    assert json.loads((paired_runs / "base" / "config.json").read_text())["lr_mults"]["blocks"] == BLOCK_LR_MULT


@pytest.mark.slow
def test_bn_stats_frozen_keeps_every_running_statistic(small_digits, lite0_weights, tmp_path):
    model, _, _ = load_model("tf_efficientnet_lite0", weights=lite0_weights)
    replace_head(model, 10)
    source = save_checkpoint(model, tmp_path / "lite0-10.safetensors")
    start = load_file(str(source))
    out = tmp_path / "run"
    result = run("finetune", source, "--block", "eca", "--bn-stats", "frozen", "--data", small_digits, "--epochs", 1,
                 "-b", 25, "--lr", 1e-3, *DIGIT_AUG, "-o", out)
    assert result.exit_code == 0, result.output
    after = load_file(str(out / "last.safetensors"))
    stats = [k for k in start if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 3 * 49 and all(torch.equal(after[k], start[k]) for k in stats)
    assert not torch.equal(after["blocks.6.0.conv_pwl.weight"], start["blocks.6.0.conv_pwl.weight"])


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, fragment", [
    (["--block", "eca", "--block-lr-mult", "0"], "--block-lr-mult must be a finite number > 0, got 0.0"),
    (["--block", "eca", "--block-lr-mult", "-1"], "--block-lr-mult must be a finite number > 0, got -1.0"),
    (["--block", "eca", "--block-lr-mult", "nan"], "--block-lr-mult must be a finite number > 0, got nan"),
    (["--head-lr-mult", "0"], "--head-lr-mult must be a finite number > 0, got 0.0"),
    (["--new-lr-mult", "-2"], "--new-lr-mult must be a finite number > 0, got -2.0"),
    (["--block", "eca", "--block-lr-mult", "inf"], "--block-lr-mult must be a finite number > 0, got inf"),
    (["--block", "eca", "--train", "head", "--block-lr-mult", "0.1"],
     "--block-lr-mult does not apply with --train head: the inserted blocks do not train"),
    (["--block", "eca", "--train", "blocks", "--bn-stats", "train"],
     "--bn-stats train does not apply with --train blocks: the backbone and its BatchNorm statistics stay frozen"),
    (["--block", "eca", "--block-warmup-epochs", "5", "--epochs", "2"], "--block-warmup-epochs must be between 0 and --epochs"),
    (["--bn-stats", "sometimes"], "unknown --bn-stats 'sometimes'; choose one of: train, frozen"),
    (["--new-lr-mult", "10", "--head-lr-mult", "5"], "--new-lr-mult sets both --head-lr-mult and --block-lr-mult"),
])
def test_bad_recipe_options_are_one_line_errors(args, fragment, tmp_path):
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path, "-o", tmp_path / "o", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--block-lr-mult", "--block-warmup-epochs"])
def test_a_block_setting_without_blocks_matches_no_parameter(flag, small_digits, tmp_path):
    result = run("finetune", "resnet18", "--no-pretrained", flag, "1", "--data", small_digits, "--epochs", 2,
                 "-o", tmp_path / "o", *DIGIT_AUG)
    assert_one_line_error(result, f"{flag} applies to inserted blocks, and resnet18 has none with parameters")
    assert list(tmp_path.iterdir()) == []


def test_ablate_gives_block_settings_only_to_cells_whose_blocks_train(tmp_path):
    grid = Grid(blocks=("none", "eca", "se-var1"), seeds=(0,))
    template = FinetuneConfig("resnet18", data=str(tmp_path), output=str(tmp_path / "out"), block_lr_mult=0.5,
                              block_warmup_epochs=1.0)
    configs = {r.cell.block: run_config(template, r) for r in grid.runs()}
    assert (configs["eca"].block_lr_mult, configs["eca"].block_warmup_epochs) == (0.5, 1.0)
    assert (configs["none"].block_lr_mult, configs["none"].block_warmup_epochs) == (None, None)
    assert (configs["se-var1"].block_lr_mult, configs["se-var1"].block_warmup_epochs) == (None, None)


# ------------------------------------------------------------------ the second offline set
def test_write_faces_is_a_stratified_deterministic_split(tmp_path):
    assert write_faces(tmp_path / "a") == {"train": 100, "val": 100}
    write_faces(tmp_path / "b")
    for split in ("train", "val"):
        for cls in ("face", "non-face"):
            assert len(list((tmp_path / "a" / split / cls).glob("*.png"))) == 50
    a = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*.png"))
    assert a == sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*.png"))
    from PIL import Image

    image = Image.open(next((tmp_path / "a" / "val" / "face").glob("*.png")))
    assert (image.size, image.mode) == ((25, 25), "L")


def test_the_noise_cell_is_the_base_again_with_a_perturbed_learning_rate(tmp_path):
    grid = Grid(blocks=("none", "noise", "eca"), train=("full", "blocks"), seeds=(3,))
    grid.validate()
    assert [c.id for c in grid.cells()] == ["none_full", "none_head", "noise_full", "noise_head",
                                           "eca_standard_stages-all_k-adaptive_full",
                                           "eca_standard_stages-all_k-adaptive_blocks"]
    template = FinetuneConfig("resnet18", data=str(tmp_path), output=str(tmp_path / "out"), lr=2e-3, epochs=4,
                              block_lr_mult=0.5)
    configs = {r.cell.id: (run_config(template, r), r.cell.base().id) for r in grid.runs()}
    noise, base = configs["noise_full"]
    assert (noise.block, noise.block_lr_mult, noise.seed, base) == (None, None, 3, "none_full")
    assert noise.lr == pytest.approx(2e-3 * (1 + 1e-5), rel=1e-12) and noise.lr != 2e-3
    assert noise.output == str(tmp_path / "out" / "noise_full" / "seed-3")
    frozen, base = configs["noise_head"]
    assert (frozen.freeze_backbone_epochs, base) == (4, "none_head")
    assert configs["none_full"][0].lr == 2e-3


def test_new_lr_mult_sets_both_rates_and_only_the_heads_without_blocks():
    from retrofit.cli.finetune_options import lr_mults

    assert lr_mults(None, None, 2.0) == {"head_lr_mult": 2.0, "block_lr_mult": 2.0}
    assert lr_mults(None, None, 2.0, blocks=False) == {"head_lr_mult": 2.0, "block_lr_mult": None}
    assert lr_mults(None, 0.5, None) == {"head_lr_mult": 10.0, "block_lr_mult": 0.5}
