"""`retrofit ablate` (issue 10, acceptance items 3–5, and its bad-input rules).

Grids of real finetune runs: ResNet-18 (random init) on 100 real digits at 32 px, one thread, no
data-loading workers — so every run is deterministic and runs in another process (a shard, a
resumed grid) must give exactly the numbers of one uninterrupted process.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from retrofit import load_checkpoint
from retrofit.ablation.grid import Grid, shard
from retrofit.ablation.runner import run_config
from retrofit.cli import app
from retrofit.train import FinetuneConfig

RETROFIT = str(Path(sys.executable).parent / "retrofit")
GRID = ["resnet18", "--no-pretrained", "--blocks", "none,eca,se", "--seeds", "0,1", "--epochs", "1", "--img-size", "32"]
#: 100 training images in 5 steps, no flips of digits, no worker processes (deterministic, fast)
FAST = ["-b", "20", "-j", "0", "--hflip", "0"]
TIMING = ("seconds", "images_per_s")
CELLS = ["none_full", "eca_standard_stages-all_k-adaptive_full", "se_standard_stages-all_r-16_full"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def start(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([RETROFIT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def checkpoints(folder: Path) -> dict[str, tuple[int, str]]:
    """Every .safetensors under ``folder``: (mtime in ns, SHA-256)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*.safetensors"))}


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def one_process(small_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "out"
    result = run("ablate", *GRID, "--data", small_digits, *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_ablate_writes_six_runs_their_rows_paired_tables_and_a_plot(one_process):
    out = one_process
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/seed-*")) == sorted(
        f"{c}/seed-{s}" for c in CELLS for s in (0, 1))
    rows = read_csv(out / "ablation.csv")
    assert [(r["cell"], r["seed"]) for r in rows] == [(c, s) for s in "01" for c in CELLS]  # seed-major
    assert {r["status"] for r in rows} == {"done"}
    for r in rows:
        folder = out / r["cell"] / f"seed-{r['seed']}"
        last = read_csv(folder / "metrics.csv")[-1]
        assert (float(r["val_top1"]), float(r["val_top5"]), float(r["val_loss"])) == (
            float(last["val_top1"]), float(last["val_top5"]), float(last["val_loss"]))
        # evaluate's own pass over the final weights gives the same top-1 (50 images)
        predictions = read_csv(folder / "predictions.csv")
        assert len(predictions) == 50
        assert sum(p["label"] == p["predicted"] for p in predictions) == round(float(r["val_top1"]) * 50)
        assert int(r["params"]) == sum(p.numel() for p in load_checkpoint(folder / "last.safetensors").parameters())
    params = {r["block"]: int(r["params"]) for r in rows}
    assert params["none"] < params["eca"] < params["se"]
    assert len({(r["block"], r["params"], r["macs"]) for r in rows}) == 3  # the same for both seeds
    # MACs of the base: torch's own FlopCounterMode on one 32-px image (FLOPs = 2 × MACs)
    from torch.utils.flop_counter import FlopCounterMode

    base = load_checkpoint(out / "none_full/seed-0/last.safetensors")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        base(torch.zeros(1, 3, 32, 32))
    assert int(rows[0]["macs"]) == counter.get_total_flops() // 2
    # per cell: the paired difference over the two seeds and McNemar's counts describe the same images
    cells = {c["cell"]: c for c in json.loads((out / "ablation.json").read_text())["cells"]}
    assert cells["none_full"]["verdict"] == "base"
    for name in CELLS[1:]:
        c = cells[name]
        assert c["paired"]["seeds"] == [0, 1] and c["paired"]["low"] <= c["paired"]["mean"] <= c["paired"]["high"]
        b, cc = c["mcnemar"]["base_only_correct"], c["mcnemar"]["cell_only_correct"]
        assert c["paired"]["mean"] == pytest.approx((cc - b) / (50 * 2), abs=1e-12)
        assert c["verdict"] in ("better", "worse", "not distinguishable")
    md = (out / "ablation.md").read_text()
    assert "Δ top-1 vs base (points, 95 % CI)" in md and "McNemar p (b / c)" in md
    table = [line for line in md.splitlines() if line.startswith("| eca |") or line.startswith("| se |")]
    assert len(table) == 2 and all("[" in line and line.rstrip(" |").endswith(("better", "worse", "distinguishable"))
                                   for line in table)
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_the_same_command_again_retrains_nothing(one_process, small_digits):
    before, rows = checkpoints(one_process), read_csv(one_process / "ablation.csv")
    assert len(before) == 6 * 3  # last, best, trainer_state per run
    result = run("ablate", *GRID, "--data", small_digits, *FAST, "-o", one_process)
    assert result.exit_code == 0, result.output
    assert result.output.count("already done") == 6 and "fine-tuning" not in result.output
    assert checkpoints(one_process) == before
    assert read_csv(one_process / "ablation.csv") == rows


@pytest.mark.slow
def test_a_changed_recipe_is_refused_naming_the_setting(one_process, small_digits):
    before = checkpoints(one_process)
    result = run("ablate", *GRID, "--data", small_digits, *FAST, "--lr", "0.01", "-o", one_process)
    assert_one_line_error(result, "none_full/seed-0 was run with other settings", "--lr is 0.01")
    assert checkpoints(one_process) == before


@pytest.mark.slow
def test_two_shards_in_two_processes_equal_one_process(one_process, small_digits, tmp_path):
    out = tmp_path / "out"
    shards = [start("ablate", *GRID, "--data", small_digits, *FAST, "-o", out, "--shard", f"{i}/2") for i in (1, 2)]
    outputs = [p.communicate(timeout=900)[0] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outputs
    for text in outputs:  # each process trained its three runs only
        assert "run 3/3" in text and "run 4/" not in text and text.count("· trained ·") == 3
    assert without_timing(read_csv(out / "ablation.csv")) == without_timing(read_csv(one_process / "ablation.csv"))
    # --report-only trains nothing; it evaluates a finished run whose predictions are missing (a kill in between)
    predictions = out / "none_full" / "seed-1" / "predictions.csv"
    kept = predictions.read_text()
    predictions.unlink()
    report = run("ablate", *GRID, "--data", small_digits, *FAST, "-o", out, "--report-only")
    assert report.exit_code == 0 and "fine-tuning" not in report.output
    assert predictions.read_text() == kept
    assert without_timing(read_csv(out / "ablation.csv")) == without_timing(read_csv(one_process / "ablation.csv"))


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_resumes_and_equals_an_uninterrupted_grid(small_digits, tmp_path):
    args = ["ablate", "resnet18", "--no-pretrained", "--blocks", "none,eca", "--seeds", "0", "--epochs", "2",
            "--img-size", "32", "--data", small_digits, *FAST]
    killed, eca = tmp_path / "killed", tmp_path / "killed" / "eca_standard_stages-all_k-adaptive_full" / "seed-0"
    process = start(*args, "-o", killed)
    deadline = time.monotonic() + 600
    while not ((eca / "metrics.csv").is_file() and len(read_csv(eca / "metrics.csv")) == 1):
        assert process.poll() is None and time.monotonic() < deadline, "the grid ended before its second run was half done"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (eca / "summary.json").exists() and len(read_csv(eca / "metrics.csv")) == 1
    finished = checkpoints(killed / "none_full")
    epoch_1 = read_csv(eca / "metrics.csv")[0]

    result = run(*args, "-o", killed)
    assert result.exit_code == 0, result.output
    assert "none_full/seed-0 · already done" in result.output
    assert "eca_standard_stages-all_k-adaptive_full/seed-0 · resumed" in result.output
    assert checkpoints(killed / "none_full") == finished
    assert read_csv(eca / "metrics.csv")[0] == epoch_1  # epoch 1 was kept (its timing too), not trained again
    reference = run(*args, "-o", tmp_path / "uninterrupted")
    assert reference.exit_code == 0, reference.output
    assert without_timing(read_csv(killed / "ablation.csv")) == without_timing(
        read_csv(tmp_path / "uninterrupted" / "ablation.csv"))


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_grid_goes_on(small_digits, tmp_path):
    out = tmp_path / "out"
    # k = 101 is a valid ECA kernel size, but wider than the 64 channels of resnet18's first sites: that run fails
    args = ["ablate", "resnet18", "--no-pretrained", "--blocks", "eca,none", "--kernel-sizes", "101", "--seeds", "0",
            "--epochs", "1", "--img-size", "32", "--data", small_digits, *FAST, "-o", out]
    result = run(*args)
    assert_one_line_error(result, "1 of 2 runs failed")
    assert result.exit_code == 1
    rows = {r["block"]: r for r in read_csv(out / "ablation.csv")}
    assert rows["none"]["status"] == "done" and rows["none"]["error"] == ""
    assert rows["eca"]["status"] == "failed" and "ECA kernel size 101 is larger than the 64 channels" in rows["eca"]["error"]
    assert "## Failed runs" in (out / "ablation.md").read_text()
    again = run(*args)  # the failed run is tried again, the finished one is not
    assert again.exit_code == 1 and "none_full/seed-0 · already done" in again.output


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--blocks", "none,sse"], "--blocks: 'sse' is not an option"),
    (["--placements", "standard,middle"], "--placements: 'middle' is not an option"),
    (["--train", "probe"], "--train: 'probe' is not an option"),
    (["--kernel-sizes", "adaptive,4"], "--kernel-sizes: 4 is not an option"),
    (["--stages", "all;3,x"], "--stages takes values separated by ';'"),
    (["--blocks", ""], "empty grid: --blocks has no values"),
    (["--seeds", ""], "empty grid: --seeds has no values"),
    (["--seeds", "0,1,0"], "--seeds lists 0 twice"),
    (["--shard", "3/2"], "--shard takes I/N with 1 ≤ I ≤ N, got '3/2'"),
    (["--shard", "0/2"], "--shard takes I/N with 1 ≤ I ≤ N, got '0/2'"),
    (["--train", "head", "--init", "paper"], "--train head with eca at --init paper"),
    (["--blocks", "noise,eca"], "--blocks noise needs none in the grid too"),
])
def test_bad_grids_are_one_line_errors_and_run_nothing(extra, fragment, small_digits, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run("ablate", "resnet18", "--no-pretrained", "--data", small_digits, "-o", out, *extra), fragment)
    assert not out.exists()


