"""Shared fixtures: the real EfficientNet-Lite0 weights and photos, written once per session (per xdist worker).

The suite runs in two pytest-xdist workers (``-n 2 --dist loadfile`` in pyproject.toml): each file stays in one
worker, so a module-scoped fixture is built once. Each worker, and every process a test starts, uses one CPU
thread: on a 2-core machine two workers with two OpenMP threads each wait on each other (Lite0 trained about
4x slower, docs/benchmarks.md), and one thread gives the subprocesses the floating-point sums of the tests' own
runs (resume and shard tests compare them exactly).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported here, and for every subprocess a test starts

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

#: Files that take minutes, longest first (pytest --durations). With --dist loadfile the workers take files in
#: collection order: these start first, so none of them is left running alone at the end of the suite.
LONGEST_FIRST = ("test_gpu_check.py", "test_finetune.py", "test_ablate.py", "test_coverage_sample.py",
                 "test_safety.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt during the test, as in a terminal. A shell's background job (``cmd &``,
    ``nohup``, some CI runners) starts with SIGINT ignored, and Python then leaves it ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory):
    """Timm-keyed .safetensors of the real ImageNet EfficientNet-Lite0 weights."""
    from retrofit.demo import convert_lite0_weights

    return convert_lite0_weights(tmp_path_factory.mktemp("weights") / "lite0.safetensors")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """skimage's chelsea.png and coffee.png."""
    from retrofit.demo import write_photos

    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The scikit-learn digits as an ImageFolder tree: 1,437 train / 360 val images."""
    from retrofit.train.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    assert write_digits(root) == {"train": 1437, "val": 360}
    return root


@pytest.fixture(scope="session")
def small_digits(digits, tmp_path_factory):
    """The first 10 train and 5 val images of each digit: 100 / 50 images."""
    import shutil

    root = tmp_path_factory.mktemp("small_digits")
    for split, n in (("train", 10), ("val", 5)):
        for cls in sorted((digits / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, root / split / cls.name / f.name)
    return root


@pytest.fixture
def console_script(monkeypatch, capsys):
    """``console_script(*args)`` runs ``retrofit ARGS…`` in this process through the console script's own entry
    point (:func:`retrofit.cli.main`: usage errors, ``--debug`` after the command, exit codes) and returns what
    :func:`subprocess.run` would: ``.returncode``, ``.stdout``, ``.stderr``. A new process costs an import of torch
    and timm (seconds); keep real subprocesses for what only a process shows: signals, locks, imports, the
    installed ``retrofit`` script. An exception that would end the process with a traceback propagates."""
    import subprocess
    import sys

    from retrofit.cli import main

    def exit_now(code: int) -> None:  # main() ends a stopped command with os._exit: here it must not end pytest
        raise SystemExit(code)

    def call(*args) -> subprocess.CompletedProcess:
        argv = ["retrofit", *map(str, args)]
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setattr(os, "_exit", exit_now)
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return call
