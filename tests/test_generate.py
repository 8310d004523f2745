import torch

from rwkvctl.config import ModelConfig
from rwkvctl.generate import SamplingConfig, generate, sample


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
