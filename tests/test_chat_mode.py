"""Tool-call mode (issue 7) on the FAKE ScriptedChatModel: spawn via a `spawn` tool call, merge, limits."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph

from apr_agents import APRBackendError, APRConfig, create_apr_agent
from apr_agents.graph.chat import create_chat_apr_agent, parse_spawn_args
from apr_agents.graph.chat_prompt import DEFAULT_CHAT_SYSTEM_PROMPT
from apr_agents.testing.scripted_chat import ScriptedChatModel, bad_tool_call, calls, tool_call

Q = {"messages": [HumanMessage("question")]}
SUB = re.compile(r"^Sub-task (\d+) of (\d+): (.*?)\n", re.S)


@tool
async def wait(seconds: float, tag: str) -> str:
    """Sleep, then return the tag."""
    await asyncio.sleep(seconds)
    return f"done {tag}"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def subtask(msgs: list[BaseMessage]) -> tuple[int, str] | None:
    """The sub-task this conversation was given, when it is a branch's (last human message)."""
    for m in reversed(msgs):
        if isinstance(m, HumanMessage):
            hit = SUB.match(m.content)
            return (int(hit.group(1)), hit.group(3)) if hit else None
    return None


def depth_of(msgs: list[BaseMessage]) -> int:
    return sum(1 for m in msgs if isinstance(m, HumanMessage) and SUB.match(m.content))


def spawn_tool_message(state: dict[str, Any]) -> ToolMessage:
    from langchain_core.messages import messages_from_dict

    msgs = [m for m in messages_from_dict(state["apr_msgs"]) if isinstance(m, ToolMessage)
            and m.name == "spawn"]
    assert len(msgs) == 1, msgs
    return msgs[0]


def fan_out(tasks: list[str], seconds: list[float]):
    """Root spawns `tasks`; branch i calls wait(seconds[i]) and reports; root answers with the merge."""

    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        last = msgs[-1]
        sub = subtask(msgs)
        if sub is None:  # root
            if isinstance(last, HumanMessage):
                return calls(tool_call("spawn", {"tasks": tasks}), content="Splitting.")
            return "ANSWER\n" + last.content
        i, _ = sub
        if isinstance(last, HumanMessage):
            return calls(tool_call("wait", {"seconds": seconds[i - 1], "tag": str(i)}))
        return f"branch {i}: {last.content}"

    return respond


# -- spawn, merge, concurrency ---------------------------------------------------

async def test_three_way_spawn_runs_branches_concurrently() -> None:
    model = ScriptedChatModel(respond=fan_out(["t1", "t2", "t3"], [0.5, 0.5, 0.5]))
    graph = create_apr_agent(model, [wait])
    t0 = time.perf_counter()
    state = await graph.ainvoke(Q)
    wall = time.perf_counter() - t0
    assert wall < 1.3, f"3 branches with 0.5 s tools took {wall:.2f} s: they did not overlap"
    answer = state["messages"][-1]
    assert isinstance(answer, AIMessage) and answer.content.startswith("ANSWER")
    assert answer.response_metadata["apr_end"] == "eos"
    merged = spawn_tool_message(state).content
    assert [merged.index(f"branch {i}: done {i}") for i in (1, 2, 3)] == sorted(
        merged.index(f"branch {i}: done {i}") for i in (1, 2, 3))
    trace = state["apr_trace"]
    json.dumps(trace)  # JSON-serialisable
    s = trace["summary"]
    assert s["branches"] == 3 and s["tool_calls"] == 3 and s["max_concurrent_branches"] == 3
    assert s["end"] == "eos" and s["limits_hit"] == [] and s["max_depth"] == 1
    ctxs = trace["contexts"]
    assert all(len(r["model_calls"]) == r["calls"] >= 2 for r in ctxs.values())  # each model call timed
    assert set(ctxs) == {"root", "root/1.1", "root/1.2", "root/1.3"}
    assert ctxs["root"]["spawns"] == [["root/1.1", "root/1.2", "root/1.3"]]
    for i in (1, 2, 3):
        rec = ctxs[f"root/1.{i}"]
        assert rec["parent"] == "root" and rec["depth"] == 1 and rec["outline"] == f"t{i}"
        assert rec["end"] == "thread_end" and rec["ended"] >= rec["started"]
        assert rec["calls"] == 2 and rec["completion_tokens"] > 0 and rec["prompt_tokens"] > 0
        assert [t["name"] for t in rec["tool_calls"]] == ["wait"] and rec["tool_calls"][0]["duration_s"] >= 0.45
    root_own = ctxs["root"]["completion_tokens"]
    assert s["critical_path_tokens"] == root_own + max(ctxs[f"root/1.{i}"]["completion_tokens"] for i in (1, 2, 3))


