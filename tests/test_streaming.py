"""Streaming: with LangGraph's stream modes a consumer tells every branch's events apart.

A two-way spawn: branch 1 calls a tool; branch 2 spawns a nested branch. The
FAKE ScriptedBackend streams its replies piece by piece, so branch tokens flow.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph

from apr_agents import APRConfig, create_apr_agent
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
SUBGRAPH = APRConfig(branch_runs="subgraph")
INLINE = APRConfig(branch_runs="inline")


def model_text(reply: str) -> str:
    """What the model itself writes in a context: the reply without the stop strings."""
    return reply.replace("</tool_call>", "").replace("</Outlines>", "").replace("</Thread>", "")


async def collect(graph: Any, **kw: Any) -> list[tuple[tuple[str, ...], str, Any]]:
    out = []
    async for item in graph.astream(Q, stream_mode=["updates", "custom", "messages"], **kw):
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


async def test_each_branch_is_told_apart_with_subgraphs() -> None:
    graph = create_apr_agent(ScriptedBackend(SCRIPT, token_latency_s=0.001), [echo], SUBGRAPH)
    items = await collect(graph, subgraphs=True)
    custom = [(ns, ev) for ns, mode, ev in items if mode == "custom"]
    assert {ev["apr"] for _, ev in custom} == set(APR_EVENTS) - {"step"}  # steps come as updates

    # one namespace per context: the branch_start event names it, every later event agrees
    ns_of: dict[str, tuple[str, ...]] = {"root": ()}
    for ns, ev in custom:
        if ev["apr"] == "branch_start":
            assert ev["ctx"] not in ns_of
            ns_of[ev["ctx"]] = ns
    assert sorted(ns_of) == ["root", "root/1.1", "root/1.2", "root/1.2/1.1"]
    assert len(set(ns_of.values())) == 4
    assert ns_of["root/1.2/1.1"][:-1] == ns_of["root/1.2"]  # the nested branch sits under its parent
    for ns, ev in custom:
        assert ns == ns_of[ev["ctx"]], ev

    check_events_per_context([ev for _, ev in custom])

    # updates: every node update of a branch comes in that branch's namespace and names its context
    for ns, mode, upd in items:
        if mode != "updates":
            continue
        for node, val in upd.items():
            if isinstance(val, dict) and "apr" in val:
                assert ns_of[val["apr"]["id"]] == ns, (node, ns)
    branch_nodes = {node for ns, mode, upd in items if mode == "updates" and ns == ns_of["root/1.1"] for node in upd}
    assert branch_nodes == {"generate", "tools"}  # set up in its first generate, closed in its last

    # messages: the answer, from the root's last generate step (which closed the root context)
    msgs = [(ns, m, meta) for ns, mode, (m, meta) in ((i[0], i[1], i[2]) for i in items if i[1] == "messages")]
    assert [(ns, m.content, meta["langgraph_node"]) for ns, m, meta in msgs] == [((), "Done: both.", "generate")]
    assert isinstance(msgs[0][1], AIMessage)


async def test_inline_branches_stream_from_the_branch_node_told_apart_by_context() -> None:
    graph = create_apr_agent(ScriptedBackend(SCRIPT, token_latency_s=0.001), [echo], INLINE)
    for subgraphs in (True, False):  # inline branches are no subgraphs: the flag changes nothing
        items = await collect(graph, subgraphs=subgraphs)
        custom = [ev for ns, mode, ev in items if mode == "custom" and ns == ()]
        assert len(custom) == len([1 for _, mode, _ in items if mode == "custom"])
        assert {ev["apr"] for ev in custom} == set(APR_EVENTS)
        check_events_per_context([ev for ev in custom if ev["apr"] != "step"])
        # each branch node that finished, as a custom step event in its own context
        steps = {(ev["ctx"], ev["node"]) for ev in custom if ev["apr"] == "step"}
        assert {("root/1.1", "generate"), ("root/1.1", "tools"), ("root/1.2", "branch"), ("root/1.2", "merge"),
                ("root/1.2/1.1", "generate")} <= steps
        assert {node for _, node in steps} == {"generate", "tools", "branch", "merge"}
        assert not any(ctx == "root" for ctx, _ in steps)  # the root's nodes report as updates
        updates = [upd for _, mode, upd in items if mode == "updates"]
        assert [node for upd in updates for node in upd] == [
            "prepare", "generate", "branch", "branch", "merge", "generate"]


async def test_without_subgraphs_only_the_root_graph_events_arrive() -> None:
    graph = create_apr_agent(ScriptedBackend(SCRIPT), [echo], SUBGRAPH)
    items = await collect(graph)
    custom = [ev for _, mode, ev in items if mode == "custom"]
    assert {ev["ctx"] for ev in custom} == {"root"}
    assert [ev["apr"] for ev in custom if ev["apr"] != "token"] == ["spawn", "merge"]
    assert "".join(ev["text"] for ev in custom if ev["apr"] == "token").startswith("Go.\n<Parallel>")


@pytest.mark.parametrize("config", [SUBGRAPH, INLINE], ids=["subgraph", "inline"])
async def test_stream_events_normalises_and_ends_with_done(config: APRConfig) -> None:
    graph = create_apr_agent(ScriptedBackend(SCRIPT), [echo], config)
    events = [ev async for ev in stream_events(graph, Q)]
    assert events[-1]["apr"] == "done" and events[-1]["answer"] == "Done: both."
    assert events[-1]["state"]["apr_trace"]["summary"]["branches"] == 3
    assert all({"apr", "ctx", "ns", "t"} <= ev.keys() for ev in events)
    ns_of = {ev["ctx"]: ev["ns"] for ev in events if ev["apr"] == "branch_start"}
    steps = [ev for ev in events if ev["apr"] == "step"]
    for ev in steps:
        assert ev["ns"] == ns_of.get(ev["ctx"], ""), ev
    assert {(ev["ctx"], ev["node"]) for ev in steps} >= {("root/1.1", "tools"), ("root", "merge"),
                                                          ("root/1.2", "merge"), ("root/1.2/1.1", "generate")}
    ts = [ev["t"] for ev in events]
    assert ts == sorted(ts)
    quiet = [ev async for ev in stream_events(graph, Q, steps=False)]
    assert not any(ev["apr"] == "step" for ev in quiet) and quiet[-1]["answer"] == "Done: both."


@pytest.mark.parametrize("config", [SUBGRAPH, INLINE], ids=["subgraph", "inline"])
async def test_events_keep_their_context_when_the_agent_is_a_node_of_a_user_graph(config: APRConfig) -> None:
    agent = create_apr_agent(ScriptedBackend(SCRIPT), [echo], config)
    outer = StateGraph(MessagesState)
    outer.add_node("agent", agent)
    outer.add_edge(START, "agent")
    graph = outer.compile()
    events = [ev async for ev in stream_events(graph, Q)]
    assert events[-1]["answer"] == "Done: both."
    starts = {ev["ctx"] for ev in events if ev["apr"] == "branch_start"}
    assert starts == {"root/1.1", "root/1.2", "root/1.2/1.1"}
    root_spawn = next(ev for ev in events if ev["apr"] == "spawn" and ev["ctx"] == "root")
    assert root_spawn["ns"].startswith("agent:")  # the whole agent runs under the user's node


@pytest.mark.parametrize("config", [SUBGRAPH, INLINE], ids=["subgraph", "inline"])
def test_sync_stream_carries_every_branch_event(config: APRConfig) -> None:
    """The sync facade runs nodes on a shared loop; the caller's stream writer goes with them."""
    graph = create_apr_agent(ScriptedBackend(SCRIPT), [echo], config)
    custom = [ev for _, ev in graph.stream(Q, stream_mode="custom", subgraphs=True)]
    check_events_per_context([ev for ev in custom if ev["apr"] != "step"])
