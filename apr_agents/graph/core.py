"""The core both agent modes share: contexts, branches, the retry policy, the small helpers.

A *context* is one thread of a run (the root or a branch): a plain dict of fixed-size
fields (id, run, depth, deadline, limits state, the trace record ``rec``) that travels in the
``apr`` channel. Text mode (``agent.py``) adds its prompt and text; tool-call mode
(``chat.py``) its messages. What is here is written once for both:

- ``BranchRunner``: the ``branch`` node. A ``Send`` carries one child spec (or all of a
  spawn's children with ``parallel=False``); each child runs the mode's nodes along the
  graph's edges in this task, each step a LangGraph task when the run is checkpointed (so
  a crash resumes it from its last completed step). It folds the children's results and
  traces for the ``merge`` node.
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
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.config import get_config, get_stream_writer
from langgraph.func import task
from langgraph.graph import END

from ..backends.base import BackendRequestError
from ..config import APRConfig
from ..runtime.limits import Limiter
from ..runtime.sync_loop import run_sync
from ..runtime.trace import merge_traces
from .state import apply_update

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

#: the names of the LangGraph tasks a checkpointed run's branch steps and nested children run as
#: (LangGraph's ``updates`` stream reports their results under these names)
BRANCH_TASKS = ("apr_step", "apr_branch")

#: what a branch's step loop asks its driver for: a node's update, or a nested spawn's results
_Request = tuple[str, Any, Any]


def durable(config: RunnableConfig) -> bool:
    """Whether a run is checkpointed, read from public configuration: LangGraph refuses a
    checkpointed run without a ``thread_id``, so its presence stands for "durable". A run given
    a ``thread_id`` without a checkpointer also runs its branch steps as tasks: slower, still right."""
    return bool((config.get("configurable") or {}).get("thread_id"))


class BranchRunner:
    """The ``branch`` node of both modes: run each child as a branch of its parent.

    One ``Send`` carries one child (parallel) or all of a spawn's children
    (``parallel=False``: they run one after another in this task). A child runs the
    mode's own nodes along the graph's own edges (``flow``, the table ``compile_agent``
    builds the graph from), each update folded in with ``APRState``'s reducers; a
    nested spawn's children run concurrently. One path, two drivers of it:

    - without a checkpointer the nodes are called directly, in this task;
    - with one (``durable``), each step and each nested spawn is a LangGraph task
      (``langgraph.func.task``, which LangGraph allows inside a graph node): its result is
      saved as it completes, so after a crash the ``branch`` node runs again, finished
      steps return their saved results (no model or tool call) and the branch goes on
      from its last completed step. A nested child is a task of its own, so the identity
      of the steps inside it does not depend on how concurrent children interleave.
    """

    config: APRConfig
    #: node name -> next node, or (route function, its possible targets); filled by compile_agent
    flow: dict[str, Any]
    #: the branch's nodes as the graph runs them (growing fields as deltas); filled by compile_agent
    nodes: dict[str, Callable[[Any, RunnableConfig], Coroutine[Any, Any, dict[str, Any]]]]

    def _new_context(self, **spec: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _start_branch(self, spawn: dict[str, Any]) -> dict[str, Any]:
        """The setup of a branch a parent started, in the branch's first ``generate`` step.

        Only the ``branch`` node writes a spawn spec (the root graph's input is ``messages``
        only), so no caller can choose a depth, deadline, run id or prompt. The spec is still
        checked, so a bug names itself.
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
               spawns: list[list[str]] | None = None, model_calls: list[dict[str, Any]] | None = None,
               **extra: Any) -> dict[str, Any]:
        """A trace write: the context's record, plus the model calls, tool calls and spawns this
        step added.

        ``ctx["rec"]`` holds the record's fixed-size fields only; its ``model_calls``,
        ``tool_calls`` and ``spawns`` grow in the trace (``merge_traces`` appends them), so a step
        writes only its own.
        """
        rec = dict(ctx["rec"])
        if model_calls:
            rec["model_calls"] = model_calls
        if tool_calls:
            rec["tool_calls"] = tool_calls
        if spawns:
            rec["spawns"] = spawns
        return {"contexts": {ctx["id"]: rec}, **extra}

    @staticmethod
    def _limit(ctx: dict[str, Any], limit: str, detail: str) -> dict[str, Any]:
        return {"ctx": ctx["id"], "limit": limit, "detail": detail}

    # -- the one branch loop ---------------------------------------------------
    def _steps(self, spec: dict[str, Any]) -> Generator[_Request, Any, dict[str, Any]]:
        """One branch, as requests to a driver: ``("node", name, state)`` gets that node's update,
        ``("spawn", payloads, None)`` the ``branch`` updates of a nested spawn's ``Send``s."""
        state: dict[str, Any] = {"messages": [], "apr_trace": {}, "apr_branch_results": [], "apr_spawn_input": spec}
        node = "generate"  # a branch sets itself up in its first generate step
        while node != END:
            apply_update(state, (yield ("node", node, state)))
            emit({"apr": "step", "ctx": state["apr"]["id"], "node": node})
            nxt = self.flow[node]
            if isinstance(nxt, tuple):
                nxt = nxt[0](state)
            if isinstance(nxt, list):  # Sends to the branch node: concurrent, like one superstep
                for update in (yield ("spawn", [send.arg for send in nxt], None)):
                    apply_update(state, update)
                emit({"apr": "step", "ctx": state["apr"]["id"], "node": "branch"})
                nxt = self.flow["branch"]
            node = nxt
        return state

    async def run_branch(self, spec: dict[str, Any], config: RunnableConfig, *, tasks: bool) -> dict[str, Any]:
        """Drive one branch to its end on the event loop; its final state."""
        steps, reply = self._steps(spec), None
        while True:
            try:
                kind, what, state = steps.send(reply)
            except StopIteration as done:
                return done.value
            if kind == "node":
                reply = await (self._step_task(what, state) if tasks else self.nodes[what](state, config))
            else:
                reply = await gather_or_cancel(
                    [self._branch_task(p) if tasks else self.branch(p, config) for p in what])

    def _run_branch_sync(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The same loop driven from a sync run's worker thread, its steps as sync tasks."""
        steps, reply = self._steps(spec), None
        while True:
            try:
                kind, what, state = steps.send(reply)
            except StopIteration as done:
                return done.value
            if kind == "node":
                reply = self._step_task_sync(what, state).result()
            else:
                reply = [f.result() for f in [self._branch_task_sync(p) for p in what]]

    # the tasks a durable branch runs its steps and nested children as
    async def _step(self, node: str, state: dict[str, Any]) -> dict[str, Any]:
        return await self.nodes[node](state, get_config())

    def _step_sync(self, node: str, state: dict[str, Any]) -> dict[str, Any]:
        return run_sync(self.nodes[node](state, get_config()))

    def make_tasks(self) -> None:
        """The LangGraph tasks of the durable driver (named so ``updates`` streams tell them apart)."""
        step, nested = BRANCH_TASKS
        self._step_task = task(self._step, name=step)
        self._branch_task = task(self._nested, name=nested)
        self._step_task_sync = task(self._step_sync, name=step)
        self._branch_task_sync = task(self._nested_sync, name=nested)

    async def _nested(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.branch(payload, get_config())

    def _nested_sync(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.branch_sync(payload, get_config())

    async def branch(self, payload: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        tasks = durable(config)
        return self._collect([(await self.run_branch(spec, config, tasks=tasks), index)
                              for spec, index in _children(payload)])

    def branch_sync(self, payload: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        if not durable(config):
            return run_sync(self.branch(payload, config))
        return self._collect([(self._run_branch_sync(spec), index) for spec, index in _children(payload)])

    @staticmethod
    def _collect(outs: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        results = []
        for out, index in outs:
            c = out["apr"]
            text = c["text"] if "text" in c else out.get("apr_text", "")
            results.append({"id": c["id"], "label": c["label"], "index": index, "text": text,
                            "end": c["end"], "outline": c["rec"].get("outline")})
        return {"apr_branch_results": results, "apr_trace": _fold([o.get("apr_trace", {}) for o, _ in outs])}



def model_call(started: float, *, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int,
               engine: tuple[float | None, float | None] = (None, None)) -> dict[str, Any]:
    """A trace record of one model call (retries included): when it started, how long it took, its
    tokens, and, when the backend says, the engine's own span for it (``engine``: when the engine
    began and finished it, after any wait in its queue). Timelines draw these, so a serial
    engine's branches show their engine spans one after another and a batching engine's side by side."""
    rec: dict[str, Any] = {"started": started, "duration_s": round(time.time() - started, 4),
                           "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached_prompt_tokens,
                           "completion_tokens": completion_tokens}
    if engine[0] is not None and engine[1] is not None:
        rec["engine_started"], rec["engine_ended"] = engine
    return rec


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


def _children(payload: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """Each child spec of a ``Send`` payload, with its outline index."""
    out = []
    for child in payload["children"]:
        child = dict(child)
        out.append((child, child.pop("index")))
    return out


async def gather_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
    """All results, or the first error with the others cancelled (as a failing superstep does)."""
    tasks = [asyncio.ensure_future(c) for c in aws]
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
