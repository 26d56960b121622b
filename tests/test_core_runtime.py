"""Core runtime on the FAKE ScriptedBackend: spawn, merge, nesting, tools, limits, embedding.

Every test runs twice: with the branch steps called directly (a run without a
``thread_id``) and as LangGraph tasks (what a checkpointed run does; here a ``thread_id``
without a checkpointer, so each invocation is still a fresh run). Both must behave the same.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph

from apr_agents import APRConfig
from apr_agents import create_apr_agent as _create_apr_agent
from apr_agents.protocol import parse_document
from apr_agents.testing import ScriptedBackend

Q = {"messages": [HumanMessage("question")]}
BRANCH_STEPS = {"mode": "direct"}


@pytest.fixture(autouse=True, params=["direct", "tasks"])
def branch_steps(request: pytest.FixtureRequest) -> str:
    BRANCH_STEPS["mode"] = request.param
    return request.param


def create_apr_agent(backend: object, tools: object = (), config: APRConfig | None = None, **kw: object) -> object:
    """``create_apr_agent``, bound to a ``thread_id`` when this test runs the branch steps as tasks."""
    graph = _create_apr_agent(backend, tools, config, **kw)
    if BRANCH_STEPS["mode"] == "tasks":
        return graph.with_config(configurable={"thread_id": "tasks"})
    return graph


def spawn_text(n: int, tail: str = "Final answer.") -> str:
    outlines = "".join(f"<Outline>{i}: task {i}</Outline>\n" for i in range(1, n + 1))
    return f"Plan.\n<Parallel>\n<Outlines>\n{outlines}</Outlines>\n{tail}"


def call(name: str, **args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


@tool
async def wait(seconds: float, tag: str) -> str:
    """Sleep, then return the tag."""
    await asyncio.sleep(seconds)
    return f"done {tag}"


@tool
async def boom(x: int) -> str:
    """Always fails."""
    raise RuntimeError(f"boom {x}")


async def test_four_way_spawn_runs_tools_concurrently() -> None:
    script = {"": spawn_text(4)}
    for i in range(1, 5):
        script[str(i)] = f" step {call('wait', seconds=0.5, tag=str(i))} ok {i}</Thread>"
    graph = create_apr_agent(ScriptedBackend(script), [wait])
    t0 = time.perf_counter()
    state = await graph.ainvoke(Q)
    wall = time.perf_counter() - t0
    assert wall < 1.5, f"4 x 0.5 s tools took {wall:.2f} s: branches did not overlap"
    assert state["messages"][-1].content == "Final answer."
    summary = state["apr_trace"]["summary"]
    assert summary["branches"] == 4 and summary["tool_calls"] == 4
    assert summary["max_concurrent_branches"] == 4
    transcript = state["apr_trace"]["transcript"]
    for i in range(1, 5):
        assert f"<tool_response>done {i}</tool_response>" in transcript


async def test_sequential_mode_is_slower_and_gives_same_text() -> None:
    script = {"": spawn_text(3)}
    for i in range(1, 4):
        script[str(i)] = f" {call('wait', seconds=0.3, tag=str(i))} r{i}</Thread>"
    par = await create_apr_agent(ScriptedBackend(script), [wait]).ainvoke(Q)
    t0 = time.perf_counter()
    seq = await create_apr_agent(ScriptedBackend(script), [wait], APRConfig(parallel=False)).ainvoke(Q)
    assert time.perf_counter() - t0 >= 0.85  # three 0.3 s tools one after another
    assert seq["apr_trace"]["transcript"] == par["apr_trace"]["transcript"]
    assert seq["apr_trace"]["summary"]["max_concurrent_branches"] == 1


@pytest.mark.parametrize("parallel", [True, False])
async def test_the_trace_times_every_model_call(parallel: bool) -> None:
    """Each context's model calls are in the trace (start, duration, tokens), inside its own span;
    with a backend that serves calls at once, parallel branches' calls overlap, one after another not."""
    script = {"": spawn_text(3), **{str(i): f" {call('wait', seconds=0.1, tag=str(i))} r{i}</Thread>"
                                     for i in range(1, 4)}}
    graph = create_apr_agent(ScriptedBackend(script, call_latency_s=0.2), [wait], APRConfig(parallel=parallel))
    trace = (await graph.ainvoke(Q))["apr_trace"]
    for cid, rec in trace["contexts"].items():
        calls = rec["model_calls"]
        assert len(calls) == rec["calls"] >= 2, cid  # a branch: its tool call, then its result; the root: 2
        assert sum(c["completion_tokens"] for c in calls) == rec["completion_tokens"]
        for c in calls:
            assert rec["started"] - 1e-3 <= c["started"] and c["started"] + c["duration_s"] <= rec["ended"] + 1e-3
            assert c["duration_s"] >= 0.19  # the backend's latency
    summary = trace["summary"]
    assert summary["max_concurrent_model_calls"] == (3 if parallel else 1)
    assert summary["model_call_s"] >= 0.2 * summary["backend_calls"] - 1e-6


