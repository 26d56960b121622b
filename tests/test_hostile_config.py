"""Bad configuration and arguments: one clear message each, at construction or start of a run."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool, tool
from pydantic import ValidationError

from apr_agents import APRBackendError, APRConfig, Completion, create_apr_agent
from apr_agents.testing import ScriptedBackend

Q = {"messages": [HumanMessage("q")]}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_threads", 0, "greater than or equal to 1"),
    ("max_threads", 2.5, "valid integer"),
    ("max_threads", "many", "valid integer"),
    ("max_threads", 10_000, "less than or equal to 1024"),
    ("max_depth", -1, "greater than or equal to 0"),
    ("max_depth", 33, "less than or equal to 32"),
    ("max_total_threads", -5, "greater than or equal to 0"),
    ("max_tokens", 0, "greater than or equal to 1"),
    ("max_steps", 0, "greater than or equal to 1"),
    ("thread_timeout_s", 0, "greater than 0"),
    ("thread_timeout_s", -1.0, "greater than 0"),
    ("thread_timeout_s", math.nan, "finite number"),
    ("thread_timeout_s", math.inf, "finite number"),  # issue 12 item 13: no "infinite" budget
    ("run_timeout_s", 0, "greater than 0"),
    ("llm_concurrency", 0, "greater than or equal to 1"),
    ("tool_concurrency", 0, "greater than or equal to 1"),
    ("tool_rate_per_s", 0, "greater than 0"),
    ("tool_rate_per_s", math.inf, "finite number"),
    ("tool_timeout_s", 0, "greater than 0"),
    ("max_tool_output_chars", 10, "greater than or equal to 64"),
    ("backend_attempts", 0, "greater than or equal to 1"),
    ("backend_timeout_s", -1, "greater than 0"),
    ("temperature", -0.1, "greater than or equal to 0"),
    ("dialect", "klingon", "'canonical', 'multiverse' or 'apr'"),
    ("dialect", "Canonical", "'canonical', 'multiverse' or 'apr'"),
    ("parallel", "sometimes", "valid boolean"),
    ("max_thread", 4, "Extra inputs are not permitted"),  # a typo is not silently ignored
])
def test_invalid_config_values_fail_at_construction(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        APRConfig(**{field: value})
    text = str(info.value)
    assert field in text and message in text
    assert info.value.error_count() == 1  # one message, about this field


def test_config_is_frozen() -> None:
    cfg = APRConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.max_threads = 100  # type: ignore[misc]


def test_valid_edges_are_accepted() -> None:
    cfg = APRConfig(max_depth=0, max_total_threads=0, thread_timeout_s=1e9, tool_rate_per_s=0.5,
                    dialect="multiverse")
    assert cfg.max_depth == 0 and cfg.thread_timeout_s == 1e9


class NoRender:
    async def complete(self, prompt: str, **k: Any) -> Completion:
        return Completion(text="x")


class NotCallable:
    complete = "not a method"
    render = None


@pytest.mark.parametrize(("backend", "message"), [
    (object(), "object is not an apr_agents backend: it lacks complete, render()"),
    ("gpt-4o", "str is not an apr_agents backend"),
    (None, "NoneType is not an apr_agents backend"),
    (NoRender(), "NoRender is not an apr_agents backend: it lacks render()"),
    (NotCallable(), "it lacks complete, render()"),
    (ScriptedBackend, "pass a backend instance, not the class ScriptedBackend"),
])
def test_non_backends_fail_at_construction(backend: Any, message: str) -> None:
    with pytest.raises(TypeError) as info:
        create_apr_agent(backend, [])
    assert message in str(info.value)


def test_render_must_return_text_at_start() -> None:
    class BadRender(ScriptedBackend):
        def render(self, messages: Any, tools: Any) -> Any:
            return ["not", "a", "prompt"]

    with pytest.raises(TypeError, match=r"BadRender.render\(\) must return the prompt as str, not list"):
        asyncio.run(create_apr_agent(BadRender({"": "x"}), []).ainvoke(Q))


async def test_sync_complete_fails_at_start_with_the_context_named() -> None:
    class SyncComplete:
        def render(self, messages: Any, tools: Any) -> str:
            return "prompt"

        def complete(self, prompt: str, **k: Any) -> Completion:  # forgot async
            return Completion(text="x")

    t0 = time.perf_counter()
    with pytest.raises(APRBackendError, match=r"SyncComplete raised in context 'root'.*TypeError"):
        await create_apr_agent(SyncComplete(), []).ainvoke(Q)
    assert time.perf_counter() - t0 < 1  # not retried


@tool
def alpha(x: int) -> int:
    """Alpha."""
    return x


def plain_function(x: int) -> int:
    """Not decorated with @tool."""
    return x


@pytest.mark.parametrize(("tools", "message"), [
    ([plain_function], "tools must be LangChain BaseTool objects"),
    ([lambda x: x], "tools must be LangChain BaseTool objects"),
    ([{"name": "calc", "description": "schema, not a tool"}], "tools must be LangChain BaseTool objects"),
    (["calculator"], "'calculator'"),
    ([alpha, None], "None"),
    ([BaseTool], "BaseTool"),
])
def test_non_tools_fail_at_construction(tools: list[Any], message: str) -> None:
    with pytest.raises(TypeError) as info:
        create_apr_agent(ScriptedBackend({"": "x"}), tools)
    assert message in str(info.value) and "@tool" in str(info.value)


def test_duplicate_tool_names_fail_at_construction() -> None:
    @tool("alpha")
    def alpha_again(x: int) -> int:
        """Same name."""
        return x

    with pytest.raises(ValueError, match=r"duplicate tool names: \['alpha'\]"):
        create_apr_agent(ScriptedBackend({"": "x"}), [alpha, alpha_again])


@pytest.mark.parametrize("config", [{"max_threads": 4}, "canonical", 4])
def test_config_must_be_an_aprconfig(config: Any) -> None:
    with pytest.raises(TypeError, match=f"config must be an APRConfig, not {type(config).__name__}"):
        create_apr_agent(ScriptedBackend({"": "x"}), [], config)


async def test_slow_tool_rate_cannot_outlast_the_run_deadline() -> None:
    """tool_rate_per_s = 0.2 holds the second call back 5 s: the 1 s run deadline still holds."""
    calls = "".join(f'<tool_call>{{"name": "alpha", "arguments": {{"x": {i}}}}}</tool_call>' for i in range(4))
    backend = ScriptedBackend({"": f"{calls} done"})
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [alpha], APRConfig(tool_rate_per_s=0.2, run_timeout_s=1.0)).ainvoke(Q)
    assert time.perf_counter() - t0 < 3  # was 6 s: the wait for the rate limiter ignored the deadline
    root = state["apr_trace"]["contexts"]["root"]
    assert [c["error"] for c in root["tool_calls"]] == [None, "timeout"]
    assert root["end"] == "timeout" and {e["limit"] for e in state["apr_trace"]["limits"]} == {"run_timeout_s"}
