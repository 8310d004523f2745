"""`rwkvctl serve` end to end: the real server on a loopback port with a tiny model, driven by the official `openai`
client and raw HTTP. Outputs equal `rwkvctl generate`; a cached continuation equals an uncached one; a batch of
concurrent requests equals each served alone; a disconnect cancels; bad input gets OpenAI error objects."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from rwkvctl.cli import app as cli_app  # noqa: E402
from rwkvctl.config import ModelConfig  # noqa: E402
from rwkvctl.lifecycle.infer import open_engine  # noqa: E402
from rwkvctl.lifecycle.models import create_checkpoint  # noqa: E402
from rwkvctl.serve.app import BackgroundServer, ServeSettings, build_server  # noqa: E402
from rwkvctl.serve.prefix_cache import PrefixStateCache  # noqa: E402

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=65536, head_size=16)
SAMPLING = dict(temperature=1.0, top_p=0.85, seed=3, max_tokens=20)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return create_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.pth", CFG, seed=5).path


def start(checkpoint: Path, *, cache_mb: int = 64, api_key: str | None = None, max_queue: int = 64, **kw):
    engine, _ = open_engine(checkpoint)
    cache = PrefixStateCache(cache_mb << 20) if cache_mb else None
    settings = ServeSettings("tiny", api_key=api_key, **kw)
    server, scheduler = build_server(engine, settings, cache=cache, max_queue=max_queue)
    return BackgroundServer(server, scheduler)


@pytest.fixture(scope="module")
def url(checkpoint):
    with start(checkpoint, max_prompt_tokens=200) as base:
        yield base


def client(base: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_and_health(url) -> None:
    assert [m.id for m in client(url).models.list()] == ["tiny"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_completion_equals_rwkvctl_generate_streaming_or_not(url, checkpoint) -> None:
    res = CliRunner().invoke(cli_app, ["generate", str(checkpoint), "-p", "The cat", "--max-tokens", "20",
                                       "--temperature", "1.0", "--top-p", "0.85", "--seed", "3"])
    assert res.exit_code == 0, res.output
    expected = res.output.removeprefix("The cat").removesuffix("\n")
    c = client(url)
    whole = c.completions.create(model="tiny", prompt="The cat", **SAMPLING)
    assert whole.choices[0].text == expected and whole.usage.prompt_tokens == 2
    assert whole.usage.completion_tokens <= 20 and whole.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="The cat",
                                                                          stream=True, **SAMPLING))
    assert streamed == expected


def chat_turns(base: str) -> tuple[list[str], list]:
    """Two turns of one conversation; the second request carries the first reply."""
    c = client(base)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = c.chat.completions.create(model="tiny", messages=messages, **SAMPLING)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = c.chat.completions.create(model="tiny", messages=messages, **SAMPLING)
    return [first.choices[0].message.content, second.choices[0].message.content], [first.usage, second.usage]


def test_a_cached_continuation_equals_an_uncached_one(url, checkpoint) -> None:
    cached, usage = chat_turns(url)
    with start(checkpoint, cache_mb=0) as plain:
        uncached, plain_usage = chat_turns(plain)
    assert cached == uncached
    assert usage[1].prompt_tokens_details.cached_tokens > 0 and plain_usage[1].prompt_tokens_details.cached_tokens == 0
    assert usage[1].prompt_tokens == plain_usage[1].prompt_tokens


def test_chat_stream_equals_non_stream(url) -> None:
    c = client(url)
    messages = [{"role": "user", "content": "Tell me"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, **SAMPLING).choices[0].message.content
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **SAMPLING))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_concurrent_requests_each_get_what_they_get_alone(url) -> None:
    prompts = [f"Story {i}:" for i in range(5)]
    c = client(url)
    alone = [c.completions.create(model="tiny", prompt=p, **{**SAMPLING, "seed": i}).choices[0].text
             for i, p in enumerate(prompts)]
    together: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        together[i] = client(url).completions.create(model="tiny", prompt=prompts[i],
                                                     **{**SAMPLING, "seed": i}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    metrics = httpx.get(f"{url}/metrics").text
    assert "rwkvctl_decode_batch_size_mean" in metrics and "rwkvctl_cache_hits_total" in metrics


def metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def test_a_disconnect_cancels_the_work(checkpoint) -> None:
    with start(checkpoint, max_tokens_limit=100000) as base:
        body = {"model": "tiny", "prompt": "Go", "max_tokens": 100000, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 20
        while metric(base, "rwkvctl_requests_cancelled_total") < 1:
            assert time.monotonic() < deadline, "the disconnected request kept running"
            time.sleep(0.05)
        assert metric(base, "rwkvctl_queue_depth") == 0
        assert metric(base, "rwkvctl_completion_tokens_total") < 100000


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "tiny", "prompt": "x", "bogus": 1}, 400, "unknown field 'bogus'"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "word " * 300}, 400, "at most 200"),
    ({"model": "tiny", "prompt": ""}, 400, "empty"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**6}, 400, "limit"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, body, status, needle) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]
    assert client(url).completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_chat_message_errors(url) -> None:
    for messages in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}]):
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert r.status_code == 400 and "error" in r.json(), r.text


def test_a_full_queue_answers_429(checkpoint) -> None:
    with start(checkpoint, max_queue=1, max_tokens_limit=100000) as base:
        body = {"model": "tiny", "prompt": "Go", "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)
            busy = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"


def test_api_key(checkpoint) -> None:
    with start(checkpoint, api_key="sekret") as base:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200
        assert [m.id for m in client(base, "sekret").models.list()] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()


def test_binding_beyond_loopback_needs_a_key(checkpoint) -> None:
    res = CliRunner().invoke(cli_app, ["serve", str(checkpoint), "--host", "0.0.0.0"], env={"RWKVCTL_API_KEY": ""})
    assert res.exit_code == 2 and "--api-key" in res.output and len(res.output.strip().splitlines()) == 1