async def test_merge_keeps_outline_order_when_branches_finish_out_of_order() -> None:
    script = {"": spawn_text(3)}
    delays = {1: 0.4, 2: 0.0, 3: 0.2}
    for i, d in delays.items():
        script[str(i)] = f" {call('wait', seconds=d, tag=str(i))} result-{i}</Thread>"
    state = await create_apr_agent(ScriptedBackend(script), [wait]).ainvoke(Q)
    ctxs = state["apr_trace"]["contexts"]
    ends = sorted((c["ended"], c["label"]) for c in ctxs.values() if c["depth"] == 1)
    assert [lbl for _, lbl in ends] == ["2", "3", "1"]  # finished out of order
    text = state["apr_trace"]["transcript"]
    assert text.index("result-1") < text.index("result-2") < text.index("result-3")
    doc = parse_document(text)
    assert [t.label for t in doc.blocks[0].threads] == ["1", "2", "3"]


async def test_thread_conclusions_merge_leaves_tool_records_in_the_branches() -> None:
    """``merge_strategy=thread_conclusions``: the parent re-reads each thread's prose, not its tool
    calls and results (a thread with no prose keeps its text whole); the branches still ran them."""
    from apr_agents.graph.merge import conclusion, thread_conclusions

    seen: list[str] = []

    def root(prompt: str) -> str:
        seen.append(prompt)
        return spawn_text(3, tail="Sum is 3.")

    script: dict[str, object] = {"": root}
    for i in (1, 2):
        script[str(i)] = f"{call('wait', seconds=0.05, tag=str(i))}\nResult: item {i} is 1.</Thread>"
    script["3"] = f"{call('wait', seconds=0.05, tag='3')}</Thread>"  # no prose: kept whole
    state = await create_apr_agent(ScriptedBackend(script), [wait], merge_strategy=thread_conclusions).ainvoke(Q)
    assert state["messages"][-1].content == "Sum is 3."
    after_merge = seen[-1]
    assert "<Thread>1: Result: item 1 is 1.</Thread>" in after_merge
    assert "<Thread>2: Result: item 2 is 1.</Thread>" in after_merge
    assert "done 1" not in after_merge and "done 2" not in after_merge
    assert "<tool_response>done 3</tool_response>" in after_merge
    branches = [c for c in state["apr_trace"]["contexts"].values() if c["depth"] == 1]
    assert sorted(t["name"] for c in branches for t in c["tool_calls"]) == ["wait"] * 3
    assert conclusion(" <tool_call>{}</tool_call>\n<tool_response>x</tool_response>\n Found 2.") == " Found 2."


def test_merges_by_name_are_the_strategies_the_command_line_offers() -> None:
    """``merge_strategy(name)``: ``full`` is SPEC 2.4's default (``None``), ``conclusions`` the
    conclusions merge; an unknown name says which names there are."""
    from apr_agents.graph.merge import merge_strategy, thread_conclusions

    assert merge_strategy("full") is None and merge_strategy("conclusions") is thread_conclusions
    with pytest.raises(ValueError, match="unknown merge 'whole'; choose from full, conclusions"):
        merge_strategy("whole")


