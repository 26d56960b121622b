"""The Multiverse and APR dialects execute end to end like the canonical one (FAKE backend)."""

from __future__ import annotations

import time

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from apr_agents import APRConfig, create_apr_agent
from apr_agents.testing import Rule, ScriptedBackend

Q = {"messages": [HumanMessage("q")]}


@tool
async def nap(tag: str) -> str:
    """Sleep 1 s, echo the tag."""
    import asyncio

    await asyncio.sleep(1.0)
    return tag


async def test_multiverse_dialect_spawns_and_merges() -> None:
    call = '<tool_call>{"name": "nap", "arguments": {"tag": "T"}}</tool_call>'
    root = ("Think.\n<Parallel>\n<Goal>\n<Outline>\n1: left\n</Outline>\n<Outline>\n2: right\n</Outline>\n</Goal>\n"
            "<Conclusion>\nboth done\n</Conclusion>\n</Parallel>\nAnswer: 7")
    script = {"": root, "1": f" L {call} left-done</Path>", "2": f" R {call} right-done</Path>"}
    t0 = time.perf_counter()
    state = await create_apr_agent(ScriptedBackend(script, dialect="multiverse"), [nap],
                                   APRConfig(dialect="multiverse")).ainvoke(Q)
    assert time.perf_counter() - t0 < 1.7  # two 1 s tools overlapped (one after the other: 2 s)
    text = state["apr_trace"]["transcript"]
    assert "<Path>\n1: L" in text and "<Path>\n2: R" in text
    assert text.index("left-done") < text.index("right-done") < text.index("<Conclusion>")
    assert state["messages"][-1].content == "Answer: 7"
    assert state["apr_trace"]["summary"]["branches"] == 2


async def test_apr_spawn_join_dialect() -> None:
    def child(prompt: str) -> str:
        label = prompt.rsplit("[child ", 1)[1].split("]", 1)[0]
        return f" worked on {label} join("

    rules = [
        Rule(child, contains=r"\[child \d+\]$|\[child \d+\] worked"),
        Rule('Splitting. spawn(["count apples", "count pears"])\nGot both: 5 fruit.'),
    ]
    backend = ScriptedBackend(rules, dialect="apr")
    state = await create_apr_agent(backend, [], APRConfig(dialect="apr")).ainvoke(Q)
    text = state["apr_trace"]["transcript"]
    assert 'join(["worked on 1", "worked on 2"])' in text
    assert state["messages"][-1].content == "Got both: 5 fruit."
    ctxs = state["apr_trace"]["contexts"]
    assert ctxs["root/1.1"]["outline"] == "count apples"
    assert ctxs["root/1.2"]["end"] == "thread_end"
