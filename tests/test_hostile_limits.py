"""Fork bombs and budgets: a hostile model cannot make a run hang, grow without bound or hide it.

The tests drive FAKE models (``Hostile`` below answers every prompt with the same hostile text,
whatever it already wrote; ``ScriptedBackend`` where a context's text is scripted) and check that the run ends within its limits, with the limit named in
``state["apr_trace"]["limits"]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from langchain_core.messages import BaseMessage, HumanMessage

from apr_agents import APRConfig, Completion, create_apr_agent
from apr_agents.backends.base import first_stop
from apr_agents.protocol import get_dialect
from apr_agents.testing import ScriptedBackend
from apr_agents.testing.scripted import tokenize

Q = {"messages": [HumanMessage("go")]}


class Hostile:
    """FAKE model that answers every prompt with the same text, whatever it already wrote.

    Cut at the call's stop strings like an engine; ``latency(prompt)`` seconds per token.
    """

    def __init__(self, reply: str | Callable[[str], str], latency: Callable[[str], float] = lambda p: 0.0) -> None:
        self.reply = reply
        self.latency = latency
        self.calls = 0

    def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str:
        return "".join(f"{m.type}: {m.content}\n" for m in messages) + "assistant: "

    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                       temperature: float = 0.0) -> Completion:
        final = None
        async for item in self.stream(prompt, stop=stop, max_tokens=max_tokens):
            final = item
        assert isinstance(final, Completion)
        return final

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        self.calls += 1
        text, hit = first_stop(self.reply(prompt) if callable(self.reply) else self.reply, stop)
        pieces = tokenize(text)
        finish = "stop" if hit else "eos"
        if len(pieces) > max_tokens:
            pieces, hit, finish = pieces[:max_tokens], None, "length"
        delay = self.latency(prompt)
        for p in pieces:
            if delay:
                await asyncio.sleep(delay)
            yield p
        yield Completion(text="".join(pieces), stop=hit, finish_reason=finish, prompt_tokens=len(prompt) // 4,
                         completion_tokens=len(pieces))


def bomb(n: int, dialect: str = "canonical", tail: str = " done") -> str:
    """n outlines (one token each), the spawn marker, a tail, a thread close."""
    d = get_dialect(dialect)
    if dialect == "apr":
        return "spawn(" + json.dumps([f"t{i}" for i in range(1, n + 1)]) + ")" + tail + d.thread_close
    outlines = "\n".join(f"{d.outline_open}{i}:t{i}{d.outline_close}" for i in range(1, n + 1))
    return f"{d.parallel_open}\n{d.outlines_open}\n{outlines}\n{d.spawn_marker}{tail}{d.thread_close}"


def limits_hit(state: dict[str, Any]) -> set[str]:
    return {e["limit"] for e in state["apr_trace"]["limits"]}


def branch_count(state: dict[str, Any]) -> int:
    return sum(1 for c in state["apr_trace"]["contexts"].values() if c["depth"] >= 1)


@pytest.mark.parametrize("dialect", ["canonical", "multiverse", "apr"])
async def test_ten_thousand_outlines_in_every_reply(dialect: str) -> None:
    """Every call answers with 10,000 outlines: max_threads per spawn, max_total_threads per run,
    max_tokens per context end it; memory stays bounded (measured once: tracemalloc is slow)."""
    backend = Hostile(bomb(10_000, dialect))
    cfg = APRConfig(dialect=dialect, max_threads=3, max_total_threads=6, max_depth=3, max_tokens=12_000,
                    run_timeout_s=60)
    measure = dialect == "canonical"
    if measure:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        state = await create_apr_agent(backend, [], cfg).ainvoke(Q)
        peak = tracemalloc.get_traced_memory()[1] if measure else 0
    finally:
        tracemalloc.stop()
    wall = time.perf_counter() - t0
    ctxs = state["apr_trace"]["contexts"]
    assert branch_count(state) == 6  # the run's budget, not 10,000 ** depth
    assert all(len(g) <= 3 for c in ctxs.values() for g in c["spawns"])
    assert {"max_threads", "max_total_threads", "max_tokens"} <= limits_hit(state)
    assert all(c["completion_tokens"] <= 12_000 and c["end"] is not None for c in ctxs.values())
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # each context holds ~12k tokens of text
    assert wall < 60
    json.dumps(state["apr_trace"])


@pytest.mark.parametrize("dialect", ["canonical", "multiverse", "apr"])
async def test_nesting_a_hundred_deep_stops_at_max_depth(dialect: str) -> None:
    """Every context spawns one branch, which spawns one branch...: it stops at max_depth, and the
    spawn written past it is recorded."""
    backend = Hostile(bomb(1, dialect, tail=" back"))
    state = await create_apr_agent(backend, [], APRConfig(dialect=dialect, max_depth=3, max_steps=8)).ainvoke(Q)
    ctxs = state["apr_trace"]["contexts"]
    assert max(c["depth"] for c in ctxs.values()) == 3
    assert "max_depth" in limits_hit(state)
    assert all(c["spawns"] == [] for c in ctxs.values() if c["depth"] == 3)
    assert all(c["end"] is not None for c in ctxs.values())


async def test_a_hundred_levels_in_one_reply() -> None:
    """Every reply nests 100 blocks: spawns down to max_depth, deeper levels are written inline, and
    each inline </Thread> costs a call, so max_steps / max_tokens bound the deepest branch."""
    d = 100
    text = ("<Parallel><Outlines><Outline>1: a</Outline></Outlines><Thread>1: " * d
            + "leaf" + "</Thread></Parallel>" * d + " end")
    cfg = APRConfig(max_depth=2, max_steps=20, max_total_threads=10)
    t0 = time.perf_counter()
    state = await create_apr_agent(Hostile(text), [], cfg).ainvoke(Q)
    assert time.perf_counter() - t0 < 30
    ctxs = state["apr_trace"]["contexts"]
    assert max(c["depth"] for c in ctxs.values()) == 2 and branch_count(state) == 2
    assert all(c["calls"] <= 20 and c["end"] is not None for c in ctxs.values())
    deepest = next(c for c in ctxs.values() if c["depth"] == 2)
    assert deepest["end"] in ("max_steps", "max_tokens") and deepest["spawns"] == []
    assert {"max_depth", deepest["end"]} <= limits_hit(state)


async def test_a_thread_that_never_closes_hits_its_token_budget() -> None:
    script = {"": bomb(2, tail="\nmerged."), "*": " forever" * 5000}
    state = await create_apr_agent(ScriptedBackend(script), [], APRConfig(max_tokens=300)).ainvoke(Q)
    for i in (1, 2):
        rec = state["apr_trace"]["contexts"][f"root/1.{i}"]
        assert rec["end"] == "max_tokens" and rec["truncated"] and rec["completion_tokens"] == 300
    assert limits_hit(state) == {"max_tokens"}
    assert state["messages"][-1].content == "merged."  # the parent went on after the merge


async def test_a_slow_thread_that_never_closes_hits_thread_timeout() -> None:
    script = {"": bomb(2, tail="\nmerged."), "1": " slow" * 10_000, "2": " quick</Thread>"}
    backend = ScriptedBackend(script, token_latency_s=0.01)
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [], APRConfig(thread_timeout_s=0.5, max_tokens=100_000)).ainvoke(Q)
    assert time.perf_counter() - t0 < 5
    slow = state["apr_trace"]["contexts"]["root/1.1"]
    assert slow["end"] == "timeout" and slow["truncated"] and 0 < slow["completion_tokens"] < 10_000
    assert " slow slow" in slow["text"]  # what was streamed before the deadline is kept
    assert state["apr_trace"]["contexts"]["root/1.2"]["end"] == "thread_end"
    assert limits_hit(state) == {"thread_timeout_s"}
    assert state["messages"][-1].content == "merged."


async def test_run_deadline_ends_a_fork_bomb_with_slow_branches() -> None:
    backend = Hostile(lambda p: bomb(50) if p.endswith("assistant: ") else " zz" * 10_000,
                      latency=lambda p: 0.0 if p.endswith("assistant: ") else 0.01)
    cfg = APRConfig(max_threads=50, max_total_threads=50, run_timeout_s=1.0, thread_timeout_s=100,
                    max_tokens=100_000, llm_concurrency=5)
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [], cfg).ainvoke(Q)
    # the run's deadline, not the 100 s thread budget; and branches queued behind llm_concurrency
    # do not get a fresh budget when their turn comes (10 waves of 5 took 10 s before the fix)
    assert time.perf_counter() - t0 < 4
    assert "run_timeout_s" in limits_hit(state)
    branches = [c for c in state["apr_trace"]["contexts"].values() if c["depth"] == 1]
    assert len(branches) == 50 and all(c["end"] == "timeout" for c in branches)
    assert state["apr_trace"]["contexts"]["root"]["end"] == "timeout"


async def test_max_steps_bounds_a_model_that_loops_on_stray_stops() -> None:
    """A branch that writes an inline block's </Thread> over and over costs one call each: bounded."""
    script = {"": bomb(1), "1": " <Parallel>" + "<Thread>1: x</Thread>" * 1000}
    state = await create_apr_agent(ScriptedBackend(script), [], APRConfig(max_steps=15, max_depth=1)).ainvoke(Q)
    rec = state["apr_trace"]["contexts"]["root/1.1"]
    assert rec["end"] == "max_steps" and rec["calls"] == 15
    assert "max_steps" in limits_hit(state)


async def test_total_thread_budget_is_per_run_not_per_agent() -> None:
    graph = create_apr_agent(Hostile(bomb(3)), [], APRConfig(max_total_threads=3, max_depth=1, max_steps=4))
    first = await graph.ainvoke(Q)
    second = await graph.ainvoke(Q)  # a fresh run gets a fresh budget
    assert branch_count(first) == branch_count(second) == 3