async def test_branch_conversation_is_parent_prefix_plus_its_task() -> None:
    seen: dict[int, list[BaseMessage]] = {}

    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        sub = subtask(msgs)
        if sub is None:
            if isinstance(msgs[-1], HumanMessage):
                return calls(tool_call("spawn", {"tasks": ["alpha", "beta"]}), content="two parts")
            return "done"
        seen[sub[0]] = list(msgs)
        return f"result {sub[1]}"

    await create_apr_agent(ScriptedChatModel(respond=respond)).ainvoke(Q)
    a, b = seen[1], seen[2]
    assert len(a) == len(b) == 5
    assert [m.type for m in a] == ["system", "human", "ai", "tool", "human"]
    assert a[:4] == b[:4]  # shared prefix: identical up to the sub-task
    assert a[1].content == "question" and a[2].tool_calls[0]["name"] == "spawn"
    assert a[3].tool_call_id == a[2].tool_calls[0]["id"]
    assert a[4].content.startswith("Sub-task 1 of 2: alpha") and b[4].content.startswith("Sub-task 2 of 2: beta")


async def test_merge_keeps_task_order_when_branches_finish_out_of_order() -> None:
    model = ScriptedChatModel(respond=fan_out(["slow", "mid", "fast"], [0.4, 0.2, 0.0]))
    state = await create_apr_agent(model, [wait]).ainvoke(Q)
    merged = spawn_tool_message(state).content
    pos = [merged.index(f"[{i}] {t}") for i, t in ((1, "slow"), (2, "mid"), (3, "fast"))]
    assert pos == sorted(pos)
    ends = {cid: r["ended"] for cid, r in state["apr_trace"]["contexts"].items() if cid != "root"}
    assert ends["root/1.3"] < ends["root/1.1"]  # they really finished in the other order


async def test_parallel_tool_calls_in_one_message_run_concurrently() -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        if isinstance(msgs[-1], HumanMessage):
            return calls(*(tool_call("wait", {"seconds": 0.5, "tag": t}) for t in "abc"),
                         tool_call("add", {"a": 2, "b": 3}))
        results = [m.content for m in msgs if isinstance(m, ToolMessage)]
        return " ".join(results)

    graph = create_apr_agent(ScriptedChatModel(respond=respond), [wait, add])
    t0 = time.perf_counter()
    state = await graph.ainvoke(Q)
    wall = time.perf_counter() - t0
    assert wall < 1.3, f"3 parallel 0.5 s tool calls took {wall:.2f} s"
    assert state["messages"][-1].content == "done a done b done c 5"  # call order
    assert state["apr_trace"]["summary"]["tool_calls"] == 4 and state["apr_trace"]["summary"]["branches"] == 0


async def test_tool_calls_share_the_throttle() -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        if isinstance(msgs[-1], HumanMessage):
            return calls(*(tool_call("wait", {"seconds": 0.3, "tag": t}) for t in "abcd"))
        return "ok"

    graph = create_apr_agent(ScriptedChatModel(respond=respond), [wait], APRConfig(tool_concurrency=2))
    t0 = time.perf_counter()
    await graph.ainvoke(Q)
    assert time.perf_counter() - t0 >= 0.55  # 4 calls, 2 at a time: two rounds of 0.3 s


