"""Reading chat messages like a shell: line editing, history on the arrow keys, and multi-line messages.

On a terminal, prompt_toolkit does the editing (arrows, Home/End, Ctrl-R search, Up/Down through this session's
messages). The history is kept in memory only: chats can be private, so nothing is written to disk. A message can
span lines three ways: paste it (a bracketed paste keeps its newlines), press Esc then Enter (or Alt-Enter) for a
new line, or end a line with a backslash to continue on the next (this one also works for piped input).
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

CONTINUATION = "... "


class MessageReader:
    """`read(label)` -> one message (EOFError at the end of input, KeyboardInterrupt on Ctrl-C)."""

    def __init__(self, console: Console, *, pt_input: Any = None, pt_output: Any = None) -> None:
        self.console = console
        self.session: Any = None
        interactive = pt_input is not None or (sys.stdin.isatty() and sys.stdout.isatty())
        if interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory
            from prompt_toolkit.key_binding import KeyBindings

            keys = KeyBindings()

            @keys.add("escape", "enter")
            def _newline(event: Any) -> None:  # Esc-Enter / Alt-Enter: a new line inside the message
                event.current_buffer.insert_text("\n")

            self.session = PromptSession(history=InMemoryHistory(), key_bindings=keys, input=pt_input,
                                         output=pt_output, enable_history_search=False)  # fmt: skip

    @property
    def echoes(self) -> bool:
        """Whether the reader shows what was typed (piped input is not echoed by anything)."""
        return self.session is not None

    def _line(self, label: str, plain_label: str) -> str:
        if self.session is not None:
            from prompt_toolkit.formatted_text import ANSI

            return str(self.session.prompt(ANSI(f"\x1b[1;32m{plain_label}\x1b[0m ")))
        return self.console.input(label)

    def read(self, label: str, plain_label: str) -> str:
        """label: the Rich-markup prompt (plain input); plain_label: the same text without markup (terminal)."""
        lines = [self._line(label, plain_label)]
        while lines[-1].endswith("\\"):  # an explicit continuation: drop the backslash, read the next line
            lines[-1] = lines[-1][:-1]
            lines.append(self._line(CONTINUATION, CONTINUATION.rstrip()))
        return "\n".join(lines)
