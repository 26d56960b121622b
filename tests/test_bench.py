"""The benchmark module runs and writes its reports. Only what cannot flake is asserted:
speed goals live in the benchmark's tables, not here."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

from apr_cli.bench.__main__ import main


def test_quick_overhead_suite_writes_tables(tmp_path: Path) -> None:
    assert main(["overhead", "--quick", "--out", str(tmp_path)]) == 0
    md, js = tmp_path / "overhead-quick.md", tmp_path / "overhead-quick.json"
    assert md.exists() and js.exists()
    assert "plain LangGraph" in md.read_text(encoding="utf-8")
    data = json.loads(js.read_text(encoding="utf-8"))
    assert data["machine"]["nproc"] >= 1 and data["machine"]["cpu"]
    rows = data["data"]["rows"]
    assert [r["k"] for r in rows] == [1, 8, 64]
    for r in rows:
        assert r["same_transcript"], "the three variants must do the same work"
        calls = r["backend_calls_per_run"]
        assert calls["plugin"] == calls["langgraph"] == calls["gather"] == 2 + 2 * r["k"]
        for key in ("plugin_vs_langgraph", "langgraph_vs_gather", "plugin_vs_gather"):
            assert math.isfinite(r[key]) and r[key] > 0
    assert data["goals"] and all(g["measured"] > 0 for g in data["goals"])
    durable = data["data"]["checkpointed"]  # the dev install has the sqlite extra
    assert [r["k"] for r in durable] == [1, 8, 64]
    assert all(math.isfinite(r[key]) and r[key] > 0 for r in durable
               for key in ("plugin_vs_langgraph", "plugin_vs_langgraph_tasks", "tasks_vs_langgraph"))


def test_unknown_suite_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["nope", "--out", str(tmp_path)]) == 2


def test_fake_chat_model_pays_the_same_cost_model_as_the_text_backend() -> None:
    from langchain_core.messages import HumanMessage

    from apr_agents.testing.costmodel import CostModel
    from apr_agents.testing.fake_chat import FakeCostChatModel

    cost = CostModel(call_latency_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.0)
    model = FakeCostChatModel(policy=lambda msgs: ("one two three", [{"name": "t", "args": {"x": 1}}]), cost=cost)
    msg = asyncio.run(model.ainvoke([HumanMessage("hi")]))
    assert msg.content == "one two three"
    assert msg.tool_calls[0]["name"] == "t" and msg.tool_calls[0]["args"] == {"x": 1}
    # the engine generated the text and the Hermes tool call, token by token
    assert model.engine.generated[""] == msg.usage_metadata["output_tokens"] > 3


def test_trace_critical_path_of_a_nested_block() -> None:
    from apr_cli.bench.traces import measure, whitespace_tokens

    text = ("pre\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n</Goal>\n"
            "<Path>\n1: x x x x x x\n</Path>\n<Path>\n2: y\n</Path>\n<Conclusion>\nz\n</Conclusion>\n"
            "</Parallel>\nend")
    m = measure(text, whitespace_tokens)
    # the shorter path (2 tokens: "2:" "y") is off the critical path
    assert m["total"] == len(text.split()) and m["critical_path"] == m["total"] - 2
    assert m["blocks"] == 1 and m["threads"] == 2


def test_engine_batching_measurement_runs_on_a_fake_engine() -> None:
    from apr_agents.backends.base import Completion
    from apr_cli.bench.engines import bench_engine

    class FakeEngine:
        """FAKE engine: each call 'decodes' max_tokens tokens after a short sleep."""

        def render(self, messages: list, tools: list) -> str:
            return "prompt: " + " ".join(str(m.content) for m in messages) + "\n"

        async def complete(self, prompt: str, *, stop: list[str], max_tokens: int, temperature: float = 0.0,
                           ignore_eos: bool = False) -> Completion:
            await asyncio.sleep(0.01)
            return Completion(text=" x" * max_tokens, finish_reason="length", prompt_tokens=10,
                              completion_tokens=max_tokens, cached_prompt_tokens=5)

    rows = asyncio.run(bench_engine(FakeEngine(), [1, 2], tokens=4, reps=1))
    assert [r["k"] for r in rows] == [1, 2]
    for r in rows:
        assert r["max_concurrent"] == r["k"]
        assert min(r["generated_per_branch"]) == 4
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert r["prefix_cache_hit"] == 0.5


async def test_batch_gain_measures_one_by_one_against_together() -> None:
    """The batching probe on a FAKE backend with fixed latency per call: calls served at once
    show a gain near K, which is what the probe reports for an engine that batches."""
    from apr_agents.testing import ScriptedBackend
    from apr_cli.bench.batch_gain import measure

    rows = await measure(ScriptedBackend(lambda prompt: "a b c", call_latency_s=0.05), tokens=3, max_k=4)
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert rows[-1]["gain"] > 2.0 and rows[-1]["tokens_per_request"] == 3
