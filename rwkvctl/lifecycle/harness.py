"""lm-evaluation-harness on our engine (extra `.[eval]`): the model class `rwkvctl`.

    rwkvctl lm-eval --model rwkvctl --model_args path=MODEL.pth --tasks lambada_openai,hellaswag

(or, in Python, import this module and pass `model="rwkvctl"` to `lm_eval.simple_evaluate`). The harness has no
plugin hook for model classes, so the class is registered when this module is imported; `rwkvctl lm-eval` imports it
and hands its arguments to lm-eval's own command line.

- `loglikelihood`: the context is ingested once (RNN state) and the continuation scored from it in the sequence
  form; multiple-choice tasks share one context across their choices, so the last few contexts' states are kept and
  reused (an RNN's state is the whole context in a fixed size).
- `loglikelihood_rolling`: the whole text after the end-of-document token, in segments with the state carried, so
  memory does not grow with the document.
- `generate_until`: the inference engine, requests batched (`batch_size`), greedy unless the task asks to sample.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch import Tensor

from rwkvctl.generate.engine import DecodeSettings, InferenceEngine
from rwkvctl.generate.sampling import SamplingConfig
from rwkvctl.lifecycle.infer import open_engine
from rwkvctl.lifecycle.models import parse_dtype
from rwkvctl.model.state import RecurrentState

CONTEXTS_KEPT = 8  # states of recent contexts (a multiple-choice question's choices share one)


@register_model("rwkvctl")
class RwkvctlLM(LM):
    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        dtype: str = "fp32",
        device: str = "cpu",
        keep_quantized: bool = False,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        chunk_len: int = 512,
        **_: Any,
    ) -> None:
        super().__init__()
        self.engine, self.meta = open_engine(path, tokenizer=tokenizer, dtype=parse_dtype(dtype), device=device,
                                             keep_quantized=_flag(keep_quantized), chunk_len=int(chunk_len))
        self.batch = max(1, int(batch_size) if str(batch_size).isdigit() else 1)
        self._contexts: OrderedDict[tuple[int, ...], tuple[Tensor, RecurrentState]] = OrderedDict()

    @classmethod
    def from_engine(cls, engine: InferenceEngine, batch_size: int = 1) -> RwkvctlLM:
        """Around an engine that is already open (tests, notebooks)."""
        self = cls.__new__(cls)
        LM.__init__(self)
        self.engine, self.meta, self.batch = engine, None, batch_size
        self._contexts = OrderedDict()
        return self

    # --- scoring ---------------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.engine.tokenizer.encode(text))

    def _context(self, tokens: list[int]) -> tuple[Tensor, RecurrentState]:
        key = tuple(tokens)
        hit = self._contexts.get(key)
        if hit is None:
            hit = self.engine.ingest(tokens)
            self._contexts[key] = hit
            if len(self._contexts) > CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
        self._contexts.move_to_end(key)
        return hit

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether every continuation token is the argmax."""
        if not continuation:
            return 0.0, True
        logits, state = self._context(context or [self.engine.eod_id])
        rows = [logits.float().unsqueeze(0)]  # the first continuation token is predicted by the context's end
        if len(continuation) > 1:
            rows += self._sequence_logits(continuation[:-1], state)
        logp = F.log_softmax(torch.cat(rows), dim=-1)  # (len(continuation), V)
        target = torch.tensor(continuation, device=logp.device)
        total = float(logp.gather(1, target[:, None]).sum())
        return total, bool((logp.argmax(-1) == target).all())

    def _sequence_logits(self, tokens: list[int], state: RecurrentState | None) -> list[Tensor]:
        """(T, V) fp32 logits for each position of `tokens` after `state`, a chunk at a time."""
        out = []
        model, chunk = self.engine.model, self.engine.chunk_len
        for start in range(0, len(tokens), chunk):
            idx = torch.tensor([tokens[start : start + chunk]], device=self.engine.device)
            logits, state = model(idx, state)
            out.append(logits[0].float())
        return out

    @torch.no_grad()
    def rolling(self, tokens: list[int]) -> float:
        """log p(tokens | end of document), in segments with the state carried."""
        inputs = [self.engine.eod_id, *tokens[:-1]]
        total, state, chunk = 0.0, None, self.engine.chunk_len
        for start in range(0, len(tokens), chunk):
            idx = torch.tensor([inputs[start : start + chunk]], device=self.engine.device)
            logits, state = self.engine.model(idx, state)
            target = torch.tensor(tokens[start : start + chunk], device=logits.device)
            total += float(F.log_softmax(logits[0].float(), -1).gather(1, target[:, None]).sum())
        return total

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            results.append(self.score(self._encode(context), self._encode(continuation)))
            self.cache_hook.add_partial("loglikelihood", request.args, results[-1])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            tokens = self._encode(request.args[0])
            results.append(self.rolling(tokens) if tokens else 0.0)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, results[-1])
        return results

    # --- generation ------------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str] = []
        for start in range(0, len(requests), self.batch):
            batch = requests[start : start + self.batch]
            generations = [self._start(*r.args) for r in batch]
            for _ in self.engine.run(generations):
                pass
            for request, gen in zip(batch, generations, strict=True):
                if gen.error is not None:
                    raise gen.error
                results.append(gen.text)
                self.cache_hook.add_partial("generate_until", request.args, gen.text)
        return results

    def _start(self, context: str, gen_kwargs: dict[str, Any]) -> Any:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0.0)) > 0
        sampling = SamplingConfig(temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                                  top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0))
        settings = DecodeSettings(sampling, max_tokens=int(gen_kwargs.get("max_gen_toks", 256)),
                                  stop_texts=tuple(u for u in until if u), stop_tokens=(self.engine.eod_id,),
                                  seed=gen_kwargs.get("seed"), layout_presence_only=False)
        return self.engine.start(self._encode(context) or [self.engine.eod_id], settings)


def _flag(value: bool | str) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
