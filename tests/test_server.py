"""The served graph: the real LangGraph server (``langgraph dev``) on 127.0.0.1, driven by langgraph-sdk.

One server for the module (graphs/langgraph.json, FAKE scripted backend
``APR_SCRIPT=arith``, the calculator tool with 0.2 s of simulated API latency).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("langgraph_sdk")
pytest.importorskip("langgraph_api", reason="needs langgraph-cli[inmem] (extra apr-agents[serve])")

from langgraph_sdk import get_client

from apr_agents.testing.scripts import arith_question
from apr_cli.bench.load import default_config, load_env, run_load, serve

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]
RUNS = 100


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    assert default_config().parent.name == "graphs"  # the repository's own langgraph.json
    with serve(load_env(tool_latency_s=0.2), n_jobs_per_worker=RUNS) as url:
        yield url


async def test_stream_a_run_and_read_the_final_state(server_url: str) -> None:
    client = get_client(url=server_url)
    assistants = await client.assistants.search(graph_id="apr")
    assert assistants, "the server does not serve graph 'apr'"
    thread = await client.threads.create()
    question, expected = arith_question(7)
    seen: dict[str, list[dict]] = {}
    values: dict = {}
    async for part in client.runs.stream(thread["thread_id"], "apr",
                                         input={"messages": [{"role": "human", "content": question}]},
                                         stream_mode=["custom", "updates", "values"], stream_subgraphs=True):
        mode, _, ns = part.event.partition("|")
        if mode == "custom":
            seen.setdefault(ns, []).append(part.data)
        elif mode == "values" and not ns:
            values = part.data
    assert values["messages"][-1]["content"] == f"Answer: {expected}"

    # over HTTP too, each branch's events come apart, by namespace and by context id
    root = seen.pop("")
    assert [e["apr"] for e in root if e["apr"] in ("spawn", "merge")] == ["spawn", "merge"]
    spawn = next(e for e in root if e["apr"] == "spawn")
    assert [label for label, _ in spawn["outlines"]] == ["1", "2"]
    assert all(text.startswith("compute ") for _, text in spawn["outlines"])
    assert len(seen) == 2  # one namespace per branch
    ctx_of = {}
    for ns, events in seen.items():
        ctxs = {e["ctx"] for e in events}
        assert len(ctxs) == 1
        ctx_of[ns] = ctxs.pop()
        kinds = [e["apr"] for e in events]
        assert kinds[0] == "branch_start" and kinds[-1] == "branch_end"
        assert {"token", "tool_start", "tool_end"} <= set(kinds)
    assert sorted(ctx_of.values()) == ["root/1.1", "root/1.2"]

    # the thread's final state, with the run's trace, read back from the server
    state = await client.threads.get_state(thread["thread_id"])
    assert state["next"] == []
    trace = state["values"]["apr_trace"]
    assert trace["summary"]["branches"] == 2 and trace["summary"]["tool_calls"] == 2
    assert trace["summary"]["max_concurrent_branches"] == 2
    assert sorted(trace["contexts"]) == ["root", "root/1.1", "root/1.2"]
    assert trace["transcript"].endswith(f"Answer: {expected}")


async def test_100_concurrent_runs_all_answer_correctly(server_url: str) -> None:
    report = await asyncio.wait_for(run_load(server_url, RUNS, timeout_s=240), 260)
    assert report["failed"] == 0, report["failures"]
    assert report["ok"] == RUNS and report["branches"] == 2 * RUNS and report["tool_calls"] == 2 * RUNS
    # 100 runs of 0.2 s tool latency each: overlapped, not one after another (wide margin for 2 busy cores)
    assert report["wall_s"] < RUNS * 0.2, report
    print(f"\nload: {report}")
