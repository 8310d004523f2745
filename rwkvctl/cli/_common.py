"""Shared CLI plumbing: the Typer app, the console, and turning typed errors into one-line messages."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from rwkvctl.errors import RwkvctlError
from rwkvctl.names import canonical

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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise. The message is plain text, never markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def one_spelling(kind: str, value: str, flag: str) -> str:
    """The one spelling of an option's dtype/init value (rwkvctl.names); an old spelling still works for one
    release and prints a one-line deprecation notice."""
    spelling = canonical(kind, value)
    notice = spelling.notice(flag)
    if notice:
        err_console.print(f"[yellow]deprecated:[/] {escape(notice)}", highlight=False, soft_wrap=True)
    return spelling.name


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
