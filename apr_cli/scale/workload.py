"""Agent runs over engine replicas: the real APR graph on a real small model, kept cheap.

The workload of the scale-out test and benchmark. Each run asks the model (Gemma
3 270M base, greedy) to handle two items; a short few-shot prompt shows it a
spawn: the root writes ``<Parallel><Outlines>`` with one outline per item and
stops at ``</Outlines>``; the runtime runs one branch per outline (each a
request that shares the root's prefix, with the run id as routing key); the
merge folds them back and the root finishes its line. The prompt is short
(about 150 tokens) and every context is capped at ``max_tokens`` so that many
runs fit on two busy CPU cores.

"Right answer", defined honestly for a 270M base model:
- the same final answer and the same transcript as an undisturbed reference
  run of the same question, except inside the threads' own sentences
  (``skeleton``): greedy decoding on llama.cpp is not bit-reproducible across
  KV-cache states (a prompt evaluated after a 154-token cache hit and the same
  prompt evaluated after a 190-token hit differ in the last bits), and about
  one branch sentence in eight flips a near-tied word between undisturbed
  passes ("Nepal is in Asia." / "Nepal is in South Asia."), and
- a content check the model reliably passes on this prompt (``content_ok``): the
  run spawned two branches, outline *i* starts with item *i* of its question, and
  each thread wrote one "X is in Y." sentence.

Usage::

    backend = workload_backend(router_url)
    graph = workload_graph(backend)
    result = await run_one(graph, 3)     # {"answer", "transcript", "branch_phase_s", ...}
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage

PAIRS = [("Italy", "Japan"), ("Peru", "Chile"), ("Kenya", "Ghana"), ("Spain", "Egypt"), ("Cuba", "Fiji"),
         ("Nepal", "Laos"), ("Mali", "Chad"), ("Iran", "Iraq"), ("Oman", "Togo"), ("Cyprus", "Malta"),
         ("Norway", "Sweden"), ("Poland", "Latvia")]

FEWSHOT = (
    "Q: France and Spain\n"
    "A: <Parallel>\n<Outlines>\n<Outline>1: France</Outline>\n<Outline>2: Spain</Outline>\n</Outlines>\n"
    "<Thread>1: France is in Europe.</Thread>\n<Thread>2: Spain is in Europe.</Thread>\n</Parallel>\nDone.\n"
    "Q: Brazil and India\n"
    "A: <Parallel>\n<Outlines>\n<Outline>1: Brazil</Outline>\n<Outline>2: India</Outline>\n</Outlines>\n"
    "<Thread>1: Brazil is in South America.</Thread>\n<Thread>2: India is in Asia.</Thread>\n</Parallel>\nDone.\n"
)


def question(i: int) -> tuple[str, tuple[str, str]]:
    a, b = PAIRS[i % len(PAIRS)]
    return f"{a} and {b}", (a, b)


def render_workload(messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str:
    """The few-shot prompt, then the user's question (tools are not offered: this measures the fork)."""
    asked = next(str(m.content) for m in reversed(messages) if isinstance(m, HumanMessage))
    return f"{FEWSHOT}Q: {asked}\nA:"


def workload_backend(url: str, **kw: Any) -> Any:
    from apr_agents.backends import OpenAICompatibleBackend

    kw.setdefault("timeout_s", 300.0)
    return OpenAICompatibleBackend(url, "gemma-3-270m", render=render_workload, end_stops=["\nQ:"], **kw)


def workload_graph(backend: Any, **config: Any) -> Any:
    from apr_agents import APRConfig, create_apr_agent

    cfg = {"max_tokens": 40, "max_depth": 1, "max_threads": 2, "backend_attempts": 4,
           "thread_timeout_s": 600, "llm_concurrency": 64, **config}
    return create_apr_agent(backend, [], APRConfig(**cfg))


def _branch_phase(trace: dict[str, Any]) -> float | None:
    branches = [c for c in trace["contexts"].values() if c.get("depth", 0) >= 1]
    if not branches or any(c.get("ended") is None for c in branches):
        return None
    return max(c["ended"] for c in branches) - min(c["started"] for c in branches)


async def run_one(graph: Any, i: int) -> dict[str, Any]:
    """One run of question ``i``: its answer, transcript, branch texts and branch-phase wall time."""
    q, items = question(i)
    t = time.perf_counter()
    state = await graph.ainvoke({"messages": [HumanMessage(q)]})
    trace = state["apr_trace"]
    return {"i": i, "items": items, "answer": state["messages"][-1].content, "transcript": trace["transcript"],
            "branches": trace["summary"]["branches"], "backend_calls": trace["summary"]["backend_calls"],
            "branch_phase_s": _branch_phase(trace), "wall_s": time.perf_counter() - t}


def content_ok(result: dict[str, Any]) -> bool:
    """The run spawned two branches, outline i starts with item i, and every thread wrote a
    "<Country> is in <place>." sentence (see module doc; which country a branch names is
    left to the reference comparison: the 270M model often repeats item 1 in branch 2)."""
    transcript = result["transcript"]
    outlines = all(f"<Outline>{n}: {item}" in transcript for n, item in enumerate(result["items"], 1))
    threads = re.findall(r"<Thread>(\d+): [A-Z][a-z]+ is in [^<]+</Thread>", transcript)
    return result["branches"] == 2 and outlines and sorted(threads) == ["1", "2"]


def skeleton(transcript: str) -> str:
    """The transcript with each thread's own text masked: outlines, thread order, the root's text stay."""
    return re.sub(r"<Thread>(\d+):[^<]*</Thread>", r"<Thread>\1: ...</Thread>", transcript)


async def run_many(graph: Any, indices: list[int]) -> list[dict[str, Any] | BaseException]:
    return list(await asyncio.gather(*(run_one(graph, i) for i in indices), return_exceptions=True))