async def test_spawn_with_a_regular_tool_call_in_the_same_message() -> None:
    branch_saw: list[str] = []

    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        sub = subtask(msgs)
        if sub is None:
            if isinstance(msgs[-1], HumanMessage):
                return calls(tool_call("add", {"a": 1, "b": 1}, id="c_add"),
                             tool_call("spawn", {"tasks": ["x", "y"]}, id="c_spawn"))
            tail = [m for m in msgs if isinstance(m, ToolMessage)]
            return "|".join(f"{m.tool_call_id}={m.content[:20]}" for m in tail)
        branch_saw.append(";".join(m.content for m in msgs if isinstance(m, ToolMessage) and m.name == "add"))
        return f"r{sub[0]}"

    state = await create_apr_agent(ScriptedChatModel(respond=respond), [add]).ainvoke(Q)
    assert branch_saw == ["2", "2"]  # branches see the other call's result
    assert state["messages"][-1].content.startswith("c_add=2|c_spawn=Results of 2")


# -- nesting and depth -------------------------------------------------------------

async def test_nested_spawn_bounded_by_max_depth() -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        last = msgs[-1]
        if isinstance(last, HumanMessage) and "spawn" in tools:
            return calls(tool_call("spawn", {"tasks": [f"d{depth_of(msgs)}a", f"d{depth_of(msgs)}b"]}))
        if isinstance(last, HumanMessage):
            return f"leaf at depth {depth_of(msgs)}"
        return f"merged at depth {depth_of(msgs)}"

    model = ScriptedChatModel(respond=respond)
    state = await create_apr_agent(model, [], APRConfig(max_depth=2)).ainvoke(Q)
    s = state["apr_trace"]["summary"]
    assert s["branches"] == 6 and s["max_depth"] == 2
    ctxs = state["apr_trace"]["contexts"]
    assert {c["depth"] for c in ctxs.values()} == {0, 1, 2}
    assert ctxs["root/1.2/1.1"]["parent"] == "root/1.2"
    assert all(r["spawns"] == [] for r in ctxs.values() if r["depth"] == 2)
    # the spawn tool is offered at depths 0 and 1 only
    by_depth = {}
    for entry in model.log:
        by_depth.setdefault("spawn" in entry["tools"], 0)
        by_depth["spawn" in entry["tools"]] += 1
    assert by_depth == {True: 1 + 1 + 2 + 2, False: 4}  # root 2 calls, two depth-1 x 2 calls, four leaves x 1
    assert state["messages"][-1].content == "merged at depth 0"


async def test_spawn_at_max_depth_returns_a_tool_error() -> None:
    """A model that calls spawn although it is not bound (depth = max_depth) gets an error, not a fork."""

    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        last = msgs[-1]
        if isinstance(last, HumanMessage):
            return calls(tool_call("spawn", {"tasks": ["p", "q"]}))
        if isinstance(last, ToolMessage) and last.status == "error":
            return "did it myself: " + last.content
        return "root: " + last.content

    model = ScriptedChatModel(respond=respond)
    state = await create_apr_agent(model, [], APRConfig(max_depth=1)).ainvoke(Q)
    trace = state["apr_trace"]
    assert trace["summary"]["branches"] == 2 and trace["summary"]["max_depth"] == 1
    assert "max_depth" in trace["summary"]["limits_hit"]
    merged = spawn_tool_message(state).content
    assert "did it myself: error: spawn is not available here (depth 1, max_depth 1)" in merged
    assert all("spawn" not in e["tools"] for e in model.log if e["messages"] >= 5)  # branch calls


async def test_max_depth_zero_never_offers_spawn() -> None:
    model = ScriptedChatModel(respond=lambda msgs, tools: f"tools={tools}")
    state = await create_apr_agent(model, [add], APRConfig(max_depth=0)).ainvoke(Q)
    assert state["messages"][-1].content == "tools=['add']"


# -- malformed spawn calls -------------------------------------------------------

MALFORMED = [
    ({"tasks": "do a and b"}, "invalid spawn call: tasks: Input should be a valid list"),
    ({"tasks": [1, 2]}, "invalid spawn call: tasks.0: Input should be a valid string"),
    ({"tasks": []}, "invalid spawn call: tasks: List should have at least 1 item"),
    ({"tasks": ["ok", "   "]}, "invalid spawn call: tasks.1: String should have at least 1 character"),
    ({}, "invalid spawn call: tasks: Field required"),
    ({"tasks": [f"t{i}" for i in range(10_000)]}, "spawn accepts at most 8 tasks per call; got 10000"),
]


