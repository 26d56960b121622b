"""Fork bombs and budgets: a hostile model cannot make a run hang, grow without bound or hide it.

Every test drives the FAKE ScriptedBackend with a model that answers every prompt with the same
hostile text, and checks that the run ends within its limits, with the limit named in
``state["apr_trace"]["limits"]``.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from apr_agents import APRConfig, ScriptedBackend, create_apr_agent
from apr_agents.protocol import get_dialect

Q = {"messages": [HumanMessage("go")]}


def bomb(n: int, dialect: str = "canonical", tail: str = " done") -> str:
    d = get_dialect(dialect)
    if dialect == "apr":
        return "spawn(" + json.dumps([f"task {i}" for i in range(1, n + 1)]) + ")" + tail + d.thread_close
    outlines = "\n".join(f"{d.outline_open}{i}: task {i}{d.outline_close}" for i in range(1, n + 1))
    return f"{d.parallel_open}\n{d.outlines_open}\n{outlines}\n{d.spawn_marker}{tail}{d.thread_close}"


def limits_hit(state: dict[str, Any]) -> set[str]:
    return {e["limit"] for e in state["apr_trace"]["limits"]}


def branch_count(state: dict[str, Any]) -> int:
    return sum(1 for c in state["apr_trace"]["contexts"].values() if c["depth"] >= 1)


@pytest.mark.parametrize("dialect", ["canonical", "multiverse", "apr"])
async def test_ten_thousand_outlines_everywhere(dialect: str) -> None:
    """Every context writes 10,000 outlines: max_threads per spawn, max_total_threads per run."""
    backend = ScriptedBackend(lambda prompt: bomb(10_000, dialect), dialect=dialect)
    cfg = APRConfig(dialect=dialect, max_threads=4, max_total_threads=12, max_depth=3, max_tokens=200_000,
                    run_timeout_s=60)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        state = await create_apr_agent(backend, [], cfg).ainvoke(Q)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    wall = time.perf_counter() - t0
    assert branch_count(state) == 12  # 4 + 4 + 4: the budget, not 10,000 ** depth
    assert {"max_threads", "max_total_threads"} <= limits_hit(state)
    spawns = [g for c in state["apr_trace"]["contexts"].values() for g in c["spawns"]]
    assert all(len(g) <= 4 for g in spawns)
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # text is ~0.3 MB per context
    assert wall < 60
    json.dumps(state["apr_trace"])


async def test_hundred_deep_nesting_stops_at_max_depth() -> None:
    """Every context spawns one branch: recursion stops at max_depth and the trace says so."""
    one = "<Parallel>\n<Outlines>\n<Outline>1: go deeper</Outline>\n</Outlines>\n back</Thread>"
    backend = ScriptedBackend(lambda prompt: one)
    state = await create_apr_agent(backend, [], APRConfig(max_depth=3)).ainvoke(Q)
    depths = [c["depth"] for c in state["apr_trace"]["contexts"].values()]
    assert max(depths) == 3 and branch_count(state) == 3
    assert "max_depth" in limits_hit(state)
    deepest = next(c for c in state["apr_trace"]["contexts"].values() if c["depth"] == 3)
    assert deepest["spawns"] == [] and "<Outline>1: go deeper</Outline>" in deepest["text"]  # written inline


async def test_a_hundred_levels_in_one_reply() -> None:
    """One reply nests 100 blocks: spawns down to max_depth, the rest is written inline, bounded."""
    d = 100
    text = ("<Parallel><Outlines><Outline>1: a</Outline></Outlines><Thread>1: " * d
            + "leaf" + "</Thread></Parallel>" * d + " end")
    backend = ScriptedBackend(lambda prompt: text)
    cfg = APRConfig(max_depth=2, max_steps=20, max_total_threads=10)
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [], cfg).ainvoke(Q)
    assert time.perf_counter() - t0 < 30
    ctxs = state["apr_trace"]["contexts"]
    assert max(c["depth"] for c in ctxs.values()) == 2
    # the depth-2 branch writes 100 levels inline: each inner </Thread> costs a call until max_steps
    assert "max_steps" in limits_hit(state) or all(c["end"] is not None for c in ctxs.values())
    assert all(c["calls"] <= 20 for c in ctxs.values())
    assert "max_depth" in limits_hit(state)


async def test_a_thread_that_never_closes_hits_its_token_budget() -> None:
    script = {"": bomb(2, tail="\nmerged."), "*": " forever" * 5000}
    state = await create_apr_agent(ScriptedBackend(script), [], APRConfig(max_tokens=300)).ainvoke(Q)
    for i in (1, 2):
        rec = state["apr_trace"]["contexts"][f"root/1.{i}"]
        assert rec["end"] == "max_tokens" and rec["truncated"] and rec["completion_tokens"] == 300
    assert limits_hit(state) == {"max_tokens"}
    assert state["messages"][-1].content.endswith("merged.")


async def test_a_slow_thread_that_never_closes_hits_thread_timeout() -> None:
    script = {"": bomb(2, tail="\nmerged."), "1": " slow" * 10_000, "2": " quick</Thread>"}
    backend = ScriptedBackend(script, token_latency_s=0.01)
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [], APRConfig(thread_timeout_s=0.5, max_tokens=100_000)).ainvoke(Q)
    assert time.perf_counter() - t0 < 5
    slow = state["apr_trace"]["contexts"]["root/1.1"]
    assert slow["end"] == "timeout" and slow["truncated"] and 0 < slow["completion_tokens"] < 10_000
    assert state["apr_trace"]["contexts"]["root/1.2"]["end"] == "thread_end"
    assert limits_hit(state) == {"thread_timeout_s"}


async def test_run_deadline_ends_a_fork_bomb_with_slow_branches() -> None:
    backend = ScriptedBackend(lambda prompt: bomb(50) if prompt.endswith("### Assistant\n") else " " + "zz " * 10_000,
                              token_latency_s=0.01)
    cfg = APRConfig(max_threads=50, max_total_threads=50, run_timeout_s=0.8, thread_timeout_s=100,
                    max_tokens=100_000)
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [], cfg).ainvoke(Q)
    assert time.perf_counter() - t0 < 5  # the deadline, not the 100 s thread budget
    assert "run_timeout_s" in limits_hit(state)
    branches = [c for c in state["apr_trace"]["contexts"].values() if c["depth"] == 1]
    assert len(branches) == 50 and all(c["end"] == "timeout" for c in branches)


async def test_max_steps_bounds_a_model_that_loops_on_stray_stops() -> None:
    """A branch that writes an inline block's </Thread> over and over costs one call each: bounded."""
    script = {"": bomb(1), "1": " <Parallel>" + "<Thread>1: x</Thread>" * 1000}
    state = await create_apr_agent(ScriptedBackend(script), [], APRConfig(max_steps=15, max_depth=1)).ainvoke(Q)
    rec = state["apr_trace"]["contexts"]["root/1.1"]
    assert rec["end"] == "max_steps" and rec["calls"] == 15
    assert "max_steps" in limits_hit(state)


async def test_total_thread_budget_is_per_run_not_per_agent() -> None:
    backend = ScriptedBackend(lambda prompt: bomb(3))
    graph = create_apr_agent(backend, [], APRConfig(max_total_threads=3, max_depth=1))
    first = await graph.ainvoke(Q)
    second = await graph.ainvoke(Q)  # a fresh run gets a fresh budget
    assert branch_count(first) == branch_count(second) == 3
