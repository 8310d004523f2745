import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.errors import NumericsError
from rwkvctl.generate import Penalties, PenaltyTracker, SamplingConfig, TextStream, generate, sample
from rwkvctl.generate.sampling import nucleus_cutoff


def test_greedy_and_top_k_top_p():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample(logits, SamplingConfig(temperature=0)) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingConfig(top_k=2, top_p=1.0), g) for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample(logits, SamplingConfig(top_p=0.3), g) for _ in range(50)}
    assert draws == {1}


def test_generate_matches_greedy_sequence_forward(random_model):
    model = random_model(ModelConfig(n_layer=2, n_embd=64, vocab_size=97, head_size=32))
    prompt = [3, 14, 15]
    out = list(generate(model, prompt, 8, SamplingConfig(temperature=0), stop_tokens=()))
    # recompute greedily with the parallel form over the growing sequence
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_penalties_follow_chatrwkv_rules():
    tracker = PenaltyTracker(Penalties(presence=0.5, frequency=1.0, decay=0.5), exempt=lambda t: t == 3)
    for token in (1, 1, 3):
        tracker.update(token)
    # token 1: weights 1 -> 0.5 + 1 = 1.5 -> 0.75 after the third step; token 3: presence only (weight 0)
    logits = tracker.apply_(torch.zeros(5))
    assert torch.allclose(logits, torch.tensor([0.0, -(0.5 + 0.75), 0.0, -0.5, 0.0]))
    assert torch.equal(PenaltyTracker(Penalties()).apply_(torch.ones(3)), torch.ones(3))  # off by default


def test_text_stream_without_byte_decoding_waits_for_whole_characters():
    pieces = {1: "a", 2: "\ufffd", 3: "é"}

    def decode(ids):  # like SentencePiece: a partial character decodes to U+FFFD until completed
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    stream = TextStream(None, decode)
    assert [stream.push(1), stream.push(2), stream.push(3)] == ["a", "", "é"]
    assert stream.flush() == ""
    byte_stream = TextStream(lambda ids: bytes(ids), lambda ids: "")
    assert [byte_stream.push(0xC3), byte_stream.push(0xA9), byte_stream.push(0xE2)] == ["", "é", ""]
    assert byte_stream.flush() == "\ufffd"


def test_temperature_reshapes_only_what_top_p_kept():
    """ChatRWKV's order: a high temperature must not let tokens outside the nucleus in."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    hot = SamplingConfig(temperature=5.0, top_p=0.7)
    draws = [sample(logits, hot, g) for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reach 0.7: token 2 and 3 never, however hot
    share = draws.count(1) / len(draws)  # flattened within the nucleus: (0.3/0.5)^(1/5) -> ~0.475 of the mass
    assert 0.4 < share < 0.55


def _sorted_cutoff(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference: sort everything, take the token at which the running mass first reaches top_p."""
    ordered = torch.sort(probs.double(), descending=True).values
    running = torch.cumsum(ordered, dim=0)
    position = int(torch.searchsorted(running, (running[-1] * top_p).reshape(1))[0])
    return ordered[min(position, ordered.numel() - 1)].float()


@pytest.mark.parametrize("scale", [0.0, 0.01, 0.05, 1.0, 4.0, 30.0])
@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.85, 0.99])
def test_nucleus_cutoff_equals_the_sorted_reference(scale: float, top_p: float) -> None:
    g = torch.Generator().manual_seed(int(scale * 100) + int(top_p * 1000))
    for size in (1, 7, 65536):
        logits = torch.randn(size, generator=g) * scale
        logits[: size // 3] = float("-inf")  # banned tokens: probability 0
        if size > 1:
            logits[-2:] = logits[-1]  # a tie at the top survives together
        probs = torch.softmax(logits, dim=-1)
        assert nucleus_cutoff(probs, top_p) == _sorted_cutoff(probs, top_p)


def test_draws_follow_the_kept_distribution() -> None:
    """The inverse-CDF draw is the categorical distribution over what top-p/top-k kept, reshaped by temperature."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    logits = torch.log(probs)
    g = torch.Generator().manual_seed(0)
    n = 20000
    for cfg, expected in [
        (SamplingConfig(top_p=1.0), [0.4, 0.3, 0.2, 0.1, 0.0]),
        (SamplingConfig(top_p=0.65), [0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0, 0.0]),  # 0.4 + 0.3 first reach 0.65
        (SamplingConfig(top_p=1.0, top_k=2, temperature=0.5), [16 / 25, 9 / 25, 0.0, 0.0, 0.0]),
    ]:
        counts = torch.bincount(torch.tensor([sample(logits, cfg, g) for _ in range(n)]), minlength=5) / n
        assert torch.allclose(counts, torch.tensor(expected), atol=0.015), (cfg, counts)
    seeded = [sample(logits, SamplingConfig(), torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(seeded)) == 1  # a seed fixes the draw


def test_non_finite_logits_are_refused_by_one_check() -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NumericsError):
            sample(torch.tensor([0.0, bad, 1.0]), SamplingConfig())
    with pytest.raises(NumericsError):
        sample(torch.full((4,), float("-inf")), SamplingConfig())
    assert sample(torch.tensor([float("-inf"), 2.0, float("-inf")]), SamplingConfig()) == 1


def test_a_tiny_temperature_picks_the_most_likely_token() -> None:
    """(p / max p) ** (1 / T): at T = 0.001 every raw weight p ** 1000 would underflow to 0 and the draw would fall
    to the last candidate; relative to the largest, the most likely token keeps weight 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, generator=g) * 0.1
    logits[1234] += 0.5
    assert {sample(logits, SamplingConfig(temperature=0.001, top_p=1.0), g) for _ in range(20)} == {1234}


def test_a_draw_at_the_very_top_of_the_cdf_takes_the_last_candidate(monkeypatch):
    """u = rand * total can round up to the total itself; the draw is then the last candidate, never an id past the
    vocabulary or one the cut removed."""
    logits = torch.full((10,), -30.0)
    logits[[2, 5, 7]] = torch.tensor([3.0, 2.0, 1.0])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))
    assert sample(logits, SamplingConfig(temperature=1.0, top_p=0.999)) == 7