@pytest.mark.parametrize(("args", "expected"), MALFORMED, ids=["str", "ints", "empty", "blank", "missing", "10000"])
async def test_malformed_spawn_call_is_a_tool_error(args: dict[str, Any], expected: str) -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        last = msgs[-1]
        if isinstance(last, HumanMessage):
            return calls(tool_call("spawn", args))
        assert isinstance(last, ToolMessage) and last.status == "error"
        return "saw " + last.content

    # a real budget: 10,000 tasks cost the model ~20,000 tokens of its own output
    state = await create_apr_agent(ScriptedChatModel(respond=respond), [], APRConfig(max_tokens=100_000)).ainvoke(Q)
    answer = state["messages"][-1].content
    assert answer.startswith("saw error: ") and expected in answer
    assert "Nothing was run" in answer and len(answer) < 600  # clear and short, never 10,000 tasks echoed
    trace = state["apr_trace"]
    assert trace["summary"]["branches"] == 0 and trace["summary"]["end"] == "eos"
    assert trace["summary"]["tool_errors"] == 1
    if len(args.get("tasks", [])) == 10_000:
        assert trace["limits"] == [{"ctx": "root", "limit": "max_threads",
                                    "detail": "spawn with 10000 tasks refused; at most 8"}]
    else:
        assert [r["kind"] for r in trace["repairs"]] == ["invalid_spawn"]


async def test_spawn_with_unparseable_json_arguments() -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        if isinstance(msgs[-1], HumanMessage):
            return calls(bad_tool_call("spawn", '{"tasks": ["a", '))
        return "saw " + msgs[-1].content

    state = await create_apr_agent(ScriptedChatModel(respond=respond)).ainvoke(Q)
    assert state["messages"][-1].content.startswith("saw error: the arguments of 'spawn' are not valid JSON")
    assert state["apr_trace"]["repairs"][0]["kind"] == "invalid_tool_call"


async def test_two_spawn_calls_in_one_message_runs_only_the_first() -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        if subtask(msgs):
            return f"r{subtask(msgs)[0]}"
        if isinstance(msgs[-1], HumanMessage):
            return calls(tool_call("spawn", {"tasks": ["a"]}, id="s1"), tool_call("spawn", {"tasks": ["b"]}, id="s2"))
        return "|".join(f"{m.tool_call_id}:{m.status}" for m in msgs if isinstance(m, ToolMessage))

    state = await create_apr_agent(ScriptedChatModel(respond=respond)).ainvoke(Q)
    assert state["messages"][-1].content == "s1:success|s2:error"
    assert state["apr_trace"]["summary"]["branches"] == 1


def test_parse_spawn_args_accepts_and_strips() -> None:
    assert parse_spawn_args({"tasks": [" a ", "b"], "extra": 1}, 4) == (["a", "b"], None, None)
    assert parse_spawn_args("not a dict", 4)[2] == "invalid_spawn"
    assert parse_spawn_args({"tasks": ["a"] * 5}, 4)[2] == "max_threads"


# -- other limits ----------------------------------------------------------------

async def test_max_total_threads_runs_part_of_a_spawn_and_says_so() -> None:
    model = ScriptedChatModel(respond=fan_out(["a", "b", "c"], [0.0, 0.0, 0.0]))
    state = await create_apr_agent(model, [wait], APRConfig(max_total_threads=2)).ainvoke(Q)
    merged = spawn_tool_message(state).content
    assert "branch 1: done 1" in merged and "branch 2: done 2" in merged
    assert "Not run (max_total_threads reached; do these yourself):\n[3] c" in merged
    assert state["apr_trace"]["summary"]["branches"] == 2
    assert "max_total_threads" in state["apr_trace"]["summary"]["limits_hit"]


