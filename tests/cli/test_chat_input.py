"""Chat input like a shell: history on the arrow keys, multi-line messages (Esc-Enter, paste, trailing backslash),
driven through prompt_toolkit's own pipe input; piped (non-terminal) input keeps the backslash continuation."""

import io

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from rwkvctl.cli.chat_input import MessageReader

UP = "\x1b[A"


@pytest.fixture
def terminal():
    with create_pipe_input() as pipe:
        yield pipe, MessageReader(Console(file=io.StringIO()), pt_input=pipe, pt_output=DummyOutput())


def test_history_is_on_the_arrow_keys(terminal):
    pipe, reader = terminal
    pipe.send_text("first message\r")
    assert reader.read("User: ", "User:") == "first message"
    pipe.send_text("second\r")
    assert reader.read("User: ", "User:") == "second"
    pipe.send_text(UP + UP + "\r")  # two back: the first message again
    assert reader.read("User: ", "User:") == "first message"
    pipe.send_text("abc\x1b[D\x1b[DX\r")  # left arrow twice, insert: line editing
    assert reader.read("User: ", "User:") == "aXbc"


def test_multi_line_messages(terminal):
    pipe, reader = terminal
    pipe.send_text("line one\x1b\rline two\r")  # Esc-Enter inserts a newline, Enter sends
    assert reader.read("User: ", "User:") == "line one\nline two"
    pipe.send_text("\x1b[200~pasted\nparagraph\x1b[201~\r")  # a bracketed paste keeps its newlines
    assert reader.read("User: ", "User:") == "pasted\nparagraph"
    pipe.send_text("first \\\rsecond\r")  # a trailing backslash continues
    assert reader.read("User: ", "User:") == "first \nsecond"


def test_piped_input_continues_with_a_backslash(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("one\\\ntwo\nthree\n"))
    reader = MessageReader(Console(file=io.StringIO()))
    assert not reader.echoes
    assert reader.read("User: ", "User:") == "one\ntwo"
    assert reader.read("User: ", "User:") == "three"
    with pytest.raises(EOFError):
        reader.read("User: ", "User:")
