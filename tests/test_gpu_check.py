"""Issue 11: benchmarks/gpu_check.sh runs everywhere; without CUDA it says so and succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_cuda_skips_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: GPU checks skipped"
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_gpu_check_rehearses_its_cuda_steps_on_the_cpu(tmp_path):
    """GPU_CHECK_DEVICE=cpu runs every command line of the CUDA run at toy sizes: a misspelt flag or a
    missing input fails here, not in the few minutes a lent device gives."""
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout + log[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ") and " | " in line}
    for step in ("inputs: digits ImageFolder", "inputs: Lite0 ImageNet weights", "finetune bf16 + channels_last",
                 "finetune --compile", "torchrun --nproc-per-node 1 (gloo)", "evaluate best checkpoint"):
        assert "| ok |" in rows[step], rows.get(step)
    assert "FAILED" not in report
    assert "skipped: needs a card to overflow" in rows["out-of-memory message"]
    assert "## Inference (cpu)" in report and "| CPU" in report  # the inference table's rows
    assert "## Training step (cpu)" in report
    assert list(tmp_path.iterdir()) != [] and not (ROOT / "gpu_check.md").exists()


def test_gpu_check_refuses_an_unknown_device(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "tpu", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: GPU_CHECK_DEVICE must be cuda or cpu, not 'tpu'"
    assert list(tmp_path.iterdir()) == []
