"""Streaming: with LangGraph's stream modes a consumer tells every branch's events apart.

A two-way spawn: branch 1 calls a tool; branch 2 spawns a nested branch. The
FAKE ScriptedBackend streams its replies piece by piece, so branch tokens flow.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph

from apr_agents import create_apr_agent
from apr_agents.graph.core import BRANCH_TASKS
from apr_agents.graph.streaming import APR_EVENTS, stream_events
from apr_agents.testing import ScriptedBackend


def call(name: str, **args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


@tool
async def echo(text: str) -> str:
    """Return the text."""
    return f"echo {text}"


SCRIPT = {
    "": "Go.\n<Parallel>\n<Outlines>\n<Outline>1: look up a</Outline>\n<Outline>2: split b</Outline>\n"
        "</Outlines>\nDone: both.",
    "1": f" first {call('echo', text='one')} a is fine</Thread>",
    "2": " nested\n<Parallel>\n<Outlines>\n<Outline>1: deeper c</Outline>\n</Outlines>\nb is fine</Thread>",
    "2/1": " c is fine</Thread>",
}
Q = {"messages": [HumanMessage("question")]}
MODES = ["direct", "tasks"]  # branch steps called directly (no checkpointer), or as LangGraph tasks


def agent_and_config(mode: str, **kw: Any) -> tuple[Any, dict[str, Any]]:
    """The agent, and the run config: a checkpointed run (``tasks``) needs a thread id."""
    if mode == "direct":
        return create_apr_agent(ScriptedBackend(SCRIPT, **kw), [echo]), {}
    graph = create_apr_agent(ScriptedBackend(SCRIPT, **kw), [echo], checkpointer=InMemorySaver())
    return graph, {"configurable": {"thread_id": f"t-{next(_threads)}"}}


_threads = itertools.count()


def model_text(reply: str) -> str:
    """What the model itself writes in a context: the reply without the stop strings."""
    return reply.replace("</tool_call>", "").replace("</Outlines>", "").replace("</Thread>", "")


async def collect(graph: Any, config: dict[str, Any], **kw: Any) -> list[tuple[tuple[str, ...], str, Any]]:
    out = []
    async for item in graph.astream(Q, config, stream_mode=["updates", "custom", "messages"], **kw):
        out.append(item if len(item) == 3 else ((), *item))
    return out


def check_events_per_context(custom: list[dict[str, Any]]) -> None:
    """What each context's own events must say, told apart by their ``ctx`` alone."""
    by_ctx: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in custom:
        by_ctx[ev["ctx"]].append(ev)
    # spawn, with its outlines, in the parent
    spawns = [ev for ev in by_ctx["root"] if ev["apr"] == "spawn"]
    assert spawns == [{"apr": "spawn", "ctx": "root", "outlines": [["1", "look up a"], ["2", "split b"]]}]
    assert [ev["outlines"] for ev in by_ctx["root/1.2"] if ev["apr"] == "spawn"] == [[["1", "deeper c"]]]
    # branch tokens: each branch's own text, nothing of its siblings'
    for cid, path in (("root/1.1", "1"), ("root/1.2", "2"), ("root/1.2/1.1", "2/1")):
        tokens = "".join(ev["text"] for ev in by_ctx[cid] if ev["apr"] == "token")
        assert tokens == model_text(SCRIPT[path]), cid
    # tool start/end in the branch that called it
    tools = [(ev["apr"], ev["name"]) for ev in by_ctx["root/1.1"] if ev["apr"].startswith("tool_")]
    assert tools == [("tool_start", "echo"), ("tool_end", "echo")]
    assert not any(ev["apr"].startswith("tool_") for c, evs in by_ctx.items() if c != "root/1.1" for ev in evs)
    # lifecycle order inside each branch: start first, end last
    for cid in ("root/1.1", "root/1.2", "root/1.2/1.1"):
        kinds = [ev["apr"] for ev in by_ctx[cid]]
        assert kinds[0] == "branch_start" and kinds[-1] == "branch_end", (cid, kinds)
        assert by_ctx[cid][-1]["end"] == "thread_end" and by_ctx[cid][-1]["tokens"] > 0
        assert by_ctx[cid][0]["outline"] and by_ctx[cid][0]["depth"] == cid.count("/")
    # merge: children in outline order, after every child ended
    order = [(ev["apr"], ev["ctx"]) for ev in custom]
    merges = [ev for ev in custom if ev["apr"] == "merge"]
    assert [m["ctx"] for m in merges] == ["root/1.2", "root"]
    assert merges[1]["children"] == ["root/1.1", "root/1.2"]
    assert merges[0]["children"] == ["root/1.2/1.1"]
    root_merge = order.index(("merge", "root"))
    assert all(order.index(("branch_end", c)) < root_merge for c in ("root/1.1", "root/1.2", "root/1.2/1.1"))


