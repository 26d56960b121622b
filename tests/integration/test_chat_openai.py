"""Tool-call mode against a REAL OpenAI-compatible server: langchain_openai.ChatOpenAI -> llama-cpp-python.

The server is ``python -m llama_cpp.server --chat_format chatml-function-calling``
over the embedded Gemma 3 270M base GGUF, on 127.0.0.1. The model is tiny and
not instruction-tuned, so these tests assert what the server and model do
reliably, not answer quality:

- a plain run goes end to end through the HTTP server, with the server's own
  token usage in the trace;
- with ``tool_choice`` forcing ``spawn`` on the root's first step (the
  function-calling chat format then constrains the arguments to the spawn
  schema with a grammar), the root really spawns through a tool call, every
  branch runs as its own conversation against the server, and the merge
  answers the spawn call with one ``ToolMessage`` before the root finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_servers import free_port
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage, messages_from_dict

from apr_agents import APRConfig, create_apr_agent
from apr_agents.graph.chat import create_chat_apr_agent
from apr_agents.graph.chat_prompt import DEFAULT_CHAT_SYSTEM_PROMPT, format_system_prompt

pytestmark = [pytest.mark.engine, pytest.mark.server, pytest.mark.timeout(300)]

langchain_openai = pytest.importorskip("langchain_openai", reason="pip install 'apr-agents[chat]'")
pytest.importorskip("llama_cpp.server", reason="pip install 'llama-cpp-python[server]'")


def _model_file() -> Path:
    from apr_agents.backends.embedded import model_path

    return model_path()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(_model_file()),
             "--chat_format", "chatml-function-calling", "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "2048", "--n_threads", "2", "--seed", "0"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama server exited: {log_path.read_text(errors='replace')[-1500:]}")
                try:
                    with urllib.request.urlopen(url + "/v1/models", timeout=1) as resp:
                        if resp.status == 200:
                            break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        tail = log_path.read_text(errors="replace")[-1500:]
                        raise TimeoutError(f"llama server not ready: {tail}") from exc
                    time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def chat_model(url: str, max_tokens: int = 16) -> Any:
    return langchain_openai.ChatOpenAI(base_url=url + "/v1", api_key="not-needed", model="gemma-3-270m",
                                       temperature=0.0, max_tokens=max_tokens, timeout=120, max_retries=0)


def check_trace(trace: dict[str, Any]) -> None:
    json.dumps(trace)
    ctxs = trace["contexts"]
    for cid, rec in ctxs.items():
        assert rec["id"] == cid and rec["ended"] is not None and rec["ended"] >= rec["started"]
        assert rec["calls"] >= 1 and rec["prompt_tokens"] > 0 and rec["completion_tokens"] >= 0
        assert "tokens_estimated" not in rec  # the server reported usage for every call
        assert rec["end"] in ("eos", "thread_end", "max_tokens"), rec["end"]
        if cid != "root":
            assert rec["parent"] in ctxs and rec["depth"] == ctxs[rec["parent"]]["depth"] + 1
            assert any(cid in group for group in ctxs[rec["parent"]]["spawns"])
    s = trace["summary"]
    assert s["contexts"] == len(ctxs) and s["backend_calls"] == sum(r["calls"] for r in ctxs.values())
    assert s["total_tokens"] == sum(r["completion_tokens"] for r in ctxs.values())
    assert 0 < s["critical_path_tokens"] <= s["total_tokens"]


def test_plain_run_through_the_real_server(server: str) -> None:
    graph = create_apr_agent(chat_model(server), [], APRConfig(max_steps=2))
    state = graph.invoke({"messages": [HumanMessage("Say hello.")]})
    answer = state["messages"][-1]
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str)
    trace = state["apr_trace"]
    check_trace(trace)
    assert trace["mode"] == "chat" and trace["summary"]["branches"] == 0
    assert trace["contexts"]["root"]["calls"] == 1
    assert trace["contexts"]["root"]["completion_tokens"] <= 16  # max_tokens reached the server


async def test_forced_spawn_fans_out_and_merges_through_the_real_server(server: str) -> None:
    force = {"type": "function", "function": {"name": "spawn"}}

    def per_step(step: dict[str, Any]) -> dict[str, Any]:
        # the root's first step must spawn (64 tokens leave room for the arguments); later steps
        # send no tool_choice, so llama-cpp's chatml-function-calling answers with plain text
        return {"tool_choice": force, "max_tokens": 64} if step["depth"] == 0 and step["step"] == 0 else {}

    config = APRConfig(max_threads=2, max_depth=1, max_total_threads=2, max_steps=3)
    # llama-cpp-python's server rejects the null content OpenAI clients send for a tool-call-only message
    graph = create_chat_apr_agent(chat_model(server), [], config, bind_tools_kwargs=per_step,
                                  empty_tool_call_content=" ")
    question = "Find the capital of France and the capital of Japan. Split this into two short sub-tasks."
    state = await graph.ainvoke({"messages": [HumanMessage(question)]})

    messages = messages_from_dict(state["apr_msgs"])
    first = next(m for m in messages if isinstance(m, AIMessage))
    calls = [*first.tool_calls, *first.invalid_tool_calls]
    assert [c["name"] for c in calls] == ["spawn"]  # the server returned a real tool call
    answers = [m for m in messages if isinstance(m, ToolMessage) and m.tool_call_id == calls[0]["id"]]
    assert len(answers) == 1  # exactly one ToolMessage answers it
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls  # the root went on and finished

    trace = state["apr_trace"]
    check_trace(trace)
    ctxs = trace["contexts"]
    if first.tool_calls:  # arguments parsed: the grammar kept them to the schema
        tasks = first.tool_calls[0]["args"]["tasks"]
        assert 1 <= len(tasks) <= 2 and all(isinstance(t, str) for t in tasks)
        assert trace["summary"]["branches"] == len(tasks)
        assert ctxs["root"]["spawns"] == [[f"root/1.{i}" for i in range(1, len(tasks) + 1)]]
        for i, task in enumerate(tasks, 1):
            rec = ctxs[f"root/1.{i}"]
            assert rec["outline"] == task.strip() and rec["depth"] == 1 and rec["calls"] >= 1
            # its prompt carries the parent's conversation (the system prompt alone has more tokens than words)
            assert rec["prompt_tokens"] > len(format_system_prompt(DEFAULT_CHAT_SYSTEM_PROMPT, 2).split())
        assert answers[0].content.startswith(f"Results of {len(tasks)} sub-task")
        for i in range(1, len(tasks) + 1):
            assert f"[{i}] " in answers[0].content
    else:  # arguments cut off or malformed: the model got a clear tool error instead
        assert answers[0].status == "error" and answers[0].content.startswith("error: ")
        assert trace["summary"]["branches"] == 0
