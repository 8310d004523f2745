"""Chat in RNN mode: turn format and stop rules, the state equals feeding the whole transcript at once, snapshots,
state files, and the CLI (tiny random models with the real World tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from rwkvctl.config import ModelConfig
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.generate import ingest
from rwkvctl.lifecycle.chat import ChatSettings, Conversation, normalize_message
from rwkvctl.model.state import RecurrentState

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=65536, head_size=16)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("world")


@pytest.fixture
def model(random_model):
    return random_model(CFG, seed=3)


class Script:
    """A sampler that replays given token ids (then `\\n\\n` forever), checking each call's logits."""

    def __init__(self, tok, *replies: str) -> None:
        self.tok = tok
        self.queue: list[int] = []
        for r in replies:
            self.queue += tok.encode(r)
        self.given: list[int] = []

    def __call__(self, logits: torch.Tensor) -> int:
        assert logits.shape == (CFG.vocab_size,) and logits[0] == float("-inf")  # end-of-document is banned
        token = self.queue.pop(0) if self.queue else self.tok.encode("\n\n")[0]
        self.given.append(token)
        return token


def assert_same_state(a: RecurrentState, b: RecurrentState) -> None:
    for x, y in zip((a.att_shift, a.ffn_shift, a.wkv), (b.att_shift, b.ffn_shift, b.wkv), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_state_after_turns_equals_feeding_the_transcript_at_once(model, tok) -> None:
    script = Script(tok, " Hi there!\n\n", " Two\nlines", "\n\n")
    conv = Conversation(model, tok, ChatSettings(system="Be brief.", max_reply_tokens=50), sampler=script)
    first = list(conv.say("hello"))
    assert "".join(first) == "Hi there!" and conv.last_reply.stopped == "turn_end"
    second = list(conv.say("more\n\n\nplease"))
    assert "".join(second) == "Two\nlines"
    assert len(second) > 1 and not any(p.endswith("\n") for p in second)  # a newline waits for what follows
    assert conv.transcript == [
        ("System", "Be brief."),
        ("User", "hello"),
        ("Assistant", "Hi there!"),
        ("User", "more\nplease"),
        ("Assistant", "Two\nlines"),
    ]
    # the same tokens through the sequence form in one go
    ids = tok.encode("System: Be brief.\n\nUser: hello\n\nAssistant:")
    n1 = len(tok.encode(" Hi there!\n\n"))
    ids += script.given[:n1] + tok.encode("User: more\nplease\n\nAssistant:") + script.given[n1:]
    logits, state = ingest(model, ids)
    assert_same_state(conv.state, state)
    torch.testing.assert_close(conv.logits, logits, atol=2e-5, rtol=1e-4)
    assert conv.tokens_seen == len(ids)


def test_a_reply_cut_at_max_tokens_still_closes_the_turn(model, tok) -> None:
    script = Script(tok, " word" * 10)
    conv = Conversation(model, tok, ChatSettings(max_reply_tokens=4), sampler=script)
    text = "".join(conv.say("go"))
    assert text == "word word word word" and conv.last_reply.stopped == "max_tokens" and conv.last_reply.tokens == 4
    _, state = ingest(model, tok.encode("User: go\n\nAssistant:") + script.given + tok.encode("\n\n"))
    assert_same_state(conv.state, state)


def test_streamed_pieces_hold_back_newlines_and_split_no_character(model, tok) -> None:
    é = tok.encode("é")
    raw = [tok._trie.encode(bytes([b])).tolist()[0] for b in "é".encode()]  # é as two byte tokens
    assert len(é) == 1 and len(raw) == 2
    script = Script(tok)
    script.queue = tok.encode(" a\n") + raw + tok.encode("\n\n")
    conv = Conversation(model, tok, ChatSettings(), sampler=script)
    pieces = list(conv.say("x"))
    assert "".join(pieces) == "a\né"
    assert pieces[0] == "a" and all("\ufffd" not in p for p in pieces)  # "\n" waited for the next character


def test_retry_reset_and_cancel_restore_snapshots(model, tok) -> None:
    script = Script(tok, " first\n\n", " second\n\n")
    conv = Conversation(model, tok, ChatSettings(system="Hi."), sampler=script)
    start = conv.state.clone()
    list(conv.say("q"))
    assert "".join(conv.retry()) == "second"
    assert [r for r, _ in conv.transcript] == ["System", "User", "Assistant"]
    assert conv.transcript[-1] == ("Assistant", "second")
    first_len = len(tok.encode(" first\n\n"))
    _, state = ingest(model, tok.encode("System: Hi.\n\nUser: q\n\nAssistant:") + script.given[first_len:])
    assert_same_state(conv.state, state)
    conv.reset()
    assert_same_state(conv.state, start)
    assert conv.transcript == [("System", "Hi.")]
    with pytest.raises(ConfigError, match="nothing to retry"):
        conv.retry()
    script.queue = tok.encode(" one two three four\n\n")
    pieces = conv.say("again")
    assert next(pieces) == "one"  # the turn is open: a reply is being generated
    with pytest.raises(ConfigError, match="still being generated"):
        conv.save("unused.safetensors")
    conv.cancel()
    assert_same_state(conv.state, start)
    assert conv.transcript == [("System", "Hi.")] and conv.tokens_seen == len(tok.encode("System: Hi.\n\n"))
    del pieces  # closing the abandoned iterator later must not touch the conversation
    assert conv.transcript == [("System", "Hi.")]
    with pytest.raises(ConfigError, match="empty"):
        conv.say(" \n\n ")


def test_abandoned_or_failed_replies_leave_no_half_turn(model, tok) -> None:
    script = Script(tok, " a b c d e f\n\n")
    conv = Conversation(model, tok, ChatSettings(), sampler=script)
    pieces = conv.say("first")
    next(pieces)
    del pieces  # dropped midway: the generator closes and the turn is undone
    assert conv.state is None and conv.transcript == [] and conv.tokens_seen == 0
    script.queue = tok.encode(" fine\n\n")
    list(conv.say("second"))
    assert [r for r, _ in conv.transcript] == ["User", "Assistant"] and conv.transcript[1][1] == "fine"
    after_second = conv.state.clone()

    def broken(logits: torch.Tensor) -> int:
        raise RuntimeError("sampler failed")

    conv._sample = broken
    with pytest.raises(RuntimeError, match="sampler failed"):
        list(conv.say("third"))
    assert_same_state(conv.state, after_second)
    assert [r for r, _ in conv.transcript] == ["User", "Assistant"]


def test_a_reply_is_closed_with_only_the_missing_newlines(model, tok) -> None:
    script = Script(tok)
    script.queue = tok.encode(" ab\n") * 5
    conv = Conversation(model, tok, ChatSettings(max_reply_tokens=len(tok.encode(" ab\n"))), sampler=script)
    assert "".join(conv.say("go")) == "ab"
    _, state = ingest(model, tok.encode("User: go\n\nAssistant:") + script.given + tok.encode("\n"))
    assert_same_state(conv.state, state)


def test_saved_state_continues_exactly(model, tok, tmp_path: Path) -> None:
    conv = Conversation(model, tok, ChatSettings(system="Hi."), sampler=Script(tok, " 42\n\n", " it was 42\n\n"))
    list(conv.say("remember the number 42"))
    path = conv.save(tmp_path / "s.safetensors")
    loaded = Conversation(model, tok, ChatSettings(), sampler=Script(tok, " it was 42\n\n"))
    loaded.load(path)
    assert_same_state(loaded.state, conv.state)
    assert torch.equal(loaded.logits, conv.logits)
    assert loaded.transcript == conv.transcript and loaded.tokens_seen == conv.tokens_seen
    assert "".join(conv.say("what was it?")) == "".join(loaded.say("what was it?")) == "it was 42"
    assert_same_state(loaded.state, conv.state)
    loaded.reset()  # a loaded state is the new start
    assert loaded.transcript == conv.transcript[:3]


def test_bad_state_files_are_one_line_errors(model, tok, tmp_path: Path, random_model) -> None:
    conv = Conversation(model, tok, ChatSettings(max_reply_tokens=2))
    with pytest.raises(ConfigError, match="nothing to save"):
        conv.save(tmp_path / "empty.safetensors")
    list(conv.say("hi"))
    good = conv.save(tmp_path / "s.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="t.safetensors: unreadable"):
        conv.load(truncated)
    with pytest.raises(CheckpointError, match="no such state file"):
        conv.load(tmp_path / "missing.safetensors")
    other = Conversation(random_model(ModelConfig(n_layer=3, n_embd=32, vocab_size=65536, head_size=16)), tok)
    with pytest.raises(CheckpointError, match="n_layer=2, this model has n_layer=3"):
        other.load(good)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not an rwkvctl state file"):
        conv.load(tmp_path / "foreign.safetensors")
    # a failed save leaves the previous file intact
    before = good.read_bytes()
    conv.state.wkv.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        conv.save(good)
    assert good.read_bytes() == before


def test_long_messages_are_fed_in_chunks_with_the_same_result(model, tok) -> None:
    ids = tok.encode("a long message " * 40)
    logits_a, state_a = ingest(model, ids, chunk_len=7)
    logits_b, state_b = ingest(model, ids, chunk_len=1000)
    torch.testing.assert_close(logits_a, logits_b, atol=2e-5, rtol=1e-4)
    assert_same_state(state_a, state_b)


def test_settings_and_message_rules() -> None:
    assert normalize_message("  a\r\n\r\nb\n\n\nc  ") == "a\nb\nc"
    with pytest.raises(ConfigError, match="role name"):
        ChatSettings(user="Us:er")
    with pytest.raises(ConfigError, match="at least 1"):
        ChatSettings(max_reply_tokens=0)


# --- CLI ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(model, tmp_path: Path) -> Path:
    from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint

    return save_checkpoint(tmp_path / "tiny.pth", model.state_dict(), CheckpointMeta(model=CFG))


def _run(args: list[str], stdin: str | None = None) -> Result:
    from rwkvctl.cli import app

    return CliRunner().invoke(app, args, input=stdin)


def test_cli_messages_and_saved_state(checkpoint: Path, tmp_path: Path) -> None:
    state = tmp_path / "conv.safetensors"
    res = _run(["chat", str(checkpoint), "-m", "Hello!", "-m", "And now?", "--max-tokens", "5", "--seed", "0",
                "--save-state", str(state)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.output.count("User:") == 2 and res.output.count("Assistant:") == 2
    assert "2 replies" in res.output and "(constant)" in res.output and state.is_file()
    res = _run(["chat", str(checkpoint), "--load-state", str(state), "-m", "Third", "--max-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "continuing from" in res.output


def test_cli_seeded_replies_equal_the_conversation_api_and_repeat(checkpoint: Path, model, tok, monkeypatch) -> None:
    """The chat options reach the conversation unchanged (the settings the command builds are captured and compared):
    scripted turns with a seed print the replies the Conversation API gives with the same settings, the same seed
    repeats them and another seed changes them."""
    from rwkvctl.generate import Penalties, SamplingConfig
    from rwkvctl.lifecycle import chat

    settings = ChatSettings(sampling=SamplingConfig(temperature=0.8, top_p=0.6, top_k=30), max_reply_tokens=6,
                            seed=4, penalties=Penalties(presence=0.2, frequency=0.5, decay=0.99))  # fmt: skip
    conv = Conversation(model, tok, settings)
    replies = ["".join(conv.say(message)) for message in ("Hello!", "And now?")]
    built: list[ChatSettings] = []
    real_init = chat.Conversation.__init__

    def recording_init(self, model, tokenizer, settings=None, *args, **kwargs):
        built.append(settings)
        real_init(self, model, tokenizer, settings, *args, **kwargs)

    monkeypatch.setattr(chat.Conversation, "__init__", recording_init)
    argv = ["chat", str(checkpoint), "-m", "Hello!", "-m", "And now?", "--max-tokens", "6", "--temperature", "0.8",
            "--top-p", "0.6", "--top-k", "30", "--presence", "0.2", "--frequency", "0.5", "--decay", "0.99",
            "--seed"]  # fmt: skip
    runs = [_run([*argv, seed]) for seed in ("4", "4", "5")]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    assert built[0] == settings
    assert all(replies)
    first = runs[0].output
    at = [first.index(f"User: {m}\nAssistant: {r}\n") for m, r in zip(("Hello!", "And now?"), replies, strict=True)]
    assert at == sorted(at)  # each reply printed whole, after its own message
    transcript = first[: first.index("2 replies")]  # the summary line that follows carries a speed
    assert runs[1].output.startswith(transcript) and not runs[2].output.startswith(transcript)


def test_cli_interactive_commands(checkpoint: Path, tmp_path: Path) -> None:
    saved = tmp_path / "s.safetensors"
    stdin = f"hi\n/info\n/retry\n/save {saved}\n/load {tmp_path / 'nope.safetensors'}\n/bogus\n/reset\nbye\n/quit\n"
    res = _run(["chat", str(checkpoint), "--max-tokens", "4", "--seed", "1"], stdin)
    assert res.exit_code == 0, res.output
    assert "tokens seen" in res.output and saved.is_file()
    assert "no such state file" in res.output  # the error is reported and the chat goes on
    assert "unknown command /bogus" in res.output and "back to the start" in res.output
    assert "3 replies" in res.output


def test_cli_bad_input_is_one_line(checkpoint: Path, tmp_path: Path, random_model) -> None:
    res = _run(["chat", str(tmp_path / "missing.pth"), "-m", "x"])
    assert res.exit_code != 0 and "Traceback" not in res.output and "missing.pth" in res.output
    res = _run(["chat", str(checkpoint), "-m", "x", "--top-p", "0"])
    assert res.exit_code == 2 and "--top-p" in res.output
    from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint

    small = tmp_path / "small.pth"
    cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=256, head_size=16)
    save_checkpoint(small, random_model(cfg).state_dict(), CheckpointMeta(model=cfg))
    res = _run(["chat", str(small), "-m", "x"])
    assert res.exit_code == 2 and "256 vocabulary rows" in res.output and "Traceback" not in res.output


def test_cli_never_passes_control_characters_to_the_terminal(checkpoint: Path, tmp_path: Path) -> None:
    from rwkvctl.cli.terminal import clean

    assert clean("\x1b]0;title\x07red\tok\n\x7f") == "\u241b]0;title\u2407red\tok\n\u2421"
    res = _run(["chat", str(checkpoint), "-m", "hi \x1b[2J :smile:", "--max-tokens", "2"])
    assert res.exit_code == 0 and "\x1b[2J" not in res.output and ":smile:" in res.output
    res = _run(["chat", str(checkpoint), "--system", "x", "--load-state", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2 and "--system" in res.output
    res = _run(["chat", str(checkpoint), "-m", "x", "--temperature", "nan"])
    assert res.exit_code == 2 and "finite" in res.output


def test_streamed_replies_and_role_names_never_pass_control_characters(monkeypatch) -> None:
    """The streaming print path on its own (a plain Rich console, no safety net): C1 CSI, OSC and ESC from the model
    or the role name arrive as visible stand-ins."""
    import io
    import re
    from types import SimpleNamespace

    from rich.console import Console

    import rwkvctl.cli.chat as chat_cli

    terminal = io.StringIO()
    monkeypatch.setattr(chat_cli, "console", Console(file=terminal, force_terminal=True, width=200))
    reply = SimpleNamespace(tokens=2, seconds=0.5, stopped="turn_end")
    conv = SimpleNamespace(settings=SimpleNamespace(bot="Bot\x1b[31m[x]"), last_reply=reply, cancel=lambda: None)
    stats = {"turns": 0, "tokens": 0, "seconds": 0.0}
    assert chat_cli._print_reply(conv, iter(["ok\u009b2J", " \x1b]0;pwned\x07", "\u202edone"]), stats)
    out = re.sub("\x1b\\[[0-9;]*m", "", terminal.getvalue())  # Rich's own colours
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out
    assert out == "Bot\u241b[31m[x]: ok<U+009B>2J \u241b]0;pwned\u2407<U+202E>done\n" and stats["turns"] == 1


def test_inspect_shows_a_state_file(checkpoint: Path, tmp_path: Path) -> None:
    state = tmp_path / "conv.safetensors"
    saved = _run(["chat", str(checkpoint), "-m", "Hi there", "--max-tokens", "3", "--save-state", str(state)])
    assert saved.exit_code == 0, saved.output
    res = _run(["inspect", str(state)])
    assert res.exit_code == 0, res.output
    assert "chat state" in res.output and "tokens seen" in res.output and "Hi there" in res.output


def test_inspect_cleans_role_names_and_transcripts_of_a_state_file(checkpoint: Path, tmp_path: Path) -> None:
    import re

    state = tmp_path / "conv.safetensors"
    hostile = "U\x1b]0;pwned\x07\u009b2J"
    argv = ["chat", str(checkpoint), "-m", f"say {hostile}", "--user", hostile, "--max-tokens", "2", "--save-state"]
    saved = _run([*argv, str(state)])
    assert saved.exit_code == 0 and "\x1b]0" not in saved.output and "\x9b" not in saved.output, saved.output
    res = _run(["inspect", str(state)])
    assert res.exit_code == 0, res.output
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", res.output) and res.output.count("\u241b]0;pwned") >= 2


def test_chat_and_generate_check_the_device_first(checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for cmd in (["chat", str(checkpoint), "-m", "hi"], ["generate", str(checkpoint), "-p", "hi"]):
        res = _run([*cmd, "--device", "cuda"])
        assert res.exit_code == 2 and "--device='cuda'" in res.output and "Traceback" not in res.output
        res = _run([*cmd, "--device", "tpu"])
        assert res.exit_code == 2 and "--device='tpu'" in res.output and "cpu, cuda" in res.output


def test_non_finite_logits_end_the_reply_and_keep_the_state(model, tok) -> None:
    from rwkvctl.errors import NumericsError
    from rwkvctl.generate import SamplingConfig, sample

    conv = Conversation(model, tok, ChatSettings(), sampler=Script(tok, " fine\n\n"))
    list(conv.say("first"))
    before, transcript = conv.state.clone(), list(conv.transcript)
    real_step = conv.model.step

    def overflowing(tokens, state):  # the second token of the reply comes out of an overflowed forward pass
        logits, state = real_step(tokens, state)
        return torch.full_like(logits, float("nan")), state

    conv._sample = lambda logits: sample(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    conv.model.step = overflowing
    with pytest.raises(NumericsError, match="non-finite logits"):
        list(conv.say("second"))
    assert_same_state(conv.state, before)
    assert conv.transcript == transcript
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NumericsError):
            sample(torch.tensor([0.0, bad, 1.0]), SamplingConfig())
    assert sample(torch.tensor([float("-inf"), 2.0, float("-inf")]), SamplingConfig()) == 1  # bans are fine


def test_a_checkpoint_with_a_nan_weight_is_refused_on_load(model, tmp_path: Path) -> None:
    from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvctl.lifecycle.models import load_model

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["blocks.1.ffn.key.weight"][3, 5] = float("nan")
    for suffix in (".pth", ".safetensors"):
        path = save_checkpoint(tmp_path / f"bad{suffix}", weights, CheckpointMeta(model=CFG))
        with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.key\.weight holds 1 NaN/Inf value"):
            load_model(path)
        res = _run(["chat", str(path), "-m", "hi"])
        assert res.exit_code == 2 and "NaN/Inf" in res.output and "Traceback" not in res.output
