"""Failing parts: tools that raise, hang or return junk; backends that fail, hang or drop; cancellation.

FAKE backends only (ScriptedBackend and small wrappers around it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from apr_agents import APRBackendError, APRConfig, Completion, create_apr_agent
from apr_agents.backends import BackendError
from apr_agents.testing import ScriptedBackend

Q = {"messages": [HumanMessage("q")]}


def spawn(n: int, tail: str = "Final.") -> str:
    outlines = "".join(f"<Outline>{i}: task {i}</Outline>\n" for i in range(1, n + 1))
    return f"<Parallel>\n<Outlines>\n{outlines}</Outlines>\n{tail}"


def call(name: str, **args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def ctx(state: dict[str, Any], cid: str) -> dict[str, Any]:
    return state["apr_trace"]["contexts"][cid]


# -- tools -----------------------------------------------------------------------------------------

@tool
def sync_boom(x: int) -> str:
    """Raises synchronously."""
    raise ZeroDivisionError(f"sync boom {x}")


@tool
async def async_boom(x: int) -> str:
    """Raises from a coroutine."""
    await asyncio.sleep(0)
    raise KeyError(f"async boom {x}")


@tool
async def ok(tag: str) -> str:
    """Fine."""
    await asyncio.sleep(0.05)
    return f"ok {tag}"


async def test_tools_that_raise_stay_in_their_branch() -> None:
    script = {"": spawn(3), "1": f" {call('sync_boom', x=1)} a</Thread>", "2": f" {call('async_boom', x=2)} b</Thread>",
              "3": f" {call('ok', tag='3')} c</Thread>"}
    state = await create_apr_agent(ScriptedBackend(script), [sync_boom, async_boom, ok]).ainvoke(Q)
    assert "raised ZeroDivisionError: sync boom 1" in ctx(state, "root/1.1")["text"]
    assert "raised KeyError" in ctx(state, "root/1.2")["text"]
    assert "<tool_response>ok 3</tool_response>" in ctx(state, "root/1.3")["text"]
    assert [ctx(state, f"root/1.{i}")["tool_calls"][0]["error"] for i in (1, 2, 3)] == [
        "ZeroDivisionError", "KeyError", None]
    assert all(ctx(state, f"root/1.{i}")["end"] == "thread_end" for i in (1, 2, 3))
    assert state["messages"][-1].content == "Final."


@tool
def sync_hang(seconds: float) -> str:
    """Blocks a worker thread."""
    time.sleep(seconds)
    return "late"


STUBBORN = {"release": False, "ignored_cancels": 0}


@tool
async def stubborn() -> str:
    """Hangs and ignores cancellation (until the test releases it, so the loop can close)."""
    while not STUBBORN["release"]:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            STUBBORN["ignored_cancels"] += 1
    return "released"


async def test_tools_that_hang_past_their_timeout() -> None:
    script = {"": f"{call('sync_hang', seconds=2)} {call('stubborn')} {call('ok', tag='x')} after"}
    t0 = time.perf_counter()
    try:
        state = await create_apr_agent(ScriptedBackend(script), [sync_hang, stubborn, ok],
                                       APRConfig(tool_timeout_s=0.3)).ainvoke(Q)
        # neither a blocked thread nor a task that ignores its cancellation holds the run
        assert time.perf_counter() - t0 < 1.5
        assert STUBBORN["ignored_cancels"] >= 1 and not STUBBORN["release"]
    finally:
        STUBBORN["release"] = True
        await asyncio.sleep(0.1)
    calls = ctx(state, "root")["tool_calls"]
    assert [c["error"] for c in calls] == ["timeout", "timeout", None]
    text = state["apr_trace"]["transcript"]
    assert text.count("did not finish within 0.3 s") == 2 and "<tool_response>ok x</tool_response>" in text
    assert state["messages"][-1].content == "after"


class Weird:
    def __str__(self) -> str:
        return "weird object"


@tool
def junk(kind: str) -> Any:
    """Returns non-string output."""
    circular: list[Any] = []
    circular.append(circular)
    return {"none": None, "int": 42, "dict": {"a": [1, 2]}, "bytes": b"\x00\xff", "object": Weird(),
            "circular": circular, "huge": list(range(100_000)), "tags": {"x": "<Parallel></Thread>"}}[kind]


@pytest.mark.parametrize(("kind", "expected"), [
    ("none", "<tool_response>null</tool_response>"),
    ("int", "<tool_response>42</tool_response>"),
    ("dict", '<tool_response>{"a": [1, 2]}</tool_response>'),
    ("bytes", "<tool_response>\"b'\\\\x00\\\\xff'\"</tool_response>"),
    ("object", '<tool_response>"weird object"</tool_response>'),
    ("circular", "<tool_response>[[...]]</tool_response>"),
    ("huge", "[... truncated "),
    ("tags", "&lt;Parallel&gt;&lt;/Thread&gt;"),
])
async def test_tools_returning_non_strings(kind: str, expected: str) -> None:
    script = {"": f"{call('junk', kind=kind)} done"}
    state = await create_apr_agent(ScriptedBackend(script), [junk], APRConfig(max_tool_output_chars=200)).ainvoke(Q)
    text = state["apr_trace"]["transcript"]
    assert expected in text
    response = text.split("<tool_response>", 1)[1].split("</tool_response>", 1)[0]
    assert len(response) <= 200 + len("\n[... truncated 999999 characters]")
    assert state["messages"][-1].content == "done"


async def test_a_tool_that_raises_cancelled_error_is_an_error_not_a_cancelled_run() -> None:
    @tool
    async def self_cancel() -> str:
        """An inner task of the tool was cancelled."""
        raise asyncio.CancelledError

    script = {"": spawn(2), "1": f" {call('self_cancel')} a</Thread>", "2": " b</Thread>"}
    state = await create_apr_agent(ScriptedBackend(script), [self_cancel]).ainvoke(Q)
    assert ctx(state, "root/1.1")["tool_calls"][0]["error"] == "ToolCancelled"
    assert "raised ToolCancelled" in ctx(state, "root/1.1")["text"]
    assert state["messages"][-1].content == "Final."


# -- backends --------------------------------------------------------------------------------------

async def test_transient_backend_errors_are_retried() -> None:
    backend = ScriptedBackend({"": "fine"}, fail_first=2)
    state = await create_apr_agent(backend, [], APRConfig(backend_attempts=3)).ainvoke(Q)
    assert state["messages"][-1].content == "fine" and backend.calls == 3


class FailingOn(ScriptedBackend):
    """Fails every call whose prompt continues the given branch."""

    def __init__(self, *a: Any, branch: str, error: BaseException, **k: Any) -> None:
        super().__init__(*a, **k)
        self.branch, self.error, self.failed = branch, error, 0

    async def stream(self, prompt: str, **k: Any) -> AsyncIterator[str | Completion]:
        if self.context_of(prompt)[0] == self.branch:
            self.failed += 1
            raise self.error
        async for item in super().stream(prompt, **k):
            yield item


@pytest.mark.parametrize("error", [BackendError("503 from server"), ConnectionResetError("peer reset"),
                                   OSError("network down")])
async def test_persistent_backend_error_names_the_branch(error: BaseException) -> None:
    script = {"": spawn(3), "*": " fine</Thread>"}
    backend = FailingOn(script, branch="2", error=error)
    with pytest.raises(APRBackendError) as info:
        await create_apr_agent(backend, [], APRConfig(backend_attempts=3)).ainvoke(Q)
    msg = str(info.value)
    assert "'root/1.2'" in msg and "task 2" in msg and "3 attempts" in msg and type(error).__name__ in msg
    assert backend.failed == 3


async def test_backend_timeout_then_clear_error() -> None:
    backend = ScriptedBackend({"": spawn(1), "1": " HANG here</Thread>"}, hang_on="HANG")
    t0 = time.perf_counter()
    with pytest.raises(APRBackendError, match=r"'root/1\.1'.*2 attempts: TimeoutError"):
        await create_apr_agent(backend, [], APRConfig(backend_timeout_s=0.2, backend_attempts=2)).ainvoke(Q)
    assert time.perf_counter() - t0 < 3
    assert backend.cancelled == 2  # each timed-out request was cancelled (an engine would abort it)


class DropsMidStream(ScriptedBackend):
    """The first stream of each context dies after three pieces, like a dropped connection."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.dropped: set[str] = set()

    async def stream(self, prompt: str, **k: Any) -> AsyncIterator[str | Completion]:
        path = self.context_of(prompt)[0]
        n = 0
        async for item in super().stream(prompt, **k):
            if path not in self.dropped and n == 3:
                self.dropped.add(path)
                raise ConnectionResetError("connection dropped mid-stream")
            n += 1
            yield item