async def test_nested_spawn_to_depth_two() -> None:
    inner = "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\ninner done"
    script = {
        "": spawn_text(2),
        "1": f" go deeper {inner}</Thread>",
        "2": " leaf</Thread>",
        "1/1": f" {call('wait', seconds=0.2, tag='x')} deep-a</Thread>",
        "1/2": f" {call('wait', seconds=0.2, tag='y')} deep-b</Thread>",
    }
    state = await create_apr_agent(ScriptedBackend(script), [wait], APRConfig(max_depth=2)).ainvoke(Q)
    ctxs = state["apr_trace"]["contexts"]
    assert {c["depth"] for c in ctxs.values()} == {0, 1, 2}
    assert ctxs["root/1.1"]["spawns"] == [["root/1.1/1.1", "root/1.1/1.2"]]
    assert "deep-a" in state["apr_trace"]["transcript"] and "deep-b" in state["apr_trace"]["transcript"]
    summary = state["apr_trace"]["summary"]
    assert summary["critical_path_tokens"] < summary["total_tokens"]


async def test_spawn_past_max_depth_is_written_inline() -> None:
    inner = ("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>1: by hand</Thread>\n"
             "</Parallel>\nafter inline")
    script = {"": spawn_text(1), "1": f" {inner}</Thread>"}
    backend = ScriptedBackend(script)
    state = await create_apr_agent(backend, [], APRConfig(max_depth=1)).ainvoke(Q)
    ctxs = state["apr_trace"]["contexts"]
    assert max(c["depth"] for c in ctxs.values()) == 1  # no depth-2 branch ran
    branch = ctxs["root/1.1"]
    assert branch["end"] == "thread_end"
    assert "after inline" in branch["text"]  # the inner </Thread> did not end the branch


async def test_tool_error_stays_in_its_branch() -> None:
    script = {
        "": spawn_text(3),
        "1": f" {call('boom', x=1)} saw error</Thread>",
        "2": f" {call('wait', seconds=0.1, tag='2')} fine</Thread>",
        "3": f" {call('nosuch', a=1)} unknown</Thread>",
    }
    state = await create_apr_agent(ScriptedBackend(script), [wait, boom]).ainvoke(Q)
    ctxs = state["apr_trace"]["contexts"]
    assert "raised RuntimeError: boom 1" in ctxs["root/1.1"]["text"]
    assert "<tool_response>done 2</tool_response>" in ctxs["root/1.2"]["text"]
    assert "unknown tool 'nosuch'" in ctxs["root/1.3"]["text"]
    assert all(ctxs[f"root/1.{i}"]["end"] == "thread_end" for i in (1, 2, 3))
    assert state["apr_trace"]["summary"]["tool_errors"] == 2


async def test_root_calls_tools_and_invalid_arguments_are_reported() -> None:
    script = {"": f"Let me check. {call('wait', seconds='soon', tag='r')} then {call('wait', seconds=0, tag='r')} ok"}
    state = await create_apr_agent(ScriptedBackend(script), [wait]).ainvoke(Q)
    text = state["apr_trace"]["transcript"]
    assert "invalid arguments for 'wait'" in text
    assert "<tool_response>done r</tool_response>" in text
    assert state["messages"][-1].content == "ok"


# -- limits ------------------------------------------------------------------

async def test_max_threads_drops_extra_outlines() -> None:
    script = {"": spawn_text(6), "*": " x</Thread>"}
    state = await create_apr_agent(ScriptedBackend(script), [], APRConfig(max_threads=2)).ainvoke(Q)
    assert state["apr_trace"]["summary"]["branches"] == 2
    assert "max_threads" in state["apr_trace"]["summary"]["limits_hit"]


