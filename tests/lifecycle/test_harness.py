"""lm-evaluation-harness on our engine, offline: local task files (multiple choice, rolling log-likelihood, generation)
run through `lm_eval.simple_evaluate` with the `rwkvctl` model class; its log-likelihoods equal a direct
whole-sequence computation, and its generations equal the engine's greedy decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from rwkvctl.config import ModelConfig  # noqa: E402
from rwkvctl.generate import DecodeSettings, SamplingConfig  # noqa: E402
from rwkvctl.lifecycle.infer import open_engine  # noqa: E402
from rwkvctl.lifecycle.models import create_checkpoint  # noqa: E402

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=65536, head_size=16)
MC = [{"context": "The sky is", "choices": ["blue", "green", "made of cheese"], "label": 0},
      {"context": "Two plus two is", "choices": ["four", "five"], "label": 0}]
TEXTS = [{"text": "A short document about nothing at all."}, {"text": "Another one, with numbers: 1 2 3 4 5."}]
QA = [{"question": "What is one plus one?", "answer": "two"}, {"question": "Name a colour.", "answer": "red"}]


def write_tasks(root: Path) -> None:
    for name, rows in (("mc", MC), ("ppl", TEXTS), ("qa", QA)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "mc.yaml").write_text("task: rwkvctl_mc\n" + common.format(path=root / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"))
    (root / "ppl.yaml").write_text("task: rwkvctl_ppl\n" + common.format(path=root / "ppl.jsonl") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))
    (root / "qa.yaml").write_text("task: rwkvctl_qa\n" + common.format(path=root / "qa.jsonl") + (
        "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"))


def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Our own scoring: one forward pass over context + continuation, summed log-probs of the continuation."""
    ctx, cont = tok.encode(context), tok.encode(continuation)
    logits, _ = model(torch.tensor([ctx + cont]))
    logp = F.log_softmax(logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.mark.slow  # lm-eval's import and task loading take ~40 s on 2 cores
def test_the_harness_scores_equal_ours_on_local_tasks(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    from lm_eval.tasks import TaskManager

    import rwkvctl.lifecycle.harness  # noqa: F401  (registers the model class)

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    ckpt = create_checkpoint(tmp_path / "tiny.pth", CFG, seed=3).path
    out = lm_eval.simple_evaluate(model="rwkvctl", model_args=f"path={ckpt}", tasks=["rwkvctl_mc", "rwkvctl_ppl",
                                  "rwkvctl_qa"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                  batch_size=2)
    engine, _ = open_engine(ckpt)
    model, tok = engine.model, engine.tokenizer
    with torch.no_grad():
        for sample in out["samples"]["rwkvctl_mc"]:
            doc = sample["doc"]
            for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
                expected = direct_loglikelihood(model, tok, doc["context"], " " + choice)
                assert resp[0][0] == pytest.approx(expected, abs=2e-3), (doc, choice)
        for sample in out["samples"]["rwkvctl_ppl"]:
            text = sample["doc"]["text"]
            ids = tok.encode(text)
            logits, _ = model(torch.tensor([[engine.eod_id] + ids[:-1]]))
            expected = float(F.log_softmax(logits[0].float(), -1).gather(1, torch.tensor(ids)[:, None]).sum())
            assert sample["resps"][0][0] == pytest.approx(expected, abs=2e-3)
        for sample in out["samples"]["rwkvctl_qa"]:
            prompt = f"Q: {sample['doc']['question']}\nA:"
            settings = DecodeSettings(SamplingConfig(temperature=0), max_tokens=6, stop_texts=("\n",),
                                      stop_tokens=(engine.eod_id,), layout_presence_only=False)
            assert sample["resps"][0][0] == "".join(engine.generate(tok.encode(prompt), settings))
    assert set(out["results"]) == {"rwkvctl_mc", "rwkvctl_ppl", "rwkvctl_qa"}