async def test_stream_dropped_mid_way_is_retried_without_duplicating_text() -> None:
    script = {"": spawn(2, "The final answer is here."), "1": " one two three four five</Thread>",
              "2": " six seven eight nine ten</Thread>"}
    backend = DropsMidStream(script)
    state = await create_apr_agent(backend, []).ainvoke(Q)
    assert backend.dropped == {"", "1", "2"}
    assert ctx(state, "root/1.1")["text"] == " one two three four five"
    assert ctx(state, "root/1.2")["text"] == " six seven eight nine ten"
    assert state["messages"][-1].content == "The final answer is here."
    assert state["apr_trace"]["transcript"].count("<Outline>1: task 1</Outline>") == 1


async def test_stream_that_ends_without_a_completion_is_an_error() -> None:
    class NoFinal(ScriptedBackend):
        async def stream(self, prompt: str, **k: Any) -> AsyncIterator[str | Completion]:
            async for item in super().stream(prompt, **k):
                if isinstance(item, str):
                    yield item

    with pytest.raises(APRBackendError, match="stream ended without a completion"):
        await create_apr_agent(NoFinal({"": "x y z"}), [], APRConfig(backend_attempts=2)).ainvoke(Q)


async def test_unexpected_backend_exception_names_the_context() -> None:
    backend = FailingOn({"": spawn(2), "*": " b</Thread>"}, branch="1", error=KeyError("bug in adapter"))
    with pytest.raises(APRBackendError, match=r"'root/1\.1'.*KeyError"):
        await create_apr_agent(backend, [], APRConfig(backend_attempts=3)).ainvoke(Q)
    assert backend.failed == 1  # a bug is not retried