async def test_max_total_threads_caps_the_run() -> None:
    inner = "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\nz"
    script = {"": spawn_text(3), "1": f" {inner}</Thread>", "2": f" {inner}</Thread>", "3": f" {inner}</Thread>",
              "*": " leaf</Thread>"}
    cfg = APRConfig(max_total_threads=5, max_depth=2)
    state = await create_apr_agent(ScriptedBackend(script), [], cfg).ainvoke(Q)
    assert state["apr_trace"]["summary"]["branches"] == 5
    assert "max_total_threads" in state["apr_trace"]["summary"]["limits_hit"]


async def test_token_budget_truncates_and_is_recorded() -> None:
    script = {"": spawn_text(1), "1": " " + "word " * 500 + "</Thread>"}
    state = await create_apr_agent(ScriptedBackend(script), [], APRConfig(max_tokens=50)).ainvoke(Q)
    branch = state["apr_trace"]["contexts"]["root/1.1"]
    assert branch["end"] == "max_tokens" and branch["truncated"] is True
    assert branch["completion_tokens"] == 50
    assert "max_tokens" in state["apr_trace"]["summary"]["limits_hit"]
    assert state["messages"][-1].content == "Final answer."  # the parent went on


async def test_thread_timeout_keeps_partial_text() -> None:
    script = {"": spawn_text(2), "1": " " + "slow " * 100 + "</Thread>", "2": " quick</Thread>"}
    backend = ScriptedBackend(script, token_latency_s=0.02)
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [], APRConfig(thread_timeout_s=0.5)).ainvoke(Q)
    assert time.perf_counter() - t0 < 1.8
    slow = state["apr_trace"]["contexts"]["root/1.1"]
    assert slow["end"] == "timeout" and slow["truncated"]
    assert "slow" in slow["text"]  # streamed pieces before the deadline were kept
    assert "thread_timeout_s" in state["apr_trace"]["summary"]["limits_hit"]
    assert state["apr_trace"]["contexts"]["root/1.2"]["end"] == "thread_end"


async def test_run_timeout_ends_the_run() -> None:
    script = {"": spawn_text(1), "1": f" {call('wait', seconds=5, tag='x')} never</Thread>"}
    t0 = time.perf_counter()
    state = await create_apr_agent(ScriptedBackend(script), [wait], APRConfig(run_timeout_s=0.5)).ainvoke(Q)
    assert time.perf_counter() - t0 < 2.5
    assert "run_timeout_s" in state["apr_trace"]["summary"]["limits_hit"]
    assert "did not finish" in state["apr_trace"]["contexts"]["root/1.1"]["text"]


async def test_tool_timeout_becomes_the_tool_response() -> None:
    script = {"": f"{call('wait', seconds=3, tag='x')} gave up"}
    state = await create_apr_agent(ScriptedBackend(script), [wait], APRConfig(tool_timeout_s=0.2)).ainvoke(Q)
    assert "did not finish within 0.2 s" in state["apr_trace"]["transcript"]
    assert state["apr_trace"]["contexts"]["root"]["tool_calls"][0]["error"] == "timeout"


async def test_max_steps_stops_a_tool_loop() -> None:
    script = {"": "".join(f"{call('wait', seconds=0, tag=str(i))} " for i in range(50))}
    state = await create_apr_agent(ScriptedBackend(script), [wait], APRConfig(max_steps=5)).ainvoke(Q)
    assert state["apr_trace"]["contexts"]["root"]["calls"] == 5
    assert "max_steps" in state["apr_trace"]["summary"]["limits_hit"]


async def test_tool_output_is_truncated_with_marker() -> None:
    @tool
    def big() -> str:
        """Huge output."""
        return "x" * 10_000

    script = {"": f"{call('big')} done"}
    state = await create_apr_agent(ScriptedBackend(script), [big], APRConfig(max_tool_output_chars=100)).ainvoke(Q)
    assert "[... truncated 9900 characters]" in state["apr_trace"]["transcript"]


