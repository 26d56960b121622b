"""The core both agent modes share: contexts, branches, the retry policy, the small helpers.

A *context* is one thread of a run (the root or a branch): a plain dict of fixed-size
fields (id, run, depth, deadline, limits state, the trace record ``rec``) that travels in the
``apr`` channel. Text mode (``agent.py``) adds its prompt and text; tool-call mode
(``chat.py``) its messages. What is here is written once for both:

- ``BranchRunner``: the ``branch`` node. A ``Send`` carries one child spec (or all of a
  spawn's children with ``parallel=False``); each child runs as a run of the branch graph
  (durable: its own checkpoints) or inline (the same nodes in this task, no per-branch
  supersteps). It folds the children's results and traces for the ``merge`` node.
- ``call_with_retries``: the one retry policy for a model call (``APRConfig.backend_attempts``
  with jittered backoff), the LLM concurrency slot, and the deadline read after the slot.
  A request the backend refused (``BackendRequestError``, HTTP 4xx other than 408/409/429) or
  a programming error in an adapter is never retried.
- ``emit`` (custom stream events), ``copy_ctx``, ``spawned_in`` (the run's branch count a
  checkpointed state knows, to seed the budget after a restart), ``where`` (error locations).

Usage (what a mode's ``generate`` does)::

    comp = await call_with_retries(ctx, self.config, self.limiter, lambda: backend_call(),
                                   what=f"backend {type(self.backend).__name__}")
    if comp is None:  # the context's deadline passed while the model was writing
        ...
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer
from langgraph.graph import END
from langgraph.graph.state import CompiledStateGraph

from ..backends.base import BackendRequestError
from ..config import APRConfig
from ..runtime.limits import Limiter
from ..runtime.sync_loop import run_sync
from ..runtime.trace import merge_traces
from .build import _apply

T = TypeVar("T")

#: errors of the caller's or the adapter's own making: the same call fails the same way again
_BUGS = (TypeError, AttributeError, NameError, NotImplementedError, AssertionError, KeyError, IndexError)


class APRBackendError(RuntimeError):
    """The backend kept failing for one context; names the context so the user knows where."""


def emit(event: dict[str, Any]) -> None:
    try:
        get_stream_writer()(event)
    except (RuntimeError, LookupError, KeyError):  # not inside a streaming run
        pass



_SPAWN_KEYS = frozenset({"cid", "run", "depth", "parent", "deadline", "deadline_kind"})


class BranchRunner:
    """The ``branch`` node of both modes: run each child as a branch of its parent.

    One ``Send`` carries one child (parallel) or all of a spawn's children
    (``parallel=False``: they run one after another in this task). A child runs
    either as a run of the branch graph (``subgraph``: its own checkpoints and
    stream namespace) or ``inline``: the same node functions called in this task
    along the same edges (``flow``), with the state's reducers applied by hand.
    Inline skips the per-branch Pregel supersteps, the plugin's main overhead
    (docs/benchmarks/overhead.md); what it gives up is resuming a branch halfway.
    """

    branch_graph: CompiledStateGraph | None = None
    config: APRConfig
    #: node name -> next node, or (route function, its possible targets); filled by compile_agent
    flow: dict[str, Any]
    nodes: dict[str, Callable[[Any, RunnableConfig], Coroutine[Any, Any, dict[str, Any]]]]

    def _new_context(self, **spec: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _start_branch(self, spawn: dict[str, Any]) -> dict[str, Any]:
        """``prepare`` for a graph run a parent started as one of its branches.

        Only the internal branch graph reads a spawn spec, and only the ``branch`` node writes
        one (the root graph's input is ``messages`` only), so no caller can choose a depth,
        deadline, run id or prompt. The spec is still checked, so a bug names itself.
        """
        missing = sorted(_SPAWN_KEYS - spawn.keys())
        if missing or not isinstance(spawn.get("depth"), int) or spawn["depth"] < 1:
            raise ValueError(f"internal error: a branch spec without {missing or 'a depth >= 1'}")
        ctx = self._new_context(**spawn)
        emit({"apr": "branch_start", "ctx": ctx["id"], "label": ctx["label"],
               "outline": ctx["rec"]["outline"], "depth": ctx["depth"]})
        return {"apr": ctx, "apr_spawn_input": None, "apr_trace": self._trace(ctx)}

    @staticmethod
    def _trace(ctx: dict[str, Any], *, tool_calls: list[dict[str, Any]] | None = None,
               spawns: list[list[str]] | None = None, **extra: Any) -> dict[str, Any]:
        """A trace write: the context's record, plus the tool calls and spawns this step added.

        ``ctx["rec"]`` holds the record's fixed-size fields only; its ``tool_calls`` and ``spawns``
        grow in the trace (``merge_traces`` appends them), so a step writes only its own.
        """
        rec = dict(ctx["rec"])
        if tool_calls:
            rec["tool_calls"] = tool_calls
        if spawns:
            rec["spawns"] = spawns
        return {"contexts": {ctx["id"]: rec}, **extra}

    @staticmethod
    def _limit(ctx: dict[str, Any], limit: str, detail: str) -> dict[str, Any]:
        return {"ctx": ctx["id"], "limit": limit, "detail": detail}

    def _inline(self, config: RunnableConfig) -> bool:
        mode = self.config.branch_runs
        if mode == "auto":
            # A checkpointed run always carries a thread_id (LangGraph refuses one without), so
            # its presence, public configuration, stands for "durable": subgraph branches. A run
            # given a thread_id without a checkpointer also gets subgraphs: slower, still right.
            return not (config.get("configurable") or {}).get("thread_id")
        return mode == "inline"

    async def branch(self, payload: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        assert self.branch_graph is not None
        run = self._run_inline if self._inline(config) else self.branch_graph.ainvoke
        return self._collect([(await run(inp, config), index) for inp, index in _inputs(payload)])

    def branch_sync(self, payload: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        assert self.branch_graph is not None
        if self._inline(config):
            return run_sync(self.branch(payload, config))
        return self._collect([(self.branch_graph.invoke(inp, config), index) for inp, index in _inputs(payload)])

    async def _run_inline(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        """One branch: the graph's nodes along its edges, in this task; nested spawns run concurrently."""
        state = {"messages": [], "apr_trace": {}, "apr_branch_results": [], **state}
        state["apr_spawn_input"] = state.get("apr_spawn_input")
        node = "generate"  # where the branch graph starts too: a branch sets itself up there
        while node != END:
            _apply(state, await self.nodes[node](state, config))
            emit({"apr": "step", "ctx": state["apr"]["id"], "node": node})
            nxt = self.flow[node]
            if isinstance(nxt, tuple):
                nxt = nxt[0](state)
            if isinstance(nxt, list):  # Sends to the branch node: one task each, like a superstep
                for update in await gather_or_cancel([self.branch(send.arg, config) for send in nxt]):
                    _apply(state, update)
                emit({"apr": "step", "ctx": state["apr"]["id"], "node": "branch"})
                nxt = self.flow["branch"]
            node = nxt
        return state

    @staticmethod
    def _collect(outs: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        results = []
        for out, index in outs:
            c = out["apr"]
            text = c["text"] if "text" in c else out.get("apr_text", "")
            results.append({"id": c["id"], "label": c["label"], "index": index, "text": text,
                            "end": c["end"], "outline": c["rec"].get("outline")})
        return {"apr_branch_results": results, "apr_trace": _fold([o.get("apr_trace", {}) for o, _ in outs])}



def where(ctx: dict[str, Any]) -> str:
    where = f"context {ctx['id']!r} (depth {ctx['depth']}"
    if ctx["rec"].get("outline"):
        where += f", outline {ctx['rec']['outline'][:60]!r}"
    return where



def copy_ctx(ctx: dict[str, Any]) -> dict[str, Any]:
    out = dict(ctx)
    out["rec"] = dict(ctx["rec"])
    return out


def spawned_in(trace: dict[str, Any] | None, ctx: dict[str, Any]) -> int:
    """Branches this context's checkpointed state knows were started (its own and merged descendants')."""
    ids: set[str] = set()
    for rec in (trace or {}).get("contexts", {}).values():
        ids.update(cid for group in rec.get("spawns", []) for cid in group)
    return len(ids)


def _fold(traces: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in traces:
        out = merge_traces(out, t)
    return out


def _inputs(payload: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """Each child of a ``Send`` payload as a branch-graph input, with its outline index."""
    out = []
    for child in payload["children"]:
        child = dict(child)
        index = child.pop("index")
        out.append(({"apr_spawn_input": child, "messages": []}, index))
    return out


async def gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """All results, or the first error with the others cancelled (as a failing superstep does)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def prompt_of(ctx: dict[str, Any], base: str | None = None) -> str:
    """What a text-mode context continues: its (shared) prompt or ``base``, its own head, its text."""
    return (ctx["prompt"] if base is None else base) + ctx.get("prompt_tail", "") + ctx["text"]


def is_permanent(exc: BaseException) -> bool:
    """A client error the backend will answer the same way again (bad request, auth, context length)."""
    if isinstance(exc, BackendRequestError):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429)


async def call_with_retries(ctx: dict[str, Any], config: APRConfig, limiter: Limiter,
                            call: Callable[[], Awaitable[T]], *, what: str) -> T | None:
    """``call()`` under the run's LLM slot, timeout and retry policy; ``None`` once the deadline passed.

    Retried (``config.backend_attempts`` in all, jittered exponential backoff): timeouts,
    connection and server errors, anything a backend raises as transient. Never retried:
    ``is_permanent`` errors (the message says what to change) and programming errors in an
    adapter (``TypeError``, ``AttributeError``, ...), which name the context they hit.
    """
    last: BaseException | None = None
    for attempt in range(config.backend_attempts):
        try:
            async with limiter.llm():
                # the deadline is read after the wait for a slot: a branch queued behind
                # llm_concurrency others must not get a full budget from before it waited
                timeout = config.backend_timeout_s
                if ctx["deadline"] is not None:
                    rem = max(0.0, ctx["deadline"] - time.time())
                    timeout = rem if timeout is None else min(timeout, rem)
                async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                    return await call()
        except TimeoutError as exc:
            if ctx["deadline"] is not None and time.time() >= ctx["deadline"] - 1e-3:
                return None
            last = exc
        except Exception as exc:
            if is_permanent(exc):
                raise APRBackendError(
                    f"{what} refused the request in {where(ctx)}); not retried, it cannot succeed as sent: "
                    f"{type(exc).__name__}: {exc}. For a context-length error give the model a larger context "
                    f"(n_ctx / max_model_len), lower APRConfig.max_tokens ({config.max_tokens}) or shorten the "
                    "conversation and tool outputs (max_tool_output_chars).") from exc
            if isinstance(exc, _BUGS):
                raise APRBackendError(f"{what} raised in {where(ctx)}): {type(exc).__name__}: {exc}") from exc
            last = exc
        if attempt + 1 < config.backend_attempts:
            await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt) * (1 + random.random()))
    raise APRBackendError(f"{what} failed in {where(ctx)}) after {config.backend_attempts} attempts: "
                          f"{type(last).__name__}: {last}") from last
