"""Stop signals that land where a clean-up has not begun yet (the class of bug CI found in ``output_lock``).

Each test raises the signal at one exact point, under :func:`retrofit.interrupts.stop_signals_interrupt`
as every command runs, and checks what the folder looks like afterwards. No model is trained: a
stand-in trainer drives the real :func:`retrofit.train.run._run`, :class:`RunFolder` and
:meth:`Trainer.one_epoch`.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from retrofit import interrupts
from retrofit.lock import lock_path, output_lock
from retrofit.train import loop as loop_module
from retrofit.train import run as run_module
from retrofit.train import run_folder as run_folder_module
from retrofit.train.config import FinetuneConfig
from retrofit.train.distributed import Dist
from retrofit.train.loop import Trainer
from retrofit.train.run_folder import RunFolder
from retrofit.train.state import STATE_FILE

pytestmark = pytest.mark.usefixtures("ctrl_c_raises")  # SIGINT too raises, also in a background job


class StandInTrainer:
    """What :func:`retrofit.train.run._run` and :meth:`Trainer.one_epoch` use of a trainer, without a model or data."""

    one_epoch = Trainer.one_epoch

    def __init__(self, out: Path, config: FinetuneConfig):
        self.config, self.out = config, out
        self.d = Dist(0, 1, 0, torch.device("cpu"))
        self.folder = RunFolder(out, self.d, lambda text: None)
        self.console = None
        self.epoch = self.saved_epoch = 0
        self.history: list = []
        self.best = {"epoch": 0, "top1": -1.0, "weights": "model"}
        self.model, self.ema = torch.nn.Linear(1, 1), None
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
        self.train_sampler = SimpleNamespace(set_epoch=lambda epoch: None)
        self.train_loader = self.val_loader = None
        self.drift_start = (0, {})  # drift.csv measures from here

    def build(self) -> None:
        pass

    def enter_phase(self, frozen: bool) -> None:
        pass

    def train_one_epoch(self, epoch, batches, progress=None):
        return {"train_loss": 1.0, "train_images_per_s": 1.0, "epoch_seconds": 1.0, "skipped_images": 0}

    def evaluate(self, model):
        return {"loss": 1.0, "top1": 0.5, "top5": 1.0, "skipped": 0}

    def say(self, text: str) -> None:
        pass


def _old_run(out: Path) -> dict[str, bytes]:
    """A finished previous run in ``out`` (a run record retrofit would recognise, and its files)."""
    out.mkdir(parents=True)
    record = {"config": {"source": "resnet18", "data": "d", "epochs": 1, "seed": 0}, "classes": ["a", "b"],
              "versions": {}}
    (out / "config.json").write_text(json.dumps(record))
    (out / "last.safetensors").write_bytes(b"old weights")
    (out / STATE_FILE).write_bytes(b"old state")
    return {f.name: f.read_bytes() for f in out.iterdir()}


def _overwrite(tmp_path: Path, out: Path) -> StandInTrainer:
    config = FinetuneConfig(source=str(tmp_path / "not-a-file-of-the-run"), data="d", output=str(out), overwrite=True)
    return StandInTrainer(out, config)


def _epochs_until_the_first_epoch(t: StandInTrainer, started: float):
    """``_epochs`` reduced to what matters here: the new run's record, then its first epoch."""
    (t.out / "config.json").write_text('{"new": true}')
    t.one_epoch(None)
    raise AssertionError("the signal should have stopped the epoch")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_old_run_is_set_aside_puts_it_back(tmp_path, monkeypatch, signum):
    # run.py:_run calls folder.clear() (which moves the old run to OUTPUT/.replaced/ inside deferred())
    # before the try whose except calls restore_replaced(): a signal held back during the move is
    # delivered as the deferred block ends, outside that try, and the old run stays in .replaced/.
    out = tmp_path / "run"
    before = _old_run(out)
    real = run_folder_module.deferred
    fired = []

    @contextlib.contextmanager
    def signal_while_setting_aside():
        with real():
            if not fired:  # the first deferred block of RunFolder here is clear()'s
                fired.append(True)
                signal.raise_signal(signum)  # held back, delivered when the old run is aside
            yield

    monkeypatch.setattr(run_folder_module, "deferred", signal_while_setting_aside)
    monkeypatch.setattr(run_module, "_epochs", lambda t, started: pytest.fail("no epoch runs after the signal"))
    t = _overwrite(tmp_path, out)
    with pytest.raises(KeyboardInterrupt), interrupts.stop_signals_interrupt():
        run_module._run(t)
    assert fired
    assert sorted(f.name for f in out.iterdir()) == sorted(before), "the old run is not back in OUTPUT"
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not lock_path(out).exists()


