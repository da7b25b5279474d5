"""One writer per output: an exclusive lock on a run folder or checkpoint path, and marked temporary files.

**The output lock.** A command that writes an output (``finetune``'s run folder, ``add``'s
checkpoint) holds :func:`output_lock` on it from before it looks at the output until it is done.
A second command on the same output is refused with one line naming the holder (PID, since when,
its command line). The lock is ``fcntl.flock`` on a hidden file beside the output,
``.<name>.lock`` — beside, not inside, so a run folder holds only its run's files and a refused
command creates no folder. The kernel drops a flock when its holder exits, however it exits
(``kill -9`` included): a lock whose holder is dead is simply taken. The file is removed when the
lock is released; after a kill it stays until the next command on that output takes and removes it.

**Temporary files.** An atomic write goes through ``.<name>.<8 random characters>.tmp`` beside its
target (:func:`temp_file`), flocked for as long as it exists. A temporary file that no process
holds was left by a killed writer: :func:`remove_stale_temps` removes those, and never one that a
live writer holds.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import RetrofitError
from .interrupts import deferred


def lock_path(target: Path) -> Path:
    """``.<name>.lock`` beside ``target``."""
    return target.parent / f".{target.name}.lock"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it may have been removed or replaced meanwhile)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder_record() -> bytes:
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode()


def _describe_holder(fd: int) -> str:
    """``PID 123, since 2025-01-02 10:11:12: retrofit finetune …`` from the lock file (the holder may still be writing it)."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            record = json.loads(os.pread(fd, 65536, 0).decode())
            break
        except (OSError, ValueError, UnicodeDecodeError):
            if time.monotonic() > deadline:
                return "a process that did not say which"
            time.sleep(0.05)
    host = "" if record.get("host") == socket.gethostname() else f" on {record.get('host')}"
    command = str(record.get("command", "?"))
    command = command if len(command) <= 300 else command[:299] + "…"
    since = str(record.get("since", "?")).replace("T", " ")
    return f"PID {record.get('pid', '?')}{host}, since {since}: {command}"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, option: str = "output") -> Iterator[None]:
    """Hold the exclusive lock on ``target`` (a run folder or a file path) for the block.

    Creates ``target``'s parent folder when missing (and removes it again at the end if it is
    still empty). ``option`` names the command's output option in the refusal.

    Raises:
        RetrofitError: another process holds the lock (``… is in use by PID …``), or the lock file
            cannot be created.
    """
    target = Path(target)
    path = lock_path(target)
    fd, created = None, []
    try:
        with deferred():  # a signal while taking the lock is delivered once it is held, inside this try
            created = _missing_parents(path.parent)
            fd = _acquire(target, path, option, created)
        yield
    finally:
        if fd is not None:
            try:
                with deferred():
                    _release(fd, path, created)
                    fd = None
            finally:
                if fd is not None:  # a signal came before the release began holding signals back
                    with deferred():
                        _release(fd, path, created)


def _release(fd: int, path: Path, created: list[Path]) -> None:
    path.unlink(missing_ok=True)  # while still held: a waiting process then sees a new file
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    _remove_empty(created)


def _acquire(target: Path, path: Path, option: str, created: list[Path]) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(fd)
                os.close(fd)
                raise RetrofitError(f"{target} is in use by another retrofit command ({holder}); wait for it to "
                                    f"end, or choose another {option}") from None
            if _same_file(fd, path):  # not removed by a holder that released it meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        return fd
    except OSError as e:
        _remove_empty(created)
        raise RetrofitError(f"cannot write {target}: cannot create its lock file {path}: {e.strerror or e}") from None
    except BaseException:
        _remove_empty(created)
        raise


def _missing_parents(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the command wrote there) or gone
            return


def temp_file(target: Path) -> tuple[int, Path]:
    """A new ``.<name>.<random>.tmp`` beside ``target``, open for writing and flocked by this process.

    Returns ``(fd, path)``; the flock lasts until ``fd`` is closed. Raises :class:`OSError`.
    """
    while True:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleaner looks at it
        if _same_file(fd, Path(tmp)):
            return fd, Path(tmp)
        os.close(fd)  # a cleaner took it for a killed writer's in the instant before the flock


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove ``target``'s temporary files that no live process holds (left by a killed writer); returns them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    try:
        candidates = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return removed
    for tmp in candidates:
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, tmp):
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # held by a live writer (EWOULDBLOCK), or gone meanwhile: not ours to remove
            pass
        finally:
            os.close(fd)
    return removed
