"""Ctrl-C, SIGTERM and SIGHUP: every command stops the same way, and never in the middle of a write.

``timeout``, Slurm, ``docker stop`` and Kubernetes stop a process with SIGTERM; a closed terminal
sends SIGHUP. Python turns only Ctrl-C (SIGINT) into :class:`KeyboardInterrupt`; the other two
kill the process at once, between any two instructions. While a command runs,
:func:`stop_signals_interrupt` makes SIGTERM and SIGHUP raise :class:`KeyboardInterrupt` too, so
the same clean-up runs (temporary files removed, a replaced run put back, the saved epoch named),
and :func:`exit_code` is the shell's ``128 + signal number`` (143 for SIGTERM, 129 for SIGHUP, 130
for Ctrl-C). A signal the process was started ignoring (``nohup``) stays ignored.

:func:`deferred` holds these signals back during a short critical section (an atomic write: a
temporary file is created, written, renamed) and delivers them when it ends, so a signal never
leaves a temporary file behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

#: The signals that stop a command.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


def _raise_interrupt(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`KeyboardInterrupt` as Ctrl-C does.

    Only where the signal has its default action (a signal the process inherited as ignored, as
    under ``nohup``, stays ignored), and only in the main thread (elsewhere Python cannot set
    handlers; the block runs unchanged). The previous handlers come back at the end.
    """
    _received.clear()
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(s, _raise_interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def received() -> int | None:
    """The stop signal that raised the last :class:`KeyboardInterrupt` of this command, or None (Ctrl-C)."""
    return _received[-1] if _received else None


def exit_code() -> int:
    """``128 + signal number`` of the signal that stopped the command: 143 (SIGTERM), 129 (SIGHUP), 130 (Ctrl-C)."""
    return 128 + (received() or signal.SIGINT)


def describe() -> str:
    """``interrupted`` for Ctrl-C, ``stopped by SIGTERM`` / ``stopped by SIGHUP`` otherwise."""
    signum = received()
    return "interrupted" if signum in (None, signal.SIGINT) else f"stopped by {signal.Signals(signum).name}"


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends, then deliver them.

    A signal that arrives in the block is recorded; at the end the previous handlers are restored
    and each recorded signal is handed to its handler (a Python handler is called, raising
    :class:`KeyboardInterrupt` for Ctrl-C; a default action is re-raised, ending the process). Ignored
    signals stay ignored. Outside the main thread the block runs unchanged.
    """
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    try:  # installing inside the try: a signal between two installs still finds every handler put back
        for s in STOP_SIGNALS:
            handler = signal.getsignal(s)
            if handler not in (signal.SIG_IGN, None):
                previous[s] = handler
                signal.signal(s, lambda signum, frame: pending.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending[:1]:  # the first signal decides; a second one of the same stop adds nothing
            handler = previous[s]
            if callable(handler):
                handler(s, None)
            else:
                signal.raise_signal(s)
