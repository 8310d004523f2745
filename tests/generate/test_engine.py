"""The inference engine: its decode loop equals a plain sample-then-step loop, a batch equals its rows run alone,
stop rules hold text back and end rows independently, and a finished row's state holds everything it said."""

from __future__ import annotations

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.errors import ConfigError, NumericsError
from rwkvctl.generate import (
    DecodeSettings,
    InferenceEngine,
    Penalties,
    PenaltyTracker,
    SamplingConfig,
    generate,
    ingest,
    sample,
)
from rwkvctl.model.state import RecurrentState

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=65536, head_size=16)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("world")


@pytest.fixture
def model(random_model):
    return random_model(CFG, seed=5)


@pytest.fixture
def engine(model, tok):
    return InferenceEngine(model, tok)


def plain_decode(model, prompt, settings: DecodeSettings, tok) -> list[int]:
    """The oracle: the simplest loop (ingest, then sample -> step one token at a time), no engine involved."""
    generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
    penalties = PenaltyTracker(settings.penalties, exempt=lambda t: tok.decode([t]) in " \t0123456789"
                               and tok.decode([t]) != "")
    logits, state = ingest(model, prompt)
    out: list[int] = []
    with torch.no_grad():
        while len(out) < settings.max_tokens:
            row = penalties.apply_(logits.float().clone())
            row[list(settings.banned_tokens)] = float("-inf")
            token = sample(row, settings.sampling, generator)
            if token in settings.stop_tokens:
                break
            penalties.update(token)
            out.append(token)
            step_logits, state = model.step(torch.tensor([token]), state)
            logits = step_logits[0]
    return out


SETTINGS = [
    DecodeSettings(SamplingConfig(temperature=1.0, top_p=0.9), max_tokens=12, seed=1),
    DecodeSettings(SamplingConfig(temperature=0.7, top_p=0.5, top_k=40), Penalties(0.4, 0.4, 0.99), max_tokens=9,
                   seed=2, banned_tokens=(0, 11)),
    DecodeSettings(SamplingConfig(temperature=0), max_tokens=7),
    DecodeSettings(SamplingConfig(temperature=1.3, top_p=1.0), Penalties(0.0, 1.0, 0.996), max_tokens=15, seed=3),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["top-p", "penalties+bans", "greedy", "frequency"])
def test_engine_equals_a_plain_sample_then_step_loop(engine, model, tok, settings) -> None:
    prompt = tok.encode("The quick brown fox")
    gen = engine.start(prompt, settings)
    list(engine.run([gen]))
    assert gen.tokens == plain_decode(model, prompt, settings, tok)
    assert gen.finish_reason == "length" and len(gen.tokens) == settings.max_tokens


def test_batched_decode_equals_each_row_alone_with_rows_joining_and_leaving(engine, tok) -> None:
    prompts = [tok.encode(p) for p in ("Once upon a time", "def f(x):", "1, 2, 3,", "Hello")]
    alone = []
    for prompt, settings in zip(prompts, SETTINGS, strict=True):
        gen = engine.start(prompt, settings)
        list(engine.run([gen]))
        alone.append(gen)
    rows = [engine.start(p, s) for p, s in zip(prompts[:3], SETTINGS[:3], strict=True)]
    for _ in range(3):
        engine.step(rows)
    rows.append(engine.start(prompts[3], SETTINGS[3]))  # joins a running batch
    list(engine.run(rows))
    for a, b in zip(alone, rows, strict=True):
        assert b.tokens == a.tokens and b.text == a.text and b.finish_reason == a.finish_reason
        torch.testing.assert_close(b.state.wkv, a.state.wkv, atol=1e-5, rtol=1e-4)


def test_finished_state_holds_the_prompt_and_every_emitted_token(engine, model, tok) -> None:
    prompt = tok.encode("A B C")
    gen = engine.start(prompt, DecodeSettings(SamplingConfig(temperature=1.0), max_tokens=6, seed=4))
    list(engine.run([gen]))
    logits, state = ingest(model, prompt + gen.tokens)
    for x, y in zip((gen.state.att_shift, gen.state.wkv), (state.att_shift, state.wkv), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gen.logits, logits, atol=1e-4, rtol=1e-4)