async def test_thread_timeout_ends_a_hung_branch_and_the_parent_goes_on() -> None:
    model = ScriptedChatModel(respond=fan_out(["quick", "hangs"], [0.0, 30.0]))
    t0 = time.perf_counter()
    state = await create_apr_agent(model, [wait], APRConfig(thread_timeout_s=0.4)).ainvoke(Q)
    assert time.perf_counter() - t0 < 3.0
    ctxs = state["apr_trace"]["contexts"]
    assert ctxs["root/1.1"]["end"] == "thread_end"
    assert ctxs["root/1.2"]["end"] == "timeout" and ctxs["root/1.2"]["truncated"] is True
    assert ctxs["root/1.2"]["tool_calls"][0]["error"] == "timeout"
    merged = spawn_tool_message(state).content
    assert "this branch ended early: timeout" in merged
    assert state["messages"][-1].content.startswith("ANSWER")


async def test_max_steps_stops_a_tool_loop() -> None:
    model = ScriptedChatModel(respond=lambda msgs, tools: calls(tool_call("add", {"a": 1, "b": 2})))
    state = await create_apr_agent(model, [add], APRConfig(max_steps=3)).ainvoke(Q)
    assert model.calls == 3
    assert state["apr_trace"]["summary"]["end"] == "max_steps"
    assert "max_steps" in state["apr_trace"]["summary"]["limits_hit"]


async def test_too_many_tool_calls_in_one_message() -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        if isinstance(msgs[-1], HumanMessage):
            return calls(*(tool_call("add", {"a": i, "b": 0}) for i in range(3)))
        return "|".join(m.content[:12] for m in msgs if isinstance(m, ToolMessage))

    state = await create_apr_agent(ScriptedChatModel(respond=respond), [add],
                                   APRConfig(max_tool_calls_per_step=2)).ainvoke(Q)
    assert state["messages"][-1].content == "0|1|error: at mo"
    assert "max_tool_calls_per_step" in state["apr_trace"]["summary"]["limits_hit"]


async def test_model_errors_are_retried_then_reported_with_the_context() -> None:
    ok = ScriptedChatModel(respond=lambda m, t: "fine", fail_first=2)
    state = await create_apr_agent(ok, [], APRConfig(backend_attempts=3)).ainvoke(Q)
    assert state["messages"][-1].content == "fine" and ok.calls == 3
    bad = ScriptedChatModel(respond=lambda m, t: "never", fail_first=10)
    with pytest.raises(APRBackendError, match=r"context 'root' .* after 2 attempts: ConnectionError"):
        await create_apr_agent(bad, [], APRConfig(backend_attempts=2)).ainvoke(Q)


# -- prompts, construction, embedding ------------------------------------------------

async def test_system_prompt_ships_and_can_be_replaced() -> None:
    seen: list[list[BaseMessage]] = []

    def respond(msgs: list[BaseMessage], tools: list[str]) -> str:
        seen.append(msgs)
        return "ok"

    model = ScriptedChatModel(respond=respond)
    await create_apr_agent(model, [], APRConfig(max_threads=5)).ainvoke(Q)
    assert isinstance(seen[0][0], SystemMessage)
    assert "independent" in seen[0][0].content and "at most 5 tasks" in seen[0][0].content
    assert "{max_threads}" in DEFAULT_CHAT_SYSTEM_PROMPT
    await create_chat_apr_agent(model, [], system_prompt="Custom, up to {max_threads}.").ainvoke(
        {"messages": [SystemMessage("User rules."), HumanMessage("hi")]})
    assert seen[1][0].content == "Custom, up to 8.\n\nUser rules." and len(seen[1]) == 2
    await create_chat_apr_agent(model, [], system_prompt="").ainvoke(Q)
    assert [m.type for m in seen[2]] == ["human"]


def test_construction_errors() -> None:
    with pytest.raises(TypeError, match="no tool calling"):
        create_apr_agent(GenericFakeChatModel(messages=iter(["x"])), [])
    model = ScriptedChatModel(respond=lambda m, t: "x")

    @tool
    def spawn(x: int) -> int:
        """Clashes."""
        return x

    with pytest.raises(ValueError, match="may not be named 'spawn'"):
        create_apr_agent(model, [spawn])
    with pytest.raises(TypeError, match="config must be an APRConfig"):
        create_apr_agent(model, [], {"max_threads": 2})  # type: ignore[arg-type]


