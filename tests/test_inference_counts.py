"""Issue 18: benchmarks/inference_counts.py, the counted companion of inference.py (no valgrind here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_PATH = ROOT / "benchmarks" / "inference_counts.py"
_spec = importlib.util.spec_from_file_location("inference_counts", _PATH)
counts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(counts)

DUMP = """# callgrind format
version: 1
desc: Trigger: Client Request: a
events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
fn=(1) main
0 5 1 1 0 0 0 0 0 0
summary: 1000 400 30 5 20 4 1 2 3
totals: 1000 400 30 5 20 4 1 2 3
"""


def test_a_dump_gives_instructions_misses_and_the_cycle_estimate():
    parsed = counts.parse_dump(DUMP)
    assert parsed == {"Ir": 1000, "Dr": 400, "Dw": 30, "I1mr": 5, "D1mr": 20, "D1mw": 4, "ILmr": 1, "DLmr": 2, "DLmw": 3}
    assert counts.derived(parsed) == {"Ir": 1000, "L1m": 29, "LLm": 6, "CEst": 1000 + 290 + 600}


def test_the_section_gives_ratios_per_measure_and_goes_after_the_wall_clock_one(tmp_path):
    base = {"Ir": 1000, "I1mr": 0, "D1mr": 10, "D1mw": 0, "ILmr": 0, "DLmr": 1, "DLmw": 0}  # CEst 1200
    runs = {name: dict(base) for name in "abcef"}
    runs["a"]["Ir"] = 1010  # CEst 1210: a/c 1.0083, a/b 1.0083
    runs["e"]["DLmr"] = 0  # CEst 1100: e/f 0.9167
    section = counts.render(runs, 224, 1, 600.0, cache_sim=True)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert rows["CEst (decides)"] == "| CEst (decides) | **1.0083** ✗ | **1.0083** ✓ | **0.9167** ✓ |"
    assert rows["Ir"] == "| Ir | 1.0100 | 1.0100 | 1.0000 |"
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Inference\n\nwall\n\n## Inference: what the numbers say\n\ntext\n")
    counts.write_section(doc, section)
    counts.write_section(doc, section)  # replaced, not added twice
    text = doc.read_text()
    assert text.count(counts.SECTION) == 1
    assert text.index("## Inference\n") < text.index(counts.SECTION) < text.index("## Inference: what")


def test_smoke_mode_builds_retrofits_and_calls_without_valgrind():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(_PATH), "--smoke", "--models", "a"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "smoke: 1 model(s) built and called at 32 px"
