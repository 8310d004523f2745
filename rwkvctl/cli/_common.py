"""Shared CLI plumbing: the Typer app, the console, and turning typed errors into one-line messages."""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from importlib import metadata
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from rwkvctl.errors import RwkvctlError

app = typer.Typer(
    name="rwkvctl",
    help="Prepare data for, train, inspect and run RWKV-5.2 language models (RWKV-LM compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# soft_wrap: a message is one line, however narrow the terminal or log (Rich otherwise hard-wraps at 80 columns
# when output is not a terminal, splitting paths and commands that people copy out of Slurm logs).
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def version_line() -> str:
    """rwkvctl's version and the versions that matter for reproducing a run (read from package metadata,
    so `--version` stays as fast as `--help`: nothing is imported)."""
    from rwkvctl import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    parts = [f"{name} {installed(name)}" for name in ("torch", "deepspeed")]
    return f"rwkvctl {__version__} ({', '.join(parts)}, python {platform.python_version()})"


def _print_version(value: bool) -> None:
    if value:
        console.print(version_line(), highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the versions and exit.")
    ] = False,
) -> None:
    """Prepare data for, train, inspect and run RWKV-5.2 language models (RWKV-LM compatible)."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise. The message is plain text, never markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handles_errors(fn: F) -> F:
    """Decorate a command so errors become one red line and an exit code, never a traceback.

    Typed errors carry their own message. Anything else is a bug or an unforeseen environment problem:
    it still gets one line (type and message) plus how to see the traceback (RWKVCTL_DEBUG=1).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RwkvctlError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise fail(f"{e.strerror or e}{where}", 1) from None
        except MemoryError:
            raise fail("out of memory; use a smaller model/batch or a machine with more RAM", 1) from None
        except Exception as e:
            # exits and usage errors of typer/click (typer may vendor its own click) pass through untouched
            if isinstance(e, (typer.Exit, typer.Abort)) or type(e).__module__.startswith(("click", "typer")):
                raise
            if os.environ.get("RWKVCTL_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = "set RWKVCTL_DEBUG=1 for the traceback"
            raise fail(f"unexpected {type(e).__name__}: {first[:200]} ({hint})", 1) from None

    return wrapper  # type: ignore[return-value]


def human(n: float, unit: str = "") -> str:
    """3 significant digits with a K/M/G/T suffix: 17207296 -> '17.2M'."""
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"