async def test_bind_tools_kwargs_per_step() -> None:
    model = ScriptedChatModel(respond=lambda m, t: "ok")
    choice = lambda step: {"tool_choice": "spawn" if step["step"] == 0 and step["spawn_bound"] else "auto"}  # noqa: E731
    await create_chat_apr_agent(model, [add], bind_tools_kwargs=choice).ainvoke(Q)
    assert model.log[0]["tool_choice"] == "spawn"


@pytest.mark.parametrize("durable", [False, True], ids=["direct", "tasks"])
async def test_custom_stream_events(durable: bool) -> None:
    model = ScriptedChatModel(respond=fan_out(["a", "b"], [0.05, 0.05]))
    agent = create_apr_agent(model, [wait], checkpointer=InMemorySaver() if durable else None)
    config = {"configurable": {"thread_id": "events"}} if durable else {}
    items = [x async for x in agent.astream(Q, config, stream_mode="custom", subgraphs=True)]
    events = [e for _, e in items if e["apr"] != "step"]
    kinds = [e["apr"] for e in events]
    assert kinds[0] == "spawn" and kinds[-1] == "merge"
    assert kinds.count("branch_start") == kinds.count("branch_end") == 2
    assert kinds.count("tool_start") == kinds.count("tool_end") == 2
    assert events[0]["outlines"] == [["1", "a"], ["2", "b"]] and events[0]["ctx"] == "root"
    assert {e["ctx"] for e in events if e["apr"] == "tool_end"} == {"root/1.1", "root/1.2"}


async def test_agent_as_node_of_a_user_graph() -> None:
    agent = create_apr_agent(ScriptedChatModel(respond=fan_out(["a"], [0.0])), [wait])

    def after(state: MessagesState) -> dict:
        return {"messages": [HumanMessage(f"seen: {state['messages'][-1].content[:6]}")]}

    g = StateGraph(MessagesState)
    g.add_node("apr", agent)
    g.add_node("after", after)
    g.add_edge(START, "apr")
    g.add_edge("apr", "after")
    out = await g.compile().ainvoke(Q)
    assert [m.content for m in out["messages"]][-1] == "seen: ANSWER"


# -- checkpointing and sync ------------------------------------------------------------

async def test_checkpointing_with_in_memory_saver_and_a_second_turn() -> None:
    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        if subtask(msgs):
            return f"r{subtask(msgs)[0]}"
        if isinstance(msgs[-1], HumanMessage) and msgs[-1].content == "question":
            return calls(tool_call("spawn", {"tasks": ["a", "b"]}))
        if isinstance(msgs[-1], HumanMessage):
            return "history: " + " / ".join(m.content[:7] for m in msgs if m.type in ("human", "ai"))
        return "first answer"

    saver = InMemorySaver()
    graph = create_apr_agent(ScriptedChatModel(respond=respond), [], checkpointer=saver)
    cfg = {"configurable": {"thread_id": "t1"}}
    state = await graph.ainvoke(Q, cfg)
    assert state["messages"][-1].content == "first answer"
    snap = await graph.aget_state(cfg)
    assert snap.values["apr_trace"]["summary"]["branches"] == 2
    assert [m.content for m in snap.values["messages"]] == ["question", "first answer"]
    steps = [s async for s in graph.aget_state_history(cfg)]
    assert len(steps) >= 6  # input, prepare, generate, tools, branch, merge, generate: each checkpointed
    state2 = await graph.ainvoke({"messages": [HumanMessage("again")]}, cfg)
    assert state2["messages"][-1].content == "history: questio / first a / again"
    assert state2["apr_trace"]["summary"]["branches"] == 0  # the new run's trace, not the old one


async def test_resume_from_checkpoint_after_a_failure_does_not_rerun_branches() -> None:
    state_box = {"fail": True}
    branch_calls: list[int] = []

    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        sub = subtask(msgs)
        if sub:
            branch_calls.append(sub[0])
            return f"r{sub[0]}"
        if isinstance(msgs[-1], HumanMessage):
            return calls(tool_call("spawn", {"tasks": ["a", "b", "c"]}))
        if state_box["fail"]:
            state_box["fail"] = False
            raise ConnectionError("server went away after the merge")
        return "after resume: " + msgs[-1].content.splitlines()[-1]

    graph = create_apr_agent(ScriptedChatModel(respond=respond), [], APRConfig(backend_attempts=1),
                             checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "resume"}}
    with pytest.raises(APRBackendError):
        await graph.ainvoke(Q, cfg)
    assert sorted(branch_calls) == [1, 2, 3]
    state = await graph.ainvoke(None, cfg)
    assert state["messages"][-1].content == "after resume: r3"
    assert sorted(branch_calls) == [1, 2, 3]  # the merged branches were not run again
    assert state["apr_trace"]["summary"]["branches"] == 3


