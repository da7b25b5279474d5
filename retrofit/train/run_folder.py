"""The run folder (``--output``) through its life cycle: checked, set aside, put back, recovered.

A folder is a run when it holds retrofit's run record (``config.json``, as finetune writes it)
or a trainer state; other files are the user's and are never replaced, ``--overwrite`` or not.
With ``--overwrite`` the previous run's files move to ``OUTPUT/.replaced/`` (through
``.replaced.tmp/``, renamed when complete) once the new run's setup has succeeded, and are deleted
once its first epoch is saved. A run that fails or is interrupted before that puts them back; so
does the next finetune command in that folder after a kill. An ``--overwrite`` that does not get
through an epoch loses nothing.

Rank 0 holds the folder's output lock (:func:`retrofit.lock.output_lock`, ``.<name>.lock`` beside
the folder) for the whole command: a second command on the same folder is refused with one line
naming the first, before it looks at the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, ContextManager

from ..errors import RetrofitError
from ..interrupts import deferred
from ..lock import output_lock, remove_stale_temps
from . import distributed
from .config import FinetuneConfig
from .state import STATE_FILE

LAST, BEST, EMA = "last.safetensors", "best.safetensors", "ema.safetensors"
#: ``--train blocks|head``: the best weights as an adapter (gates and head only, :mod:`retrofit.adapter`).
BEST_ADAPTER = "best.adapter.safetensors"
RUN_FILES = (LAST, BEST, EMA, STATE_FILE, "metrics.csv", "gates.csv", "drift.csv", "curves.png", "config.json",
             "summary.json", BEST_ADAPTER)
#: Where --overwrite keeps the run it replaces until the new run's first epoch is saved
#: (``MOVING`` while the files are being moved there).
REPLACED = ".replaced"
MOVING = ".replaced.tmp"


def _inside(source: str, files: list[Path]) -> bool:
    """Whether the SOURCE path is one of ``files``."""
    path = Path(source)
    return path.exists() and any(f.exists() and path.resolve() == f.resolve() for f in files)


def is_run_record(path: Path) -> bool:
    """Whether ``path`` is a ``config.json`` that ``retrofit finetune`` wrote (not some other tool's)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    config = record.get("config") if isinstance(record, dict) else None
    return (isinstance(config, dict) and {"source", "data", "epochs", "seed"} <= set(config)
            and isinstance(record.get("classes"), list) and "versions" in record)


class RunFolder:
    """One run's ``--output`` folder, seen from one rank (only rank 0 changes it).

    Args:
        path: the folder (absolute).
        d: this process's place in the job; the checks run on every rank, the moves on rank 0.
        say: prints one line on rank 0's console.
    """

    def __init__(self, path: Path, d: distributed.Dist, say: Callable[[str], None]):
        self.path = path
        self.d = d
        self.say = say
        self.previous: list[str] = []

    def lock(self) -> ContextManager[None]:
        """The folder's output lock, held by rank 0 (the only rank that writes).

        Raises :class:`RetrofitError` on entry when another command holds it.
        """
        return output_lock(self.path, "--output") if self.d.is_main else contextlib.nullcontext()

    def check(self, config: FinetuneConfig) -> None:
        """Refuse to overwrite a previous run unless ``overwrite`` (then set aside later) or ``resume``.

        Raises:
            RetrofitError: the output is a file; a ``.replaced`` retrofit did not make; a
                ``config.json`` retrofit did not write, or run-like files without a run record;
                ``resume`` with no trainer state; SOURCE is a file of the run; a previous run
                without ``resume``/``overwrite``.
        """
        out = self.path
        if out.exists() and not out.is_dir():
            raise RetrofitError(f"--output {out} is a file; finetune writes a run folder there")
        for name in (REPLACED, MOVING):
            kept = out / name
            if kept.exists() and not (kept.is_dir() and all(f.name in RUN_FILES for f in kept.iterdir())):
                raise RetrofitError(f"{kept} is not a folder retrofit made; move it, or choose another --output")
        if self.d.is_main:
            self.recover()
        distributed.barrier(self.d)
        previous = [name for name in RUN_FILES if (out / name).exists()]
        record = out / "config.json"
        if record.exists() and not is_run_record(record):
            raise RetrofitError(f"{out} holds a config.json that retrofit did not write; choose another --output")
        if previous and not record.exists() and not (out / STATE_FILE).exists():
            raise RetrofitError(f"{out} holds {', '.join(previous[:3])} but no retrofit run (no run record "
                                "config.json); choose another --output")
        if config.resume:
            if not (out / STATE_FILE).is_file():
                started = " (a run started there but finished no epoch)" if previous == ["config.json"] else ""
                raise RetrofitError(f"nothing to resume in {out}: no {STATE_FILE} there{started}; start without --resume")
        elif previous == ["config.json"]:
            pass  # a run that stopped before its first epoch was saved: nothing to keep, start it again
        elif previous and _inside(config.source, [out / name for name in previous]):
            raise RetrofitError(
                f"SOURCE {config.source} is a file of the run in {out}, which this run would replace; "
                "copy it elsewhere first, or choose another --output"
            )
        elif previous and not config.overwrite:
            raise RetrofitError(
                f"{out} already holds a run ({', '.join(previous[:3])}); pass --resume to continue it, "
                "--overwrite to start over, or another --output"
            )
        self.previous = previous

    def clear(self, overwrite: bool) -> None:
        """After a successful setup: remove temporary files of killed writes and, with ``overwrite``, set the old run aside."""
        distributed.barrier(self.d)
        if self.d.is_main:
            for name in RUN_FILES:
                remove_stale_temps(self.path / name)  # left by a killed atomic write
            if overwrite and self.previous:
                with deferred():  # all of the old run is set aside, or none of it
                    moving = self.path / MOVING
                    moving.mkdir()
                    for name in self.previous:
                        os.replace(self.path / name, moving / name)
                    os.replace(moving, self.path / REPLACED)
        distributed.barrier(self.d)

    def drop_replaced(self) -> None:
        """The new run has an epoch saved: the run it replaced can go."""
        aside = self.path / REPLACED
        if self.d.is_main and aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)

    def restore_replaced(self, saved_epoch: int) -> bool:
        """The new run failed: before saving an epoch, put the run it was replacing back (True when it did);
        after (a signal delivered as the first state was written, before :meth:`drop_replaced`), drop it."""
        aside = self.path / REPLACED
        if not (self.d.is_main and aside.is_dir()):
            return False
        if saved_epoch:
            shutil.rmtree(aside, ignore_errors=True)
            return False
        self._put_back(aside, new_files=True)
        return True

    def recover(self) -> None:
        """What a killed --overwrite left: the old run comes back unless the new one had saved an epoch."""
        if (self.path / MOVING).is_dir():  # killed while setting the old run aside: every file is the old run's
            self._put_back(self.path / MOVING, new_files=False)
        aside = self.path / REPLACED
        if aside.is_dir():
            if (self.path / STATE_FILE).exists():  # the overwriting run saved an epoch: it did replace the old one
                shutil.rmtree(aside, ignore_errors=True)
            else:
                self._put_back(aside, new_files=True)
                self.say(f"put back the run that an interrupted --overwrite was replacing in {self.path}")

    def _put_back(self, folder: Path, *, new_files: bool) -> None:
        with deferred():  # all of the old run comes back, or none of it
            if new_files:  # what the new run wrote before any epoch was saved: its run record
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
            for f in folder.iterdir():
                os.replace(f, self.path / f.name)
            folder.rmdir()
