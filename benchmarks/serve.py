"""Benchmark `rwkvctl serve` on loopback: what the prefix-state cache and batched decoding buy.

    python benchmarks/serve.py [--turns 50] [--clients 16] [--layers 6] [--width 512] [--reply 8] [--stream-tokens 48]

(a) A conversation of --turns turns through /v1/chat/completions (each request carries the whole history, as chat
    front ends send it): latency of turn N vs turn 1 with the cache, against the same conversation replayed on a
    server started with --cache-mb 0 (the baseline) in the same run. Goal: turn N <= 1.2x turn 1 with the cache.
    Measured with the `openai` client, and again over plain HTTP on a fresh cached server (the client library's
    own per-message work is part of the first number, not of the second).
(b) --clients concurrent streaming clients, --stream-tokens tokens each, against one client alone: aggregate
    tokens/s. Goal: >= 3x one client, zero errors, every response complete.

Each server is a real `rwkvctl serve` process (randomly initialised model, World vocabulary, fp32 on CPU); the
clients use the official `openai` package from threads of this process. Bounded: every request has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, cache_mb: int) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "rwkvctl", "serve", str(model), "--port", str(self.port), "--cache-mb",
               str(cache_mb), "--model-name", "bench", "--max-queue", "256", "--max-batch", "64"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def conversation(server: Server, turns: int, reply: int, history: list[list[dict]] | None = None,
                 raw: bool = False):
    """Run the turns; returns per-turn (seconds, cached tokens, prompt tokens, reply tokens) and the message lists
    sent (a reply may end before --reply tokens at the chat format's turn end, which moves its latency). With
    `history`, replays exactly those message lists (the baseline sees the same conversation). With `raw`, plain
    HTTP (httpx, one kept-alive connection) instead of the `openai` client, whose own request building grows with
    the number of messages (~15 ms at 100 messages on the 2-core box) and is not the server's work."""
    import httpx

    c = None if raw else server.client()
    http = httpx.Client(base_url=f"http://127.0.0.1:{server.port}/v1", timeout=600) if raw else None
    messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant."}]
    sent: list[list[dict]] = []
    rows = []
    for turn in range(turns):
        if history is not None:
            messages = history[turn]
        else:
            messages = messages + [{"role": "user", "content": f"Tell me about topic number {turn}, briefly."}]
        sent.append(list(messages))
        params = {"model": "bench", "messages": messages, "max_tokens": reply, "temperature": 1.0, "top_p": 0.9,
                  "seed": turn}
        t0 = time.perf_counter()
        if raw:
            response = http.post("/chat/completions", json=params)
            response.raise_for_status()
        else:
            response = c.chat.completions.create(**params)
        took = time.perf_counter() - t0
        out = response.json() if raw else response.model_dump()
        use, content = out["usage"], out["choices"][0]["message"]["content"]
        cached = use["prompt_tokens_details"]["cached_tokens"]
        rows.append((took, cached, use["prompt_tokens"], use["completion_tokens"]))
        if history is None:
            messages = messages + [{"role": "assistant", "content": content}]
    if http is not None:
        http.close()
    return rows, sent


def stream_clients(server: Server, n: int, tokens: int) -> tuple[float, int, int]:
    """n concurrent streaming requests of `tokens` tokens; (aggregate tokens/s, errors, complete responses)."""
    counts = [0] * n
    errors = [0]
    complete = [0]

    def one(i: int) -> None:
        try:
            stream = server.client().completions.create(model="bench", prompt=f"Client {i} says", stream=True,
                                                        max_tokens=tokens, temperature=1.0, seed=i, stop=None)
            finish = None
            for chunk in stream:
                counts[i] += 1 if chunk.choices[0].text else 0
                finish = chunk.choices[0].finish_reason or finish
            complete[0] += finish in ("length", "stop")
        except Exception:  # noqa: BLE001  (counted: the goal is zero)
            errors[0] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    seconds = time.perf_counter() - t0
    return sum(counts) / seconds, errors[0], complete[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--reply", type=int, default=8, help="max tokens per reply in (a)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    args = ap.parse_args()

    import torch

    from rwkvctl.config import ModelConfig
    from rwkvctl.lifecycle.models import create_checkpoint

    work = Path(tempfile.mkdtemp(prefix="rwkvctl-bench-serve-"))
    cfg = ModelConfig(n_layer=args.layers, n_embd=args.width, vocab_size=65536)
    model = create_checkpoint(work / "bench.pth", cfg, scheme="rwkv-lm-2024", seed=0).path

    cached = Server(model, cache_mb=1024)
    try:
        with_cache, sent = conversation(cached, args.turns, args.reply)
        alone, e1, c1 = stream_clients(cached, 1, args.stream_tokens)
        together, errors, complete = stream_clients(cached, args.clients, args.stream_tokens)
    finally:
        cached.close()
    plain = Server(model, cache_mb=0)
    try:
        without, _ = conversation(plain, args.turns, args.reply, history=sent)
    finally:
        plain.close()
    raw_server = Server(model, cache_mb=1024)  # the same conversation over plain HTTP: the server's own latency
    try:
        raw_rows, _ = conversation(raw_server, args.turns, args.reply, history=sent, raw=True)
    finally:
        raw_server.close()

    def first_last(rows: list) -> tuple[float, float]:
        head = sorted(r[0] for r in rows[:3])[1]  # median of the first three turns: turn 1 alone is noisy
        tail = sorted(r[0] for r in rows[-3:])[1]
        return head, tail

    h_c, t_c = first_last(with_cache)
    h_p, t_p = first_last(without)
    h_r, t_r = first_last(raw_rows)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "model": f"L{args.layers} D{args.width} V65536 fp32 CPU",
        "turns": args.turns,
        "turn1_s_cache": round(h_c, 4),
        "turnN_s_cache": round(t_c, 4),
        "turnN_over_turn1_cache": round(t_c / h_c, 3),
        "turn1_s_nocache": round(h_p, 4),
        "turnN_s_nocache": round(t_p, 4),
        "turnN_over_turn1_nocache": round(t_p / h_p, 3),
        "turn1_s_cache_http": round(h_r, 4),
        "turnN_s_cache_http": round(t_r, 4),
        "turnN_over_turn1_cache_http": round(t_r / h_r, 3),
        "turnN_prompt_tokens": with_cache[-1][2],
        "turnN_cached_tokens": with_cache[-1][1],
        "reply_tokens_first3_last3": [r[3] for r in with_cache[:3] + with_cache[-3:]],
        "one_client_tok_s": round(alone, 2),
        f"{args.clients}_clients_tok_s": round(together, 2),
        "concurrency_speedup": round(together / alone, 2) if alone else None,
        "errors": errors + e1,
        "complete": f"{complete}/{args.clients}",
    }
    print(f"(a) turn {args.turns} / turn 1 latency: with cache {result['turnN_over_turn1_cache']}x (goal <= 1.2), "
          f"without {result['turnN_over_turn1_nocache']}x; turn {args.turns} prompt {with_cache[-1][2]} tokens, "
          f"{with_cache[-1][1]} from the cache; reply tokens of turns 1-3 and the last 3: "
          f"{result['reply_tokens_first3_last3']}")
    print(f"    the same over plain HTTP (no openai client): with cache {result['turnN_over_turn1_cache_http']}x "
          f"({t_r * 1e3:.0f} vs {h_r * 1e3:.0f} ms)")
    print(f"(b) {args.clients} streaming clients: {together:.1f} tokens/s vs one client {alone:.1f} = "
          f"{result['concurrency_speedup']}x (goal >= 3), errors {errors + e1}, complete {complete}/{args.clients}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
