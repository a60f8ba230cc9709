"""`circuitctl`: the Typer app, global options and the one place errors become exit codes.

User errors (`UsageError`, bad arguments) print one line-oriented message and exit 2;
internal errors exit 1 with a short message (the traceback only with --debug).
"""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer
from rich.console import Console
from rich.markup import escape

from circuitctl.errors import InterruptedRun, UsageError

# Typer >= 0.20 vendors click (its exceptions are not click's); catch either kind.
try:
    from typer.exceptions import TyperException as _TyperError
except ImportError:  # older Typer raises click's own exceptions
    _TyperError = click.ClickException
_EXIT = (click.exceptions.Exit, typer.Exit)
_CLICK_ERRORS = (click.ClickException, _TyperError)
_ABORT = (click.exceptions.Abort, typer.Abort)

app = typer.Typer(
    name="circuitctl",
    help="Automated circuit discovery for transformer language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, highlight=False)
state = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks for errors"),
) -> None:
    state["debug"] = debug


def _register() -> None:
    # Importing a command module registers it; none of them imports torch at import time.
    from circuitctl.cli import discover, doctor, evaluate, info, validate  # noqa: F401
    from circuitctl.cli import intervene, train_sae, view  # noqa: F401
    from circuitctl.cli import explain  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    state["debug"] = "--debug" in args
    try:
        code = command.main(args=args, prog_name="circuitctl", standalone_mode=False)
        if isinstance(code, int) and code:  # newer Typer returns exit codes (130 for Ctrl-C) instead of raising
            if code == 130:
                err_console.print("interrupted")
            sys.exit(code)
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except _CLICK_ERRORS as exc:  # bad arguments, unknown commands and options
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else 2)
    except _ABORT:
        err_console.print("aborted")
        sys.exit(130)
    except UsageError as exc:
        if state["debug"]:
            traceback.print_exc()
        _print_error(exc)
    except InterruptedRun as exc:
        err_console.print(f"[bold yellow]interrupted:[/] {escape(printable(str(exc)))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug in circuitctl, or a write to a full disk outside write_atomic
        from circuitctl.io.files import storage_error

        if state["debug"]:
            traceback.print_exc()
        full = storage_error(exc)
        if full is not None:
            _print_error(full)
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(printable(str(exc)))}\n"
            "this is a bug in circuitctl; rerun with --debug for the traceback",
            soft_wrap=True,
        )
        sys.exit(1)


def _print_error(exc: UsageError) -> None:
    """One message for a user error, and its exit code. Messages quote user input (file names,
    task labels) and are printed as text, never as rich markup."""
    err_console.print(f"[bold red]error:[/] {escape(printable(str(exc)))}", markup=True, soft_wrap=True)
    sys.exit(exc.exit_code)


def printable(text: str) -> str:
    """`text` with control characters (a terminal escape sequence in a file name) shown as escapes."""
    return "".join(ch if ch in "\n\t" or ch.isprintable() else ascii(ch)[1:-1] for ch in text)
