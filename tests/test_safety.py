"""Issue 9: safe under real use — one writer per output, SIGTERM handled like Ctrl-C, numbers checked first.

Real processes where the behaviour is about processes (two commands racing, a signal, a kill -9): the
`retrofit` console script of this environment, started with subprocess. Small real data: the
scikit-learn digits (10 train / 5 val images per class).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from retrofit import read_recipe
from retrofit.cli import app
from retrofit.errors import RetrofitError
from retrofit.lock import lock_path, output_lock, remove_stale_temps, temp_file

RETROFIT = str(Path(sys.executable).parent / "retrofit")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
#: resnet18 from random init on 32-px digits: 5 batches an epoch, about a second on one thread.
TINY = ["resnet18", "--no-pretrained", "--img-size", "32", "-b", "20", "--workers", "0", "--hflip", "0",
        "--scale", "0.5,1"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([RETROFIT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ 1: one writer per output
def race(first: list, second: list) -> tuple[subprocess.Popen, subprocess.Popen, str, str]:
    """Start two commands 0.5 s apart; returns (winner, loser, winner's stdout, loser's one error line)."""
    a = start(*first)
    time.sleep(0.5)
    b = start(*second)
    (a_out, a_err), (b_out, b_err) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert sorted([a.returncode, b.returncode]) == [0, 2], (a_err[-2000:], b_err[-2000:])
    if a.returncode == 0:
        return a, b, a_out, one_error_line(b_err)
    return b, a, b_out, one_error_line(a_err)


def test_two_finetunes_into_one_output_the_second_is_refused_naming_the_first(small_digits, tmp_path):
    out = tmp_path / "race"
    common = ["finetune", *TINY, "--data", small_digits, "--epochs", 3, "-o", out]
    winner, loser, stdout, line = race([*common, "--seed", 1], [*common, "--seed", 2])
    assert line.startswith(f"error: {out} is in use by another retrofit command (PID {winner.pid}, since ")
    assert "retrofit finetune resnet18" in line and line.endswith("wait for it to end, or choose another --output")
    seed = int(winner.args[winner.args.index("--seed") + 1])
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["seed"] == seed
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 3
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "best.safetensors", "config.json", "curves.png", "drift.csv", "last.safetensors", "metrics.csv",
        "summary.json", "trainer_state.safetensors"])  # no block: no gates.csv
    assert stdout.count("epoch 3/3 ·") == 1
    assert hidden_files(tmp_path) == []  # the lock file is gone with its holder


@pytest.mark.slow
def test_two_add_ecas_into_one_output_the_second_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "r50-eca.safetensors"
    adaptive = ["add-eca", "resnet50", "--no-pretrained", "-o", out]
    winner, loser, _, line = race(adaptive, [*adaptive, "-k", "3"])
    assert line.startswith(f"error: {out} is in use by another retrofit command (PID {winner.pid}, since ")
    assert line.endswith("wait for it to end, or choose another -o")
    kernels = sorted({s["options"]["kernel_size"] for s in read_recipe(out).sites})
    # ECA's adaptive k for C = 256 … 1024 is 5 and for 2048 is 7; -k 3 puts 3 everywhere
    assert kernels == ([3] if "-k" in winner.args else [5, 7])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r50-eca.safetensors"]


def test_a_held_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    target = tmp_path / "out" / "x.safetensors"
    with output_lock(target, "-o"):
        assert lock_path(target).is_file()
        with pytest.raises(RetrofitError) as refused:
            with output_lock(target, "-o"):
                pass
        assert str(refused.value).startswith(f"{target} is in use by another retrofit command (PID {os.getpid()}, ")
    assert not (tmp_path / "out").exists()  # the folder the lock made for itself is gone with it
    # a holder killed with SIGKILL leaves its lock file; the kernel has dropped its flock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from retrofit.lock import output_lock\n"
        f"with output_lock({str(target)!r}):\n    print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RetrofitError, match=f"PID {holder.pid}, since"):
            with output_lock(target):
                pass
    finally:
        holder.kill()
        holder.wait(30)
    assert lock_path(target).is_file()
    with output_lock(target):
        pass
    assert not lock_path(target).exists()


def test_a_stale_temporary_file_is_removed_and_a_live_writers_is_not(tmp_path):
    target = tmp_path / "x.safetensors"
    fd, live = temp_file(target)
    try:
        assert remove_stale_temps(target) == [] and live.exists()
    finally:
        os.close(fd)
    other = tmp_path / ".x.safetensors.notmine.tmp"  # not named as retrofit names its temporary files
    other.write_text("mine")
    assert remove_stale_temps(target) == [live] and not live.exists()
    assert other.read_text() == "mine"


# ------------------------------------------------------------------ 2: SIGTERM and kill -9
def test_sigterm_during_finetune_saves_the_epoch_and_resume_equals_an_uninterrupted_run(small_digits, tmp_path):
    common = ["finetune", *TINY, "--data", small_digits, "--epochs", 4, "--seed", 4]
    straight = run(*common, "-o", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    out = tmp_path / "stopped"
    proc = start(*common, "-o", out)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.csv").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    line = one_error_line(stderr)
    epoch = int(line.split("; epoch ")[1].split(" is saved in")[0])
    assert line == f"error: stopped by SIGTERM; epoch {epoch} is saved in {out}; continue with --resume"
    assert 1 <= epoch < 4
    with safe_open(str(out / "trainer_state.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["retrofit.trainer_state"])["epoch"] == epoch
    assert hidden_files(out) == [] and hidden_files(tmp_path) == []
    resumed = run(*common, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6


def stop_add(out: Path, when: str | float) -> tuple[int, str]:
    """Run ``add-se resnet152 --no-pretrained`` and SIGTERM it after ``when`` seconds, or once its lock or
    temporary file exists; returns (exit code, stderr)."""
    proc = start("add-se", "resnet152", "--no-pretrained", "-o", out)
    try:
        if isinstance(when, float):
            time.sleep(when)
        else:
            pattern = ".r152-se.safetensors.lock" if when == "lock" else ".r152-se.safetensors.*.tmp"
            deadline = time.monotonic() + 300
            while not list(out.parent.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("when", [0.2, "lock", 4.0, "temp"])
def test_sigterm_at_any_moment_of_add_leaves_no_stray_file(tmp_path, when):
    out = tmp_path / "r152-se.safetensors"
    code, stderr = stop_add(out, when)
    # -15: still starting Python (SIGTERM's default action, before any file is touched); 0: done before it
    assert code in (-signal.SIGTERM, 0, 143), stderr[-2000:]
    if code == 143:
        assert one_error_line(stderr) == "error: stopped by SIGTERM"
    # nothing beside the output: no lock file, no temporary file; the output whole or absent
    assert [p.name for p in tmp_path.iterdir()] in ([], [out.name])
    if out.exists():
        assert read_recipe(out).block == "se" and len(load_file(str(out))) > 0


@pytest.mark.slow
def test_after_a_kill_9_during_add_the_next_write_leaves_no_stale_temporary_file(tmp_path):
    out = tmp_path / "r152-se.safetensors"
    proc = start("add-se", "resnet152", "--no-pretrained", "-o", out)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".r152-se.safetensors.*.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.005)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = hidden_files(tmp_path)
    assert ".r152-se.safetensors.lock" in left and any(n.endswith(".tmp") for n in left), left
    assert not out.exists()
    again = run("add-eca", "resnet18", "--no-pretrained", "-o", out)
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r152-se.safetensors"]
    assert read_recipe(out).block == "eca"


# ------------------------------------------------------------------ 4: numbers before models
REFUSED = [
    (["finetune", "resnet18", "--data", "d", "--epochs", "99999999999999999999"],
     "error: --epochs must be between 1 and 10000, got 99999999999999999999"),
    (["finetune", "resnet18", "--data", "d", "--epochs", "1e20"], "error: Invalid value for '--epochs'"),
    (["finetune", "resnet18", "--data", "d", "--block", "eca", "-k", "4"], "error: --kernel-size must be odd"),
    (["add-eca", "resnet18", "-k", "4"], "error: --kernel-size must be odd"),
    (["add-se", "resnet18", "-r", "0"], "error: --reduction must be between 1 and 1024, got 0"),
    (["add-se", "resnet18", "--stages", "0"], "error: --stages must be between 1 and 16, got 0"),
    (["predict", "resnet18", "missing.png"], "error: image not found: missing.png"),
    (["compare", "resnet18", "resnet34", "missing.png"], "error: image not found: missing.png"),
]


@pytest.mark.parametrize("args, message", REFUSED)
def test_numbers_and_images_are_refused_before_torch_is_imported(args, message, tmp_path):
    driver = ("import sys\nfrom retrofit.cli import main\nsys.argv = ['retrofit', *sys.argv[1:]]\n"
              "try:\n    main()\nfinally:\n    print('torch imported:', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", driver, *args], capture_output=True, text=True, cwd=tmp_path,
                          env=ENV, timeout=120)
    assert proc.returncode == 2 and one_error_line(proc.stderr).startswith(message), proc.stderr
    assert proc.stdout.strip() == "torch imported: False"


@pytest.mark.parametrize("args, message", [a for a in REFUSED if "1e20" not in a[0]])
def test_numbers_and_images_are_refused_before_any_model_is_built(args, message, monkeypatch, tmp_path):
    import socket

    import timm

    import retrofit.models

    def never(what):
        def fail(*args, **kwargs):
            raise AssertionError(what)

        return fail

    monkeypatch.setattr(retrofit.models, "build", never("a model was built"))
    monkeypatch.setattr(retrofit.models, "load_model", never("a model was built"))
    monkeypatch.setattr(timm, "create_model", never("a model was built"))
    monkeypatch.setattr(socket, "getaddrinfo", never("the network was asked"))
    monkeypatch.setattr(socket.socket, "connect", never("the network was asked"))
    monkeypatch.chdir(tmp_path)
    # CPU time of this thread, not wall time: other processes on a busy machine (or the other test worker)
    # do not count, and with nothing built and no network asked there is nothing to wait for
    started = time.thread_time()
    result = run(*args)
    elapsed = time.thread_time() - started
    assert result.exit_code == 2 and one_error_line(result.stderr).startswith(message), result.output
    assert elapsed < 1.0


def test_a_warmup_longer_than_half_the_run_is_capped_with_one_line(small_digits, tmp_path):
    from retrofit.train.config import FinetuneConfig
    from retrofit.train.optim import warmup_updates

    config = FinetuneConfig("resnet18", data="d", output="o", epochs=1)  # default --warmup-epochs 1
    assert config.warmup_epochs_used() == 0.5 and warmup_updates(config, 10) == 5
    assert FinetuneConfig("resnet18", data="d", output="o", epochs=2).warmup_warning() is None
    result = run("finetune", *TINY, "--data", small_digits, "--epochs", 1, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --warmup-epochs 1 is more than half of --epochs 1; warming up for 0.5 epochs instead"]
    too_long = run("finetune", *TINY, "--data", small_digits, "--epochs", 2, "--warmup-epochs", 3, "-o", tmp_path / "p")
    assert too_long.exit_code == 2
    assert one_error_line(too_long.stderr) == "error: --warmup-epochs must be between 0 and --epochs, got 3.0"
