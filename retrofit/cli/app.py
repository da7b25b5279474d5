"""The Typer app, the global ``--debug`` flag, and the one-line error handling every command shares."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="retrofit",
    help="Retrofit SE / ECA channel attention into pretrained timm and torchvision CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def _no_type_on_flags() -> None:
    """Show nothing in the help's type column for flags: Typer 0.2x prints ``--json <bool>``, as if a
    flag took a value. Only help rendering changes; older Typer has no such method and shows none."""
    from typer.core import TyperOption

    display = getattr(TyperOption, "display_type_rich", None)
    if display is not None:
        def display_type_rich(self: Any, ctx: Any) -> Any:
            return None if self.is_flag else display(self, ctx)

        TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_type_on_flags()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    _state["debug"] = debug


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` on stderr and exit with ``code``.

    Under torchrun (``WORLD_SIZE`` > 1) every process reports its own error: the line names the
    rank (``error: [rank 1 of 2] …``), so the same message twice reads as what it is.
    """
    typer.echo(f"error: {_rank()}{message}", err=True)
    raise typer.Exit(code)


def _rank() -> str:
    """``"[rank 1 of 2] "`` under torchrun (``WORLD_SIZE`` > 1), else ``""``."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')} of {world}] " if world.isdigit() and int(world) > 1 else ""


#: What Gloo / NCCL say on the ranks that were still running when another rank stopped.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and a non-zero exit (tracebacks with --debug).

    Ctrl-C, SIGTERM and SIGHUP all end a command with ``error: interrupted`` / ``error: stopped by
    SIGTERM`` (and what was kept) and the shell's exit code 128 + signal number (130, 143, 129).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .. import interrupts
        from ..errors import RetrofitError

        try:
            with interrupts.stop_signals_interrupt():  # SIGTERM and SIGHUP stop a command as Ctrl-C does
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt as e:
            # a command may say what was kept (finetune: the last completed epoch)
            typer.echo(f"error: {_rank()}{interrupts.describe()}{'; ' + str(e) if str(e) else ''}", err=True)
            raise typer.Exit(interrupts.exit_code())
        except RetrofitError as e:
            if _state["debug"]:
                raise
            fail(str(e).splitlines()[0] if str(e) else "failed")
        except Exception as e:  # anything else is a bug or an environment problem: still one line
            if _state["debug"]:
                raise
            text = str(e).strip().splitlines()
            if _rank() and any(p in str(e) for p in _PEER_GONE):
                fail("another process of the run stopped (its own error line says why)", code=1)
            fail(f"{type(e).__name__}: {text[0] if text else ''} (run with --debug for the traceback)", code=1)

    return wrapper  # type: ignore[return-value]


def parse_ints(text: str | None, what: str) -> list[int] | None:
    """``"3,5,5,7"`` → ``[3, 5, 5, 7]``; a one-line error for anything else (empty items included)."""
    if text is None:
        return None
    items = text.replace(" ", "").split(",")
    try:
        values = [int(v) for v in items]
    except ValueError:
        fail(f"{what} must be integers separated by commas, got {text!r}")
    return values


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``"3,224,224"`` → ``(3, 224, 224)``: three positive integers within :mod:`retrofit.limits`."""
    from ..limits import MAX_CHANNELS, MAX_IMAGE_SIDE

    values = parse_ints(text, "--input-size")
    if values is None:
        return None
    if len(values) == 4:
        fail(f"--input-size is the size of one image, C,H,W (e.g. 3,224,224), got {text!r}: retrofit makes the "
             "batch itself (a batch of 2, or a list of 2 images for a detector)")
    if len(values) != 3 or min(values) < 1:
        fail(f"--input-size takes three positive integers C,H,W (e.g. 3,224,224), got {text!r}")
    if max(values[1:]) > MAX_IMAGE_SIDE or values[0] > MAX_CHANNELS:
        fail(f"--input-size {text!r} is too large (at most {MAX_CHANNELS} channels and "
             f"{MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE})")
    return values[0], values[1], values[2]


def _is(e: BaseException, name: str) -> bool:
    # Typer may vendor click (typer._click) or use click itself: match the class by name.
    return any(c.__name__ == name for c in type(e).__mro__)


def main() -> None:
    """Console-script entry point: usage errors are one ``error:`` line too (exit 2)."""
    args = sys.argv[1:]
    if "--debug" in args[1:]:  # `retrofit add-eca … --debug` means what `retrofit --debug add-eca …` does
        args = ["--debug"] + [a for a in args if a != "--debug"]
    try:
        code = app(args=args, prog_name="retrofit", standalone_mode=False)
    except BrokenPipeError:  # `retrofit ... | head`
        code = 0
    except Exception as e:
        if _is(e, "NoArgsIsHelpError"):
            e.show()  # type: ignore[attr-defined]
            code = 0
        elif _is(e, "UsageError"):
            ctx = getattr(e, "ctx", None)
            path = ctx.command_path if ctx is not None else "retrofit"
            typer.echo(f"error: {e.format_message()} (see {path} --help)", err=True)  # type: ignore[attr-defined]
            code = 2
        elif _is(e, "Abort"):
            typer.echo("error: interrupted", err=True)
            code = 130
        else:
            raise
    code = code if isinstance(code, int) else 0
    if code in (129, 130, 143):
        # After Ctrl-C, SIGHUP or SIGTERM the outputs are already complete (atomic writes); skip interpreter
        # finalization, where a thread the interrupted work left behind can abort the process
        # ("Fatal Python error: PyThreadState_Get", seen in CI) after the one-line message.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
