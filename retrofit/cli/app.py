"""The Typer app, the global ``--debug`` flag, and the one-line error handling every command shares."""

from __future__ import annotations

import functools
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


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    _state["debug"] = debug


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and a non-zero exit (tracebacks with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import RetrofitError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130)
        except RetrofitError as e:
            if _state["debug"]:
                raise
            fail(str(e).splitlines()[0] if str(e) else "failed")
        except Exception as e:  # anything else is a bug or an environment problem: still one line
            if _state["debug"]:
                raise
            text = str(e).strip().splitlines()
            fail(f"{type(e).__name__}: {text[0] if text else ''} (run with --debug for the traceback)", code=1)

    return wrapper  # type: ignore[return-value]


def parse_ints(text: str | None, what: str) -> list[int] | None:
    """``"3,5,5,7"`` → ``[3, 5, 5, 7]``; a one-line error for anything else."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        fail(f"{what} must be integers separated by commas, got {text!r}")
    if not values:
        fail(f"{what} is empty")
    return values


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # `retrofit ... | head`
        sys.exit(0)