def test_cells_drop_what_does_not_apply_and_runs_get_their_settings(tmp_path):
    grid = Grid(blocks=("none", "eca", "se", "se-var1"), placements=("standard", "pre"), reductions=(8, 16),
                train=("full", "blocks", "head"), seeds=(0, 1))
    grid.validate()
    ids = [c.id for c in grid.cells()]
    assert ids == [
        "none_full", "none_head",
        "eca_standard_stages-all_k-adaptive_full", "eca_standard_stages-all_k-adaptive_blocks",
        "eca_pre_stages-all_k-adaptive_full", "eca_pre_stages-all_k-adaptive_blocks",
        "se_standard_stages-all_r-8_full", "se_standard_stages-all_r-8_blocks",
        "se_standard_stages-all_r-16_full", "se_standard_stages-all_r-16_blocks",
        "se_pre_stages-all_r-8_full", "se_pre_stages-all_r-8_blocks",
        "se_pre_stages-all_r-16_full", "se_pre_stages-all_r-16_blocks",
        "se-var1_standard_stages-all_full", "se-var1_standard_stages-all_blocks",
        "se-var1_pre_stages-all_full", "se-var1_pre_stages-all_blocks",
    ]
    runs = grid.runs()
    assert len(runs) == 36 and [r.seed for r in runs[:18]] == [0] * 18
    halves = shard(runs, 1, 2), shard(runs, 2, 2)
    assert sorted(map(id, halves[0] + halves[1])) == sorted(map(id, runs)) and not set(halves[0]) & set(halves[1])
    template = FinetuneConfig("resnet18", data=str(tmp_path), output=str(tmp_path / "out"), epochs=4, pretrained=False)
    by_id = {r.cell.id: r for r in runs[:18]}
    probe = run_config(template, by_id["se_pre_stages-all_r-8_blocks"])
    assert (probe.block, probe.placement, probe.reduction, probe.freeze_backbone_epochs, probe.seed) == ("se", "pre", 8, 4, 0)
    assert probe.output == str(tmp_path / "out" / "se_pre_stages-all_r-8_blocks" / "seed-0")
    assert by_id["se_pre_stages-all_r-8_blocks"].cell.base().id == "none_head"
    var1 = run_config(template, by_id["se-var1_standard_stages-all_full"])
    assert (var1.block, var1.init, var1.freeze_backbone_epochs) == ("se-var1", "paper", 0)
    base = run_config(template, by_id["none_head"])
    assert (base.block, base.freeze_backbone_epochs) == (None, 4)