class Replay:
    """A sampler that returns the token ids of given texts in order."""

    def __init__(self, tok, text: str) -> None:
        self.ids = tok.encode(text)

    def __call__(self, logits) -> int:
        return self.ids.pop(0)


def test_stop_text_is_held_back_and_never_shown(engine, tok) -> None:
    settings = DecodeSettings(max_tokens=50, stop_texts=("END", "\n\n"))
    gen = engine.start(tok.encode("x"), settings, sampler=Replay(tok, "abc EN more E\nxENDtail"))
    pieces = [p.text for p in engine.run([gen])]
    assert "".join(pieces) == "abc EN more E\nx" == gen.text
    assert gen.finish_reason == "stop" and not any("END" in p for p in pieces)


def test_stop_token_ends_without_being_fed_and_releases_held_text(engine, tok) -> None:
    ids = tok.encode("ab E") + [0]
    sampler = iter(ids)
    gen = engine.start(tok.encode("x"), DecodeSettings(max_tokens=50, stop_texts=("END",), stop_tokens=(0,)),
                       sampler=lambda logits: next(sampler))
    pieces = list(engine.run([gen]))
    assert "".join(p.text for p in pieces) == "ab E" and gen.finish_reason == "stop"
    assert pieces[-1].token is None and gen.tokens == ids[:-1]
    _, state = ingest(engine.model, tok.encode("x") + gen.tokens)
    torch.testing.assert_close(gen.state.wkv, state.wkv, atol=2e-5, rtol=1e-4)


def test_a_non_finite_row_ends_alone(engine, tok) -> None:
    good = engine.start(tok.encode("a"), DecodeSettings(max_tokens=5, seed=0))
    bad = engine.start(tok.encode("b"), DecodeSettings(max_tokens=5, seed=0))
    bad.logits = torch.full_like(bad.logits, float("nan"))
    list(engine.run([good, bad]))
    assert bad.finish_reason == "error" and isinstance(bad.error, NumericsError) and bad.tokens == []
    assert good.finish_reason == "length" and len(good.tokens) == 5
    with pytest.raises(NumericsError):
        list(engine.generate((), DecodeSettings(max_tokens=3), state=bad.state, logits=bad.logits))


def test_padded_vocabulary_rows_are_never_sampled(tok, random_model) -> None:
    padded = random_model(ModelConfig(n_layer=1, n_embd=32, vocab_size=65600, head_size=16), seed=0)
    engine = InferenceEngine(padded, tok)
    seen = []
    gen = engine.start(tok.encode("a"), DecodeSettings(max_tokens=2),
                       sampler=lambda logits: seen.append(logits) or 5)
    list(engine.run([gen]))
    assert all(bool(torch.isneginf(row[tok.vocab_size :]).all()) for row in seen)


def test_ids_only_generate_matches_the_engine(model, tok) -> None:
    prompt = tok.encode("Numbers:")
    settings = DecodeSettings(SamplingConfig(temperature=0.9, top_p=0.8), max_tokens=8, seed=7, stop_tokens=(0,))
    ids = list(generate(model, prompt, 8, settings.sampling, seed=7))
    assert ids == plain_decode(model, prompt, settings, tok)


def test_bad_settings_and_nothing_to_continue_are_refused(engine) -> None:
    for bad in (dict(max_tokens=0), dict(sampling=SamplingConfig(temperature=float("nan"))),
                dict(sampling=SamplingConfig(top_p=0)), dict(penalties=Penalties(decay=0))):
        with pytest.raises(ConfigError):
            DecodeSettings(**bad)
    with pytest.raises(ConfigError, match="nothing to continue"):
        engine.start((), DecodeSettings())


def test_state_rows_and_cat_round_trip() -> None:
    state = RecurrentState.zeros(CFG, 3)
    state.wkv.normal_()
    back = RecurrentState.cat([state.rows(i) for i in range(3)])
    assert back.batch == 3 and torch.equal(back.wkv, state.wkv)