def test_a_stop_signal_while_the_first_state_is_written_leaves_no_replaced_run(tmp_path, monkeypatch):
    # loop.py:one_epoch writes the trainer state inside deferred(); a signal held back during that write
    # is delivered as the block ends, before folder.drop_replaced(). The epoch is saved (saved_epoch = 1),
    # so run.py's except does not put the old run back either: OUTPUT/.replaced/ (the whole replaced
    # run) stays behind, though an epoch of the new run is saved.
    out = tmp_path / "run"
    _old_run(out)

    def write_state_then_signal(t, rng):
        (t.out / STATE_FILE).write_bytes(b"new state")
        signal.raise_signal(signal.SIGTERM)  # held back by deferred(), delivered when the state is written

    monkeypatch.setattr(loop_module, "write_state", write_state_then_signal)
    monkeypatch.setattr(loop_module, "write_epoch_files", lambda t: None)
    monkeypatch.setattr(run_module, "_epochs", _epochs_until_the_first_epoch)
    t = _overwrite(tmp_path, out)
    with pytest.raises(KeyboardInterrupt), interrupts.stop_signals_interrupt():
        run_module._run(t)
    assert t.saved_epoch == 1 and (out / STATE_FILE).read_bytes() == b"new state"
    assert not (out / ".replaced").exists(), "the replaced run stays aside after the new run saved an epoch"
    assert not lock_path(out).exists()


def test_a_stop_signal_while_deferred_installs_its_handlers_leaves_ctrl_c_working(monkeypatch):
    # interrupts.py:deferred installs its handlers one by one before its try: a SIGTERM that arrives after
    # SIGINT's handler is replaced but before SIGTERM's raises KeyboardInterrupt from the old handler, and
    # SIGINT keeps the deferred block's handler (appending to a list nobody reads): Ctrl-C is then ignored.
    real_signal = signal.signal
    sigint_before = signal.getsignal(signal.SIGINT)
    fired = []

    def install_then_signal(signum, handler):
        previous = real_signal(signum, handler)
        if signum == signal.SIGINT and getattr(handler, "__name__", "") == "<lambda>" and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGTERM)  # SIGTERM still has stop_signals_interrupt's handler
        return previous

    monkeypatch.setattr(signal, "signal", install_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.stop_signals_interrupt():
            with interrupts.deferred():
                pass
        sigint_after = signal.getsignal(signal.SIGINT)
    finally:
        real_signal(signal.SIGINT, sigint_before)  # whatever happened, pytest's Ctrl-C handling comes back
    assert fired
    assert sigint_after is sigint_before, "Ctrl-C no longer interrupts after the deferred block was left"


def test_a_stop_signal_as_the_lock_is_released_leaves_no_lock_file(tmp_path, monkeypatch):
    # lock.py:output_lock removes the lock file inside a deferred() block that begins in the finally;
    # a signal that arrives once the body has ended but before that block holds signals back raises
    # KeyboardInterrupt in the finally, before the unlink: `.<name>.lock` stays (and the fd stays open).
    import retrofit.lock as lock_module

    real = lock_module.deferred
    calls = []

    def signal_before_the_release(*args, **kwargs):
        calls.append(True)
        if len(calls) == 2:  # the first is the acquisition's, the second the release's
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(lock_module, "deferred", signal_before_the_release)
    ran, target = _hold_the_lock_until_stopped(tmp_path)
    assert ran and len(calls) >= 2  # a fix may enter deferred() again to finish the release
    assert not lock_path(target).exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_lock_is_taken_leaves_no_lock_file(tmp_path, monkeypatch, signum):
    # CI once found `.r152-se.safetensors.lock` left after a SIGTERM: the signal, held back while the lock was
    # taken, was delivered before the block that removes the lock file had begun.
    import retrofit.lock as lock_module

    take = lock_module._acquire

    def take_then_signal(*args):
        fd = take(*args)
        signal.raise_signal(signum)  # held back by deferred(), delivered as the acquisition ends
        return fd

    monkeypatch.setattr(lock_module, "_acquire", take_then_signal)
    ran, target = _hold_the_lock_until_stopped(tmp_path)
    assert not ran and not lock_path(target).exists() and list(tmp_path.iterdir()) == []


def _hold_the_lock_until_stopped(tmp_path: Path) -> tuple[bool, Path]:
    """``with output_lock(OUT):`` under the commands' signal handling, where a signal stops it (KeyboardInterrupt
    is expected); returns whether the block's body ran, and OUT."""
    target = tmp_path / "out" / "m.safetensors"
    ran = False
    with pytest.raises(KeyboardInterrupt), interrupts.stop_signals_interrupt():
        with output_lock(target, "-o"):
            ran = True
    return ran, target