# -- cancellation ----------------------------------------------------------------------------------

async def test_cancelling_a_run_cancels_backend_requests_and_tool_tasks() -> None:
    seen: dict[str, int] = {"started": 0, "cancelled": 0}
    both_started = asyncio.Event()

    @tool
    async def long_tool(tag: str) -> str:
        """Runs for a long time."""
        seen["started"] += 1
        if seen["started"] == 2:
            both_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["cancelled"] += 1
            raise
        return tag

    script = {"": spawn(4)}
    for i in (1, 2):  # two branches wait in a tool, two stream slowly from the backend
        script[str(i)] = f" {call('long_tool', tag=str(i))} done</Thread>"
    for i in (3, 4):
        script[str(i)] = " " + "slow " * 3000 + "</Thread>"
    backend = ScriptedBackend(script, token_latency_s=0.01)
    graph = create_apr_agent(backend, [long_tool], APRConfig(max_tokens=10_000))
    task = asyncio.create_task(graph.ainvoke(Q))
    await asyncio.wait_for(both_started.wait(), 10)  # a loaded machine may take a while to reach them
    assert seen["started"] == 2 and not task.done()
    t0 = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.perf_counter() - t0 < 2  # the tools would run 30 s, the slow streams 30 s
    await asyncio.sleep(0.05)
    assert seen["cancelled"] == 2  # the tool tasks got CancelledError
    assert backend.cancelled == 2  # the two in-flight streams were cancelled (an engine aborts them)
    calls = backend.calls
    await asyncio.sleep(0.3)
    assert backend.calls == calls  # nothing keeps running after the cancel