@pytest.mark.parametrize("mode", MODES)
async def test_each_branch_is_told_apart_by_its_context(mode: str) -> None:
    for subgraphs in (True, False):  # branches are no subgraphs: the flag changes nothing
        graph, config = agent_and_config(mode, token_latency_s=0.001)
        items = await collect(graph, config, subgraphs=subgraphs)
        custom = [ev for _, mode_, ev in items if mode_ == "custom"]
        assert {ev["apr"] for ev in custom} == set(APR_EVENTS)
        check_events_per_context([ev for ev in custom if ev["apr"] != "step"])
        # each branch node that finished, as a custom step event in its own context
        steps = {(ev["ctx"], ev["node"]) for ev in custom if ev["apr"] == "step"}
        assert {("root/1.1", "generate"), ("root/1.1", "tools"), ("root/1.2", "branch"), ("root/1.2", "merge"),
                ("root/1.2/1.1", "generate")} <= steps
        assert {node for _, node in steps} == {"generate", "tools", "branch", "merge"}
        assert not any(ctx == "root" for ctx, _ in steps)  # the root's nodes report as updates
        nodes = [node for _, mode_, upd in items if mode_ == "updates" for node in upd]
        assert [n for n in nodes if n not in BRANCH_TASKS] == ["prepare", "generate", "branch", "branch", "merge",
                                                               "generate"]
        # a checkpointed run's branch steps are tasks, whose results LangGraph reports as updates too
        assert {n for n in nodes if n in BRANCH_TASKS} == (set(BRANCH_TASKS) if mode == "tasks" else set())
        # messages: the answer, from the root's last generate step (which closed the root context)
        msgs = [(m, meta) for _, mode_, (m, meta) in ((i[0], i[1], i[2]) for i in items if i[1] == "messages")]
        assert [(m.content, meta["langgraph_node"]) for m, meta in msgs] == [("Done: both.", "generate")]
        assert isinstance(msgs[0][0], AIMessage)


@pytest.mark.parametrize("mode", MODES)
async def test_stream_events_normalises_and_ends_with_done(mode: str) -> None:
    graph, config = agent_and_config(mode)
    events = [ev async for ev in stream_events(graph, Q, config)]
    assert events[-1]["apr"] == "done" and events[-1]["answer"] == "Done: both."
    assert events[-1]["state"]["apr_trace"]["summary"]["branches"] == 3
    assert all({"apr", "ctx", "ns", "t"} <= ev.keys() for ev in events)
    steps = [ev for ev in events if ev["apr"] == "step"]
    assert not any(ev["node"] in BRANCH_TASKS for ev in steps)  # told as the branch's own steps
    assert {(ev["ctx"], ev["node"]) for ev in steps} >= {("root/1.1", "tools"), ("root", "merge"),
                                                          ("root/1.2", "merge"), ("root/1.2/1.1", "generate")}
    ts = [ev["t"] for ev in events]
    assert ts == sorted(ts)
    if mode == "tasks":
        config = {"configurable": {"thread_id": "quiet"}}
    quiet = [ev async for ev in stream_events(graph, Q, config, steps=False)]
    assert not any(ev["apr"] == "step" for ev in quiet) and quiet[-1]["answer"] == "Done: both."


@pytest.mark.parametrize("mode", MODES)
async def test_events_keep_their_context_when_the_agent_is_a_node_of_a_user_graph(mode: str) -> None:
    agent = create_apr_agent(ScriptedBackend(SCRIPT), [echo])
    outer = StateGraph(MessagesState)
    outer.add_node("agent", agent)
    outer.add_edge(START, "agent")
    graph = outer.compile(checkpointer=InMemorySaver() if mode == "tasks" else None)
    config = {"configurable": {"thread_id": "outer"}} if mode == "tasks" else {}
    events = [ev async for ev in stream_events(graph, Q, config)]
    assert events[-1]["answer"] == "Done: both."
    starts = {ev["ctx"] for ev in events if ev["apr"] == "branch_start"}
    assert starts == {"root/1.1", "root/1.2", "root/1.2/1.1"}
    root_spawn = next(ev for ev in events if ev["apr"] == "spawn" and ev["ctx"] == "root")
    assert root_spawn["ns"].startswith("agent:")  # the whole agent runs under the user's node


@pytest.mark.parametrize("mode", MODES)
def test_sync_stream_carries_every_branch_event(mode: str) -> None:
    """The sync facade runs nodes on a shared loop; the caller's stream writer goes with them."""
    graph, config = agent_and_config(mode)
    custom = [ev for _, ev in graph.stream(Q, config, stream_mode="custom", subgraphs=True)]
    check_events_per_context([ev for ev in custom if ev["apr"] != "step"])