def test_sync_invoke() -> None:
    model = ScriptedChatModel(respond=fan_out(["a", "b", "c"], [0.3, 0.3, 0.3]))
    graph = create_apr_agent(model, [wait])
    t0 = time.perf_counter()
    state = graph.invoke(Q)
    wall = time.perf_counter() - t0
    assert state["messages"][-1].content.startswith("ANSWER")
    assert state["apr_trace"]["summary"]["branches"] == 3
    assert wall < 2.0, f"sync run took {wall:.2f} s"


# -- budgets, merge strategy, server quirks ----------------------------------------------

async def test_token_budget_ends_a_context() -> None:
    model = ScriptedChatModel(respond=lambda msgs, tools: calls(tool_call("add", {"a": 1, "b": 2}), content="w " * 10))
    state = await create_apr_agent(model, [add], APRConfig(max_tokens=25)).ainvoke(Q)
    root = state["apr_trace"]["contexts"]["root"]
    assert root["end"] == "max_tokens" and root["truncated"] is True and model.calls == 2
    assert "max_tokens" in state["apr_trace"]["summary"]["limits_hit"]


async def test_run_timeout_ends_the_run() -> None:
    model = ScriptedChatModel(respond=fan_out(["a", "b"], [30.0, 30.0]))
    t0 = time.perf_counter()
    state = await create_apr_agent(model, [wait], APRConfig(run_timeout_s=0.5)).ainvoke(Q)
    assert time.perf_counter() - t0 < 3.0
    ctxs = state["apr_trace"]["contexts"]
    assert ctxs["root/1.1"]["end"] == ctxs["root/1.2"]["end"] == "timeout"
    assert ctxs["root"]["end"] == "timeout"
    assert "run_timeout_s" in state["apr_trace"]["summary"]["limits_hit"]


async def test_custom_merge_strategy() -> None:
    def merge(results: list[dict[str, Any]], dialect: Any) -> str:
        assert dialect is None
        return json.dumps([[r["label"], r["outline"], r["text"]] for r in results])

    model = ScriptedChatModel(respond=fan_out(["a", "b"], [0.0, 0.0]))
    state = await create_apr_agent(model, [wait], merge_strategy=merge).ainvoke(Q)
    assert json.loads(spawn_tool_message(state).content) == [["1", "a", "branch 1: done 1"],
                                                             ["2", "b", "branch 2: done 2"]]


async def test_models_without_usage_get_estimated_tokens() -> None:
    model = ScriptedChatModel(respond=fan_out(["a", "b"], [0.0, 0.0]), report_usage=False)
    state = await create_apr_agent(model, [wait]).ainvoke(Q)
    ctxs = state["apr_trace"]["contexts"]
    assert all(r["tokens_estimated"] and r["completion_tokens"] > 0 for r in ctxs.values())
    assert state["apr_trace"]["summary"]["critical_path_tokens"] > 0


async def test_empty_tool_call_content_is_filled_when_sent_only() -> None:
    sent: list[str] = []

    def respond(msgs: list[BaseMessage], tools: list[str]) -> AIMessage | str:
        sent.extend(m.content for m in msgs if isinstance(m, AIMessage) and m.tool_calls)
        if isinstance(msgs[-1], HumanMessage):
            return calls(tool_call("add", {"a": 1, "b": 2}))
        return "3"

    state = await create_chat_apr_agent(ScriptedChatModel(respond=respond), [add],
                                        empty_tool_call_content=" ").ainvoke(Q)
    assert sent == [" "]
    from langchain_core.messages import messages_from_dict

    stored = [m for m in messages_from_dict(state["apr_msgs"]) if isinstance(m, AIMessage) and m.tool_calls]
    assert stored[0].content == ""
