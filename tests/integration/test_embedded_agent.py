"""The whole agent on the real embedded default model (Qwen2.5-Coder-1.5B-Instruct, llama.cpp): the
README's main job, `make demo`, answered right."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage

from apr_agents import APRConfig, create_apr_agent
from apr_agents.protocol import parse_document
from apr_cli.demo import EMBEDDED_DEMO_QUESTION, answer_is_right, expected_answer
from apr_tools import with_latency

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def backend():  # type: ignore[no-untyped-def]
    pytest.importorskip("llama_cpp", reason="needs the [embedded] extra")
    from apr_agents.backends import default_backend

    b = default_backend(grammar="protocol", reuse_prefix=False)
    yield b
    b.close()


async def test_embedded_model_drives_spawn_tools_and_merge(backend) -> None:  # type: ignore[no-untyped-def]
    from apr_tools import calculator, lookup

    cfg = APRConfig(max_tokens=400, max_threads=4, max_depth=1)
    runs = {}
    for parallel in (True, False):
        graph = create_apr_agent(backend, [with_latency(calculator, 0.3), with_latency(lookup, 0.3)],
                                 cfg.model_copy(update={"parallel": parallel}))
        runs[parallel] = await graph.ainvoke({"messages": [HumanMessage(EMBEDDED_DEMO_QUESTION)]})
    par, seq = runs[True], runs[False]
    summary = par["apr_trace"]["summary"]
    # What the real model did on this prompt (greedy, grammar-constrained, fresh prefill per call):
    assert summary["branches"] >= 2, par["apr_trace"]["transcript"][:600]
    assert summary["tool_calls"] >= 2
    assert summary["critical_path_tokens"] < summary["total_tokens"]
    assert summary["max_concurrent_branches"] >= 2
    for cid, rec in par["apr_trace"]["contexts"].items():
        assert rec["end"] in ("eos", "thread_end", "max_tokens"), (cid, rec["end"])
        assert rec["completion_tokens"] > 0 and rec["prompt_tokens"] > 0
    # The grammar keeps every reply well-formed: the transcript parses with no repairs.
    doc = parse_document(par["apr_trace"]["transcript"])
    assert not doc.repairs, doc.repairs
    assert len(doc.blocks[0].threads) == summary["branches"]
    # Fresh prefill makes the text depend on the prompt alone: both modes write the same transcript.
    assert seq["apr_trace"]["transcript"] == par["apr_trace"]["transcript"]
    assert seq["apr_trace"]["summary"]["max_concurrent_branches"] == 1
    assert par["messages"][-1].content == seq["messages"][-1].content != ""
    # ... and the answer is right: the knowledge base the tools read says 68.4 + 40.1.
    assert answer_is_right(str(par["messages"][-1].content)), (expected_answer(), par["messages"][-1].content)


def test_make_demo_answers_right_in_both_modes_from_the_same_cache(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``apr demo`` as ``make demo`` runs it: KV cache reuse, an untimed warm-up, then both runs
    from the same snapshot of the cache, the threads' conclusions at the merge; it exits non-zero
    when an answer is wrong."""
    pytest.importorskip("llama_cpp", reason="needs the [embedded] extra")
    import json

    from apr_cli.cli import main

    rc = main(["demo", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]
    assert "warm-up" in out and out.count("(from the tools' knowledge base): right") == 2, out[-2000:]
    assert "merge=conclusions" in out, out[:2000]
    for mode in ("parallel", "sequential"):
        trace = json.loads((tmp_path / f"demo-trace-{mode}.json").read_text())
        calls = [m for rec in trace["contexts"].values() for m in rec["model_calls"]]
        # the first call found the instructions in the cache (the warm-up put them there)
        first = min(calls, key=lambda m: m["started"])
        assert first["cached_prompt_tokens"] >= 0.8 * first["prompt_tokens"], first
    assert (tmp_path / "demo-timeline-parallel.png").stat().st_size > 0