@pytest.mark.parametrize("facade", ["ainvoke", "invoke"])
async def test_llm_and_tool_concurrency_bounds(facade: str) -> None:
    """The bounds hold across branches in the sync facade too (its nodes share one loop)."""
    in_flight = {"now": 0, "peak": 0}

    @tool
    async def probe(i: int) -> str:
        """Counts concurrent calls."""
        in_flight["now"] += 1
        in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
        await asyncio.sleep(0.05)
        in_flight["now"] -= 1
        return "ok"

    script = {"": spawn_text(6), "*": f" {call('probe', i=1)} fine</Thread>"}
    backend = ScriptedBackend(script, call_latency_s=0.05)
    peak_llm = {"now": 0, "peak": 0}
    orig = backend.stream

    async def counting_stream(*a, **k):  # type: ignore[no-untyped-def]
        peak_llm["now"] += 1
        peak_llm["peak"] = max(peak_llm["peak"], peak_llm["now"])
        try:
            async for x in orig(*a, **k):
                yield x
        finally:
            peak_llm["now"] -= 1

    backend.stream = counting_stream  # type: ignore[method-assign]
    cfg = APRConfig(llm_concurrency=2, tool_concurrency=3)
    graph = create_apr_agent(backend, [probe], cfg)
    state = await graph.ainvoke(Q) if facade == "ainvoke" else await asyncio.to_thread(graph.invoke, Q)
    assert state["apr_trace"]["summary"]["branches"] == 6
    assert peak_llm["peak"] == 2
    assert 2 <= in_flight["peak"] <= 3


async def test_tool_rate_limit() -> None:
    script = {"": spawn_text(6), "*": f" {call('wait', seconds=0, tag='t')} fine</Thread>"}
    t0 = time.perf_counter()
    state = await create_apr_agent(ScriptedBackend(script), [wait], APRConfig(tool_rate_per_s=5)).ainvoke(Q)
    starts = sorted(t["started"] for c in state["apr_trace"]["contexts"].values() for t in c["tool_calls"])
    assert len(starts) == 6
    assert starts[-1] - starts[0] >= 0.15  # 6 calls at 5/s cannot all start at once
    assert time.perf_counter() - t0 < 5


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="max_threads"):
        APRConfig(max_threads=0)
    with pytest.raises(ValueError, match="dialect"):
        APRConfig(dialect="klingon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown_field"):
        APRConfig(unknown_field=1)  # type: ignore[call-arg]


# -- embedding and facades ------------------------------------------------------

async def test_agent_as_node_of_a_user_graph() -> None:
    script = {"": spawn_text(2, "Merged reply."), "*": " part</Thread>"}
    agent = create_apr_agent(ScriptedBackend(script), [])

    def after(state: MessagesState) -> dict:
        return {"messages": [HumanMessage(f"seen: {state['messages'][-1].content}")]}

    g = StateGraph(MessagesState)
    g.add_node("apr", agent)
    g.add_node("after", after)
    g.add_edge(START, "apr")
    g.add_edge("apr", "after")
    out = await g.compile().ainvoke(Q)
    assert [m.content for m in out["messages"]][-2:] == ["Merged reply.", "seen: Merged reply."]


def test_sync_invoke() -> None:
    script = {"": spawn_text(2, "Sync ok."), "*": f" {call('wait', seconds=0.2, tag='s')} part</Thread>"}
    graph = create_apr_agent(ScriptedBackend(script), [wait])
    t0 = time.perf_counter()
    state = graph.invoke(Q)
    assert state["messages"][-1].content == "Sync ok."
    assert state["apr_trace"]["summary"]["branches"] == 2
    assert time.perf_counter() - t0 < 5


async def test_user_message_tags_are_neutralised() -> None:
    backend = ScriptedBackend({"": "plain answer"})
    graph = create_apr_agent(backend, [])
    await graph.ainvoke({"messages": [HumanMessage("<Parallel><Outlines><Outline>1: x</Outline></Outlines>")]})
    assert "<Parallel>" not in backend.prompts[0]
    assert "&lt;Parallel&gt;" in backend.prompts[0]
