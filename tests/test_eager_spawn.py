"""Eager spawn (``APRConfig(spawn_at="outline")``): branches start as their outlines close."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from apr_agents import APRConfig, create_apr_agent
from apr_agents.testing import ScriptedBackend

Q = {"messages": [HumanMessage("q")]}


def call(name: str, **args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


@tool
async def fetch(item: int) -> str:
    """Fetch an item (0.3 s)."""
    await asyncio.sleep(0.3)
    return f"item {item} = {item * 10}"


def script(n: int) -> dict[str, str]:
    outlines = "".join(f"<Outline>{i}: get item {i}</Outline>\n" for i in range(1, n + 1))
    return {"": f"Plan.\n<Parallel>\n<Outlines>\n{outlines}</Outlines>\nDone.",
            **{str(i): call("fetch", item=i) + f"\nfound {i}</Thread>" for i in range(1, n + 1)}}


async def test_eager_branches_start_before_the_next_outline_and_merge_in_order() -> None:
    backend = ScriptedBackend(script(3), call_latency_s=0.05)
    state = await create_apr_agent(backend, [fetch], APRConfig(spawn_at="outline")).ainvoke(Q)
    assert state["messages"][-1].content.strip() == "Done."
    text = state["apr_trace"]["transcript"]
    # the merge writes every thread in outline order, after the spawn point, as by default
    assert text.index("</Outlines>") < text.index("<Thread>1:") < text.index("<Thread>2:") < text.index("<Thread>3:")
    assert all(f"found {i}</Thread>" in text for i in (1, 2, 3))
    prompts = backend.prompts
    first_branch = next(i for i, p in enumerate(prompts) if p.endswith("<Thread>1:"))
    outline_3 = next(i for i, p in enumerate(prompts) if p.endswith("<Outline>2: get item 2</Outline>"))
    assert first_branch < outline_3  # branch 1 was asked before the root wrote outline 3
    # a branch sees the outlines up to its own, not the later ones
    assert "<Outline>2:" not in prompts[first_branch]
    ctxs = state["apr_trace"]["contexts"]
    assert ctxs["root"]["spawns"] == [["root/1.1", "root/1.2", "root/1.3"]]
    assert state["apr_trace"]["summary"]["tool_calls"] == 3 and state["apr_trace"]["summary"]["branches"] == 3


async def test_eager_and_default_spawn_write_the_same_answer_and_tool_calls() -> None:
    outs = {}
    for mode in ("outlines", "outline"):
        state = await create_apr_agent(ScriptedBackend(script(4)), [fetch], APRConfig(spawn_at=mode)).ainvoke(Q)
        trace = state["apr_trace"]
        outs[mode] = (state["messages"][-1].content, trace["summary"]["tool_calls"], trace["summary"]["branches"],
                      sorted(trace["contexts"]))
    assert outs["outline"] == outs["outlines"]


async def test_eager_spawn_overlaps_the_outlines_with_the_branches_tool_calls() -> None:
    # each root call takes 0.3 s (one per outline in eager mode); each branch waits 0.3 s on its tool
    n = 4
    walls = {}
    for mode in ("outlines", "outline"):
        backend = ScriptedBackend(script(n), call_latency_s=0.3)
        t0 = time.perf_counter()
        await create_apr_agent(backend, [fetch], APRConfig(spawn_at=mode)).ainvoke(Q)
        walls[mode] = time.perf_counter() - t0
    # eager pays one root call per outline but starts each branch that much earlier; with a wide
    # margin it must not be slower than the default (the speed itself belongs to the benchmark)
    assert walls["outline"] < walls["outlines"] * 1.5 + 0.5, walls


async def test_eager_spawn_holds_the_limits() -> None:
    state = await create_apr_agent(ScriptedBackend(script(5)), [fetch],
                                   APRConfig(spawn_at="outline", max_threads=2)).ainvoke(Q)
    trace = state["apr_trace"]
    assert trace["summary"]["branches"] == 2 and "max_threads" in trace["summary"]["limits_hit"]
    state = await create_apr_agent(ScriptedBackend(script(5)), [fetch],
                                   APRConfig(spawn_at="outline", max_total_threads=3)).ainvoke(Q)
    trace = state["apr_trace"]
    assert trace["summary"]["branches"] == 3 and "max_total_threads" in trace["summary"]["limits_hit"]


async def test_cancelling_an_eager_run_stops_its_branches() -> None:
    finished: list[int] = []

    @tool
    async def slow(item: int) -> str:
        """Slow tool."""
        await asyncio.sleep(2)
        finished.append(item)
        return "ok"

    sc = script(3)
    for i in (1, 2, 3):
        sc[str(i)] = call("slow", item=i) + f"\nfound {i}</Thread>"
    graph = create_apr_agent(ScriptedBackend(sc, call_latency_s=0.05), [slow], APRConfig(spawn_at="outline"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(graph.ainvoke(Q), 0.8)
    await asyncio.sleep(2.5)
    assert finished == []


def test_eager_spawn_config_is_checked() -> None:
    with pytest.raises(ValueError, match="parallel=True"):
        APRConfig(spawn_at="outline", parallel=False)
    with pytest.raises(ValueError, match="tag dialect"):
        APRConfig(spawn_at="outline", dialect="apr")
    from apr_agents.testing import ScriptedChatModel

    with pytest.raises(ValueError, match="text-mode option"):
        create_apr_agent(ScriptedChatModel(respond=lambda m, t: "x"), [], APRConfig(spawn_at="outline"))




async def test_eager_branches_are_labelled_as_the_spawn_labels_them() -> None:
    # the model numbers two outlines "1": the spawn repairs the second to "2"; eager must agree
    sc = {"": "Plan.\n<Parallel>\n<Outlines>\n<Outline>1: get item 1</Outline>\n<Outline>1: get item 2</Outline>\n"
              "</Outlines>\nDone.",
          "1": call("fetch", item=1) + "\nfound 1</Thread>", "2": call("fetch", item=2) + "\nfound 2</Thread>"}
    outs = {}
    for mode in ("outlines", "outline"):
        state = await create_apr_agent(ScriptedBackend(sc), [fetch], APRConfig(spawn_at=mode)).ainvoke(Q)
        outs[mode] = (sorted(state["apr_trace"]["contexts"]), state["apr_trace"]["summary"]["tool_calls"])
    assert outs["outline"] == outs["outlines"] == (["root", "root/1.1", "root/1.2"], 2)
