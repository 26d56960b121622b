"""The served graph's configuration from APR_* environment variables (no server here)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from apr_agents.graph.deploy import backend_from_env, config_from_env, graph_from_env, tools_from_env
from apr_agents.testing.scripts import arith_question
from apr_cli.bench.load import load_env, percentile, run_in_process

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"


def test_config_from_env_reads_every_field_and_keeps_defaults() -> None:
    cfg = config_from_env({"APR_MAX_THREADS": "3", "APR_THREAD_TIMEOUT_S": "2.5", "APR_PARALLEL": "false",
                           "APR_TOOL_RATE_PER_S": "none", "APR_DIALECT": "multiverse", "OTHER": "x"})
    assert (cfg.max_threads, cfg.thread_timeout_s, cfg.parallel, cfg.tool_rate_per_s, cfg.dialect) == (
        3, 2.5, False, None, "multiverse")
    assert cfg.max_depth == config_from_env({}).max_depth == 2


@pytest.mark.parametrize("env", [{"APR_MAX_THREADS": "0"}, {"APR_MAX_DEPTH": "many"}, {"APR_DIALECT": "xml"}])
def test_invalid_settings_fail_at_start_with_the_field_named(env: dict[str, str]) -> None:
    name = next(iter(env))[4:].lower()
    with pytest.raises(ValueError, match=name):
        config_from_env(env)


def test_backend_choices_and_their_errors(tmp_path: Path) -> None:
    script = {"": "From a file."}
    (tmp_path / "s.json").write_text(json.dumps(script))
    b = backend_from_env({"APR_BACKEND": "scripted", "APR_SCRIPT_FILE": str(tmp_path / "s.json")})
    assert b.rules[0].reply == "From a file."
    b = backend_from_env({"APR_BACKEND": "scripted", "APR_SCRIPT": '{"": "inline"}', "APR_TOKEN_LATENCY_S": "0.01"})
    assert b.rules[0].reply == "inline" and b.token_latency_s == 0.01
    with pytest.raises(ValueError, match="JSON object"):
        backend_from_env({"APR_BACKEND": "scripted", "APR_SCRIPT": '["not", "a", "map"]'})
    with pytest.raises(ValueError, match="APR_BASE_URL"):
        backend_from_env({"APR_BACKEND": "openai"})
    with pytest.raises(ValueError, match="unknown APR_BACKEND"):
        backend_from_env({"APR_BACKEND": "gpt"})


def test_tools_from_env() -> None:
    assert tools_from_env({"APR_TOOLS": "none"}) == []
    assert [t.name for t in tools_from_env({"APR_TOOLS": "calculator,lookup"})] == ["calculator", "lookup"]
    assert len(tools_from_env({})) == 3
    with pytest.raises(ValueError, match="unknown tool"):
        tools_from_env({"APR_TOOLS": "rm_rf"})


async def test_the_load_workload_answers_each_question_through_both_branches() -> None:
    graph = graph_from_env(load_env(tool_latency_s=0.0))
    for i in range(3):
        question, expected = arith_question(i)
        state = await graph.ainvoke({"messages": [HumanMessage(question)]})
        assert state["messages"][-1].content == f"Answer: {expected}"
        assert state["apr_trace"]["summary"]["tool_calls"] == 2
    assert arith_question(1) != arith_question(2) and arith_question(5) == arith_question(5)


def test_graphs_module_serves_what_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = json.loads((GRAPHS / "langgraph.json").read_text())
    path, var = spec["graphs"]["apr"].rsplit(":", 1)
    monkeypatch.setenv("APR_BACKEND", "scripted")
    monkeypatch.setenv("APR_MAX_THREADS", "5")
    graph = runpy.run_path(str(GRAPHS / path))[var]
    question, _ = arith_question(1)
    state = graph.invoke({"messages": [HumanMessage(question)]})
    assert state["apr_trace"]["config"]["max_threads"] == 5  # read from the run, not a test attribute
    assert graph.checkpointer is None  # the server brings its own


def test_percentile_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert (percentile(xs, 50), percentile(xs, 95), percentile(xs, 100)) == (50.0, 95.0, 100.0)
    assert percentile([3.0], 95) == 3.0


@pytest.mark.parametrize("checkpointer", ["none", "memory"])
async def test_in_process_load_runs_every_question_to_its_own_answer(checkpointer: str) -> None:
    """``python -m apr_cli.bench.load --in-process``: the server's workload with no server."""
    report = await run_in_process(12, concurrency=6, checkpointer=checkpointer, tool_latency_s=0.0)
    assert (report["ok"], report["failed"]) == (12, 0)
    assert (report["branches"], report["tool_calls"]) == (24, 24)  # two branches, one calculator call each
    assert report["p50_s"] <= report["p95_s"] <= report["max_s"]


async def test_audited_tools_log_each_call_with_its_thread_and_a_fixed_latency(tmp_path: Path) -> None:
    """APR_TOOL_LOG / APR_TOOL_LATENCY_SPREAD_S: the audit the durability test reads (apr_cli.scale)."""
    log = tmp_path / "tools.jsonl"
    env = {"APR_BACKEND": "scripted", "APR_TOOLS": "calculator", "APR_TOOL_LOG": str(log),
           "APR_TOOL_LATENCY_SPREAD_S": "0.2"}
    (calc,) = tools_from_env(env)
    assert await calc.ainvoke({"expression": "6*7"}) == await calc.ainvoke({"expression": "6*7"})
    graph = graph_from_env(env)
    question, expected = arith_question(4)
    state = await graph.ainvoke({"messages": [HumanMessage(question)]}, {"configurable": {"thread_id": "t-4"}})
    assert state["messages"][-1].content == f"Answer: {expected}"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events[:4]] == ["start", "end", "start", "end"]
    assert {e["thread"] for e in events[:4]} == {None}  # called outside a graph
    in_run = events[4:]
    assert len(in_run) == 4 and {e["thread"] for e in in_run} == {"t-4"}
    assert sorted(e["event"] for e in in_run) == ["end", "end", "start", "start"]
    # the latency is fixed by the arguments: the same call takes the same time
    first, second = events[1]["t"] - events[0]["t"], events[3]["t"] - events[2]["t"]
    assert 0 <= first <= 0.2 + 0.5 and abs(first - second) < 0.15
    with pytest.raises(ValueError, match="SPREAD"):
        tools_from_env({"APR_TOOL_LATENCY_SPREAD_S": "-1"})
