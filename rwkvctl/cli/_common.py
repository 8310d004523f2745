"""Shared CLI plumbing: the Typer app, the console, and turning typed errors and usage errors into one-line
messages."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, ConsoleDimensions, ConsoleOptions, RenderableType
from rich.segment import Segment
from typer.core import TyperGroup

from rwkvctl.cli.terminal import clean_segments, one_line, shown
from rwkvctl.errors import RwkvctlError
from rwkvctl.names import canonical


class Commands(TyperGroup):
    """The root command group: a usage error anywhere below it (a bad flag or value, a missing argument, an
    unknown command) is one red line and exit code 2, like every other error, instead of Typer's usage box.
    Parsing happens in `make_context` (this group's options) and in `invoke` (the sub-commands'), so both are
    wrapped; `--help` and the no-arguments help exit before either raises."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


app = typer.Typer(
    cls=Commands,
    name="rwkvctl",
    help="Prepare data for, train, inspect and run RWKV-5.2 language models (RWKV-LM compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
LOG_WIDTH = 4096  # "never wrap" for output that is not a terminal; tables stay as wide as their content


class LogFriendlyConsole(Console):
    """Rich's console, except that output which is not a terminal (a log file, a pipe, Slurm, CI) is never
    hard-wrapped: Rich would wrap at 80 columns (or $COLUMNS) there, splitting the paths and commands people copy
    out of logs. Messages are soft-wrapped everywhere (one line each, however narrow the terminal). Everything
    printed is cleaned of control characters (cli/terminal.py): Rich's own styles and cursor moves still work, but
    text from a file or the model can never send the terminal an escape sequence."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._explicit_width = kwargs.get("width") is not None  # Rich also sets _width from $COLUMNS

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self.is_terminal or getattr(self, "_explicit_width", False):
            return dims
        return ConsoleDimensions(LOG_WIDTH, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        return clean_segments(super().render(renderable, options))


console = LogFriendlyConsole(soft_wrap=True)
err_console = LogFriendlyConsole(stderr=True, soft_wrap=True)


class LogTicker:
    """When output is not a terminal, progress is a plain line now and then instead of a redrawn bar: `due()` says
    when (every RWKVCTL_LOG_EVERY seconds, default 30; 0 prints every update)."""

    def __init__(self) -> None:
        try:
            self.every = max(0.0, float(os.environ.get("RWKVCTL_LOG_EVERY", "30")))
        except ValueError:
            self.every = 30.0
        self.last = -math.inf

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            return True
        return False


def live_output() -> bool:
    """Redrawn progress bars only on a terminal; logs get periodic lines (LogTicker)."""
    return console.is_terminal and not console.is_dumb_terminal

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


def print_error(message: str) -> None:
    """The red `error:` line. The message is plain text, never markup; it often quotes a file's content (a key,
    a field, a path), so it is cleaned of control characters and kept to one line here, once for every error."""
    err_console.print(f"[bold red]error:[/] {shown(one_line(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    print_error(message)
    return typer.Exit(code)


def _is_usage_error(e: BaseException) -> bool:
    """A click usage error (unknown flag, bad value, missing argument), whether typer vendors click or not; the
    no-arguments help that click raises as one is not an error."""
    names = {c.__name__ for c in type(e).__mro__ if c.__module__.startswith(("click", "typer"))}
    return "UsageError" in names and "NoArgsIsHelpError" not in names


def usage_message(e: Any) -> str:
    """One line for a usage error: `--max-steps: <why> (see rwkvctl train --help)`."""
    names = {c.__name__ for c in type(e).__mro__}
    param = getattr(e, "param", None)
    if "BadParameter" in names and "MissingParameter" not in names and (e.param_hint or param is not None):
        hint = e.param_hint
        if hint is None:  # an option by its flags, an argument by its name
            hint = param.opts if getattr(param, "param_type_name", "") == "option" else param.name
        hint = hint if isinstance(hint, str) else " / ".join(hint)
        message = f"{hint}: {_lower_first(e.message)}"
    else:
        message = _lower_first(e.format_message())
    message = one_line(message).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.help_option_names:
        message += f" (see {ctx.command_path} {ctx.help_option_names[0]})"
    return message


def _lower_first(text: str) -> str:
    """'No such option' -> 'no such option', like every other error line (an acronym such as 'IO' stays)."""
    return text[0].lower() + text[1:] if text[:2].istitle() else text


@contextlib.contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    try:
        yield
    except Exception as e:
        if not _is_usage_error(e):
            raise
        raise fail(usage_message(e), getattr(e, "exit_code", 2)) from None


def one_spelling(kind: str, value: str, flag: str) -> str:
    """The one spelling of an option's dtype/init value (rwkvctl.names); an old spelling still works for one
    release and prints a one-line deprecation notice."""
    spelling = canonical(kind, value)
    notice = spelling.notice(flag)
    if notice:
        err_console.print(f"[yellow]deprecated:[/] {shown(notice)}", highlight=False, soft_wrap=True)
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


# Options every command that runs a model for inference shares (chat, generate, serve).
TokenizerOption = Annotated[
    str | None, typer.Option(help="'world' or spm:PATH; default: the one recorded with the model (else World).")
]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DtypeOption = Annotated[str, typer.Option(help="fp32, bf16 or fp16 (fp16 needs a GPU).")]
KeepQuantizedOption = Annotated[
    bool, typer.Option("--keep-quantized", help="Keep a quantized model's weights packed (less memory).")
]
