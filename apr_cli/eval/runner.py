"""Run every (question, method) pair over one backend, with a per-run timeout and an overall deadline.

``make_backend`` builds the engine the CLI names (``embedded``, ``openai``,
``vllm``, or the FAKE ``scripted`` oracle); ``run_eval`` runs the methods
question by question (``concurrency`` runs in flight; 1 keeps latencies clean),
so every method meets the same load, and marks runs that the deadline leaves no
time for as skipped instead of starting them. ``isolate=True`` gives every run the
same prefix cache to start from (``LlamaCppBackend.snapshot_cache``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.tools import BaseTool

from ..demo import WARM_UP_QUESTION, can_isolate
from .methods import AgentSettings, RunResult, build_agent, run_one
from .questions import Question


def make_backend(kind: str, *, model: str | None = None, base_url: str | None = None, grammar: str | None = None,
                 n_ctx: int = 8192, n_threads: int | None = None, questions: Sequence[Question] = (),
                 token_latency_s: float = 0.002, jump_forward: bool = True) -> Any:
    """The backend every method shares."""
    if kind == "scripted":
        from .oracle import OracleBackend

        return OracleBackend(questions, token_latency_s=token_latency_s)
    if kind == "embedded":
        from apr_agents.backends import embedded

        kwargs: dict[str, Any] = {"n_ctx": n_ctx, "jump_forward": jump_forward}
        if grammar is not None:  # else the model's own default (grammar-constrained for instruct models)
            kwargs["grammar"] = None if grammar == "none" else grammar
        if n_threads is not None:
            kwargs["n_threads"] = n_threads
        return embedded.default_backend(model=model, **kwargs)
    if kind == "openai":
        from apr_agents.backends.openai_compat import OpenAICompatibleBackend

        if not base_url or not model:
            raise ValueError("--backend openai needs --base-url and --model")
        return OpenAICompatibleBackend([u.strip() for u in base_url.split(",")], model)
    if kind == "vllm":
        from apr_agents.backends.models import DEFAULT_MODEL
        from apr_agents.backends.vllm import VLLMBackend

        # an instruction-tuned model with the same prompt format and per-step grammar as the
        # embedded default, so the two engines run the same agent
        return VLLMBackend(model or DEFAULT_MODEL, chat_template=True,
                           grammar=None if grammar == "none" else (grammar or "protocol"),
                           enforce_eager=True, max_model_len=n_ctx)
    raise ValueError(f"unknown backend {kind!r}")


def run_order(methods: Sequence[str], i: int) -> list[str]:
    """The methods' order on the i-th question: turned by one each question, and every other
    cycle of ``len(methods)`` questions mirrored, so over ``2 * len(methods)`` questions each
    method runs before each other one exactly as often as after it (with three methods: all
    six orders). A plain rotation of three put ``apr-seq`` after ``apr`` on two questions in
    three."""
    n = len(methods)
    order = [methods[(i + k) % n] for k in range(n)]
    return order[::-1] if (i // n) % 2 else order


#: Answered once by each method before the timed runs when they are isolated; neither graded
#: nor reported. It warms what every run would otherwise find warm or cold by chance: the
#: methods' shared instructions in the prefix cache, the grammar's vocabulary scan.
WARM_UP = Question(id="warm-up", question=WARM_UP_QUESTION, grading={"kind": "number", "value": 42},
                   type="warm-up")


async def run_eval(
    backend: Any,
    questions: Sequence[Question],
    methods: Sequence[str],
    tools: list[BaseTool],
    settings: AgentSettings,
    *,
    concurrency: int = 1,
    deadline_s: float | None = None,
    progress: Callable[[RunResult, int, int], None] | None = None,
    isolate: bool = False,
) -> list[RunResult]:
    """Every method on every question; results in run order.

    Runs go question by question, in ``run_order(methods, i)`` for the i-th question: a
    method run after another on the same question can find that run's prompts in the
    engine's saved states (the plugin with ``parallel=False`` after the plugin writes the
    same transcript), so each method must come after each other one as often as before it.

    ``isolate`` (one run at a time, a backend with ``snapshot_cache``): each method first
    answers ``WARM_UP``; then the prefix cache is snapshotted and restored before every
    run, so every run starts from the same cache whatever ran before it: its time and its
    greedy text are its own.
    """
    graphs = {m: build_agent(m, backend, tools, settings) for m in methods}
    snapshot = None
    if isolate:
        if concurrency != 1:
            raise ValueError("isolated runs need one run at a time (concurrency 1)")
        if not can_isolate(backend):
            raise ValueError(f"isolated runs need a backend that can snapshot its prefix cache "
                             f"({type(backend).__name__} cannot)")
        for m in methods:
            warm = await run_one(graphs[m], m, WARM_UP, settings)
            if warm.error and not warm.timed_out:  # a backend that cannot answer it will answer nothing
                raise RuntimeError(f"the warm-up run of {m!r} failed before any timed run: {warm.error}")
        snapshot = backend.snapshot_cache()
    jobs = [(q, m) for i, q in enumerate(questions) for m in run_order(methods, i)]
    results: list[RunResult | None] = [None] * len(jobs)
    sem = asyncio.Semaphore(max(1, concurrency))
    start = time.monotonic()
    done = 0

    async def job(i: int, q: Question, m: str) -> None:
        nonlocal done
        async with sem:
            timeout = settings.timeout_s
            if deadline_s is not None:
                left = deadline_s - (time.monotonic() - start)
                if left < min(5.0, timeout):
                    results[i] = RunResult(question_id=q.id, method=m, type=q.type, parts=q.parts, correct=False,
                                           answer="", wall_s=0.0, skipped=True, error="eval deadline reached")
                else:
                    timeout = min(timeout, left)
            if results[i] is None:
                if snapshot is not None:
                    backend.restore_cache(snapshot)
                results[i] = await run_one(graphs[m], m, q, settings, timeout_s=timeout)
            done += 1
            if progress is not None:
                progress(results[i], done, len(jobs))  # type: ignore[arg-type]

    await asyncio.gather(*(job(i, q, m) for i, (q, m) in enumerate(jobs)))
    return [r for r in results if r is not None]


__all__ = ["WARM_UP", "can_isolate", "make_backend", "run_eval", "run_order"]
