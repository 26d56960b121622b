"""``create_apr_agent``: the compiled LangGraph graph that runs model-written spawns.

One graph serves the root and every branch. A context loops
``generate -> tools -> generate`` until its model stops at a spawn point; then
each outline becomes a ``Send`` to the ``branch`` node, which runs the same
graph again for that branch (a subgraph run with its own checkpoints, or the
same nodes called inline: ``APRConfig.branch_runs``). When
all branches of the spawn are back, ``merge`` folds them into the parent's text
in outline order and the parent goes on generating.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal, TypeVar

from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.config import get_stream_writer
from langgraph.graph import END
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Overwrite, Send

from ..backends.base import BackendError, BackendRequestError, Completion, check_backend, route_key
from ..config import APRConfig
from ..protocol.dialects import TOOL_CALL_CLOSE, Dialect, get_dialect, neutralize
from ..protocol.document import parse_document
from ..protocol.parser import Repair, Spawn, StreamParser, ToolCall
from ..runtime.limits import Limiter, ThreadBudget
from ..runtime.sync_loop import run_sync
from ..runtime.tool_exec import run_tool_calls
from ..runtime.trace import merge_traces, new_record, summarize
from .build import _apply, checked_config_and_tools, compile_agent
from .prefixes import PrefixMissing, SharedPrefixes
from .state import APRState

T = TypeVar("T")
#: characters of context text whose parse is kept between steps (LRU over contexts). A parser
#: holds about its text again, so the cache costs at most ~2-3x this in memory (docs/architecture.md).
PARSER_CACHE_CHARS = 32 * 2**20
MergeStrategy = Callable[[list[dict[str, Any]], Dialect], str]


class APRBackendError(RuntimeError):
    """The backend kept failing for one context; names the context so the user knows where."""


def _emit(event: dict[str, Any]) -> None:
    try:
        get_stream_writer()(event)
    except (RuntimeError, LookupError, KeyError):  # not inside a streaming run
        pass


def final_answer(text: str, dialect: Dialect) -> str:
    """The root text after the last protocol block (SPEC §2.8)."""
    doc = parse_document(text, dialect)
    return doc.final_text or doc.last_text


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
        _emit({"apr": "branch_start", "ctx": ctx["id"], "label": ctx["label"],
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
            _emit({"apr": "step", "ctx": state["apr"]["id"], "node": node})
            nxt = self.flow[node]
            if isinstance(nxt, tuple):
                nxt = nxt[0](state)
            if isinstance(nxt, list):  # Sends to the branch node: one task each, like a superstep
                for update in await _gather_or_cancel([self.branch(send.arg, config) for send in nxt]):
                    _apply(state, update)
                _emit({"apr": "step", "ctx": state["apr"]["id"], "node": "branch"})
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


class _Agent(BranchRunner):
    def __init__(self, backend: Any, tools: Sequence[BaseTool], config: APRConfig,
                 merge_strategy: MergeStrategy | None) -> None:
        self.backend = backend
        self.tools = {t.name: t for t in tools}
        self.tool_schemas = [convert_to_openai_tool(t) for t in tools]
        self.config = config
        self.dialect = get_dialect(config.dialect)
        self.limiter = Limiter(config)
        self.budget = ThreadBudget()
        self.merge_strategy = merge_strategy
        self.branch_graph: CompiledStateGraph | None = None
        # checkpointed as deltas: the context text (apr_text) and, once per context, its prompt
        self.delta_fields = ({"text": "apr_text"}, {"prompt": "apr_prompt"})
        self._parsers: OrderedDict[tuple[str, str], tuple[StreamParser, str]] = OrderedDict()
        self._parser_chars = 0  # characters of context text the cached parsers hold
        self.parser_cache_chars = PARSER_CACHE_CHARS
        self.prefixes = SharedPrefixes()  # spawn prefixes kept once in the graph's store

    # -- context bookkeeping -------------------------------------------------
    def _new_context(self, *, cid: str, run: str, depth: int, label: str | None,
                     outline: str | None, parent: str | None, deadline: float | None,
                     deadline_kind: str | None, budget_seed: int = 0, prompt: str | None = None,
                     prompt_ref: str | None = None, prompt_tail: str = "") -> dict[str, Any]:
        # A branch's prompt is its parent's prefix: either ``prompt_ref``, the key of the one copy
        # in the graph's store (a checkpointed run with a store: no per-child copy anywhere), or
        # ``prompt``, one string object every child of the spawn shares in memory. ``prompt_tail``
        # is the child's own ``<Thread>i:``. The model sees prompt + prompt_tail + text.
        head = {"prompt_ref": prompt_ref} if prompt_ref is not None else {"prompt": prompt or ""}
        return {
            "id": cid, "run": run, "depth": depth, **head, "prompt_tail": prompt_tail,
            "text": "", "label": label,
            "deadline": deadline, "deadline_kind": deadline_kind,
            "spawn_ok": depth < self.config.max_depth, "spawns": 0, "end": None,
            "pending_tools": [], "pending_spawn": None,
            "budget_seed": budget_seed,  # branches of the run already started when this one was (resume)
            "rec": new_record(cid, parent=parent, depth=depth, label=label, outline=outline),
        }

    # -- nodes ---------------------------------------------------------------
    async def prepare(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        """The root's setup: render the conversation (neutralised) into the root prompt."""
        messages = [neutralized_message(m) for m in state.get("messages", [])]
        if not messages:
            raise ValueError("apr agent needs at least one message in state['messages']")
        prompt = self.backend.render(messages, self.tool_schemas)
        if not isinstance(prompt, str):
            raise TypeError(f"{type(self.backend).__name__}.render() must return the prompt as str, "
                            f"not {type(prompt).__name__}")
        run = uuid.uuid4().hex
        deadline = time.time() + self.config.run_timeout_s if self.config.run_timeout_s else None
        ctx = self._new_context(cid="root", run=run, depth=0, prompt=prompt, label=None, outline=None,
                                parent=None, deadline=deadline,
                                deadline_kind="run_timeout_s" if deadline else None)
        trace = {"version": 1, "run_id": run, "dialect": self.dialect.name,
                 "config": self.config.model_dump(), "tools": sorted(self.tools), "contexts": {"root": ctx["rec"]},
                 "limits": [], "repairs": []}
        return {"apr": ctx, "apr_trace": Overwrite(trace), "apr_branch_results": Overwrite([])}

    async def generate(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = _copy_ctx(state["apr"])
        limits: list[dict[str, Any]] = []
        repairs: list[dict[str, Any]] = []
        spawned: list[list[str]] = []
        cfg = self.config
        base = await self._base_prompt(ctx)
        token = route_key.set(ctx["run"])
        try:
            while True:
                if ctx["rec"]["calls"] >= cfg.max_steps:
                    limits.append(self._limit(ctx, "max_steps", f"{cfg.max_steps} backend calls"))
                    ctx["end"] = "max_steps"
                    break
                left = cfg.max_tokens - ctx["rec"]["completion_tokens"]
                if left <= 0:
                    limits.append(self._limit(ctx, "max_tokens", f"{cfg.max_tokens} tokens"))
                    ctx["end"], ctx["rec"]["truncated"] = "max_tokens", True
                    break
                if ctx["deadline"] is not None and time.time() >= ctx["deadline"]:
                    limits.append(self._limit(ctx, ctx["deadline_kind"], "deadline passed"))
                    ctx["end"], ctx["rec"]["truncated"] = "timeout", True
                    break
                own = self._parser_of(ctx)  # holds the whole context text
                # The spawn marker is a stop wherever spawning is allowed, even with a block still open
                # (Multiverse leaves it open for the model's <Conclusion>): the parser decides below.
                stops = self.dialect.stops(branch=ctx["depth"] > 0, can_spawn=ctx["spawn_ok"])
                comp, timed_out = await self._complete(ctx, _prompt_of(ctx, base), stops, left)
                self._account(ctx, comp)
                ctx["text"] += comp.text
                events = self._feed(own, ctx, comp.text)  # the whole context text, stop excluded
                if ctx["depth"] >= cfg.max_depth and any(  # a spawn written past max_depth runs inline
                        isinstance(ev, Spawn) for ev in events):
                    limits.append(self._limit(ctx, "max_depth", f"spawn at depth {ctx['depth']} written inline"))
                if timed_out:
                    limits.append(self._limit(ctx, ctx["deadline_kind"] or "thread_timeout_s",
                                              "deadline passed during generation"))
                    ctx["end"], ctx["rec"]["truncated"] = "timeout", True
                    break
                if comp.stop is None:
                    if comp.finish_reason == "length":
                        limits.append(self._limit(ctx, "max_tokens", f"{cfg.max_tokens} tokens"))
                        ctx["end"], ctx["rec"]["truncated"] = "max_tokens", True
                    else:
                        ctx["end"] = "eos"
                    break
                if own.in_tool_call and comp.stop != TOOL_CALL_CLOSE:
                    # a stop string inside an open tool call's arguments is data: write it, go on
                    ctx["text"] += comp.stop
                    self._feed(own, ctx, comp.stop)
                    continue
                if comp.stop == self.dialect.thread_close and ctx["depth"] > 0:
                    if own.depth == 0:  # not the close of a block the branch writes inline
                        ctx["end"] = "thread_end"
                        break
                ctx["text"] += comp.stop
                closed = self._feed(own, ctx, comp.stop)  # what the stop string itself closed
                if comp.stop == TOOL_CALL_CLOSE:
                    calls = self._tool_calls_of([*events, *closed], repairs, ctx)
                    if calls:
                        ctx["pending_tools"] = calls
                        break
                    continue
                if comp.stop == self.dialect.spawn_marker and ctx["spawn_ok"]:
                    # fork only on the spawn this marker closed, at the top level of the context:
                    # never on one the parser repaired earlier in the completion
                    spawn_ev = next((ev for ev in closed if isinstance(ev, Spawn) and ev.depth == 1), None)
                    if spawn_ev is not None:
                        repairs.extend({"ctx": ctx["id"], "kind": ev.kind, "detail": ev.detail}
                                       for ev in [*events, *closed] if isinstance(ev, Repair))
                        spawn = self._plan_spawn(ctx, spawn_ev, limits, repairs, state.get("apr_trace"), base)
                        if spawn is not None:
                            await self._share_prefix(ctx, spawn)
                            ctx["pending_spawn"] = spawn
                            spawned.append([c["cid"] for c in spawn["children"]])
                            break
                    continue
                # any other stop (an inner close of an inline block): keep writing
        except BaseException:  # a failed or cancelled step: its parse is not needed again
            self._drop_parser((ctx["run"], ctx["id"]))
            raise
        finally:
            route_key.reset(token)
        if ctx["end"] is not None:
            ctx["rec"]["end"] = ctx["end"]
            self._drop_parser((ctx["run"], ctx["id"]))
        return {"apr": ctx, "apr_trace": self._trace(ctx, spawns=spawned, limits=limits, repairs=repairs)}

    # -- a spawn's prefix, stored once (graph/prefixes.py) ------------------------------
    async def _share_prefix(self, ctx: dict[str, Any], spawn: dict[str, Any]) -> None:
        """With a store, the children's specs carry the prefix's key instead of the text."""
        children = spawn["children"]
        ref = await self.prefixes.share(ctx["run"], children[0]["prompt"]) if children else None
        if ref is not None:
            for child in children:
                del child["prompt"]
                child["prompt_ref"] = ref

    async def _base_prompt(self, ctx: dict[str, Any]) -> str:
        """The prompt a context continues: its own, or its parent's prefix by reference."""
        if "prompt" in ctx:
            return str(ctx["prompt"])
        try:
            return str(await self.prefixes.get(ctx["run"], ctx["prompt_ref"], _where(ctx) + ")"))
        except PrefixMissing as exc:
            raise APRBackendError(str(exc)) from exc

    # -- what the backend's prompt format decides ---------------------------------
    def _tool_results_text(self, results: list[str], depth: int) -> str:
        """Tool results as the model reads them: the backend's layout (its chat template's), else inline."""
        layout = getattr(self.backend, "tool_results_text", None)
        if callable(layout):
            return str(layout(results, depth=depth))
        return "".join(f"\n<tool_response>{text}</tool_response>" for text in results) + "\n"

    def _answer_text(self, text: str) -> str:
        clean = getattr(self.backend, "answer_text", None)
        return str(clean(text)) if callable(clean) else text

    # -- the context's own parse, kept between steps -----------------------------
    def _parser_of(self, ctx: dict[str, Any]) -> StreamParser:
        """A parser that has consumed exactly ``ctx["text"]``.

        Kept in memory between the steps of a context, so each step feeds only what was added
        since (its model text, tool responses, merged threads) instead of the whole context
        again. A miss (a resumed run, another process, a text that is not a continuation of the
        one parsed) parses the whole text, which is always correct.
        """
        key = (ctx["run"], ctx["id"])
        hit = self._drop_parser(key)
        text = ctx["text"]
        if hit is not None and text.startswith(hit[1]):
            parser, seen = hit
            parser.feed(text[len(seen):])
        else:
            parser = StreamParser(self.dialect, max_outlines=self.config.max_threads + 1)
            parser.feed(text)
        self._keep_parser(key, parser, text)
        return parser

    def _feed(self, parser: StreamParser, ctx: dict[str, Any], piece: str) -> list[Any]:
        """Feed ``piece``, the end of ``ctx["text"]``, and remember that the parser has seen it."""
        events = parser.feed(piece)
        key = (ctx["run"], ctx["id"])
        self._drop_parser(key)
        self._keep_parser(key, parser, ctx["text"])
        return events

    def _keep_parser(self, key: tuple[str, str], parser: StreamParser, text: str) -> None:
        """Cache a context's parse; evict the least recently used past ``parser_cache_chars``."""
        self._parsers[key] = (parser, text)
        self._parser_chars += len(text)
        while self._parser_chars > self.parser_cache_chars and len(self._parsers) > 1:
            _, (_, old) = self._parsers.popitem(last=False)  # contexts of abandoned runs first
            self._parser_chars -= len(old)

    def _drop_parser(self, key: tuple[str, str]) -> tuple[StreamParser, str] | None:
        hit = self._parsers.pop(key, None)
        if hit is not None:
            self._parser_chars -= len(hit[1])
        return hit

    async def _complete(self, ctx: dict[str, Any], prompt: str, stops: list[str],
                        max_tokens: int) -> tuple[Completion, bool]:
        """One backend call with retries; returns (completion, deadline_hit)."""
        cfg = self.config
        last: BaseException | None = None
        for attempt in range(cfg.backend_attempts):
            pieces: list[str] = []
            try:
                async with self.limiter.llm():
                    # the deadline is read after the wait for a slot: a branch queued behind
                    # llm_concurrency others must not get a full budget from before it waited
                    timeout = cfg.backend_timeout_s
                    if ctx["deadline"] is not None:
                        rem = max(0.0, ctx["deadline"] - time.time())
                        timeout = rem if timeout is None else min(timeout, rem)
                    async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                        return await self._call(ctx, prompt, stops, max_tokens, pieces), False
            except TimeoutError as exc:
                if ctx["deadline"] is not None and time.time() >= ctx["deadline"] - 1e-3:
                    text = "".join(pieces)
                    return Completion(text=text, stop=None, finish_reason="abort",
                                      completion_tokens=len(pieces)), True
                last = exc
            except BackendRequestError as exc:  # the same request fails the same way: never retried
                raise APRBackendError(
                    f"backend {type(self.backend).__name__} refused the request in {_where(ctx)}); not "
                    f"retried, it cannot succeed as sent: {exc}. Give the model a larger context (n_ctx / "
                    f"max_model_len), lower APRConfig.max_tokens ({cfg.max_tokens}) or shorten the "
                    "conversation and tool outputs (max_tool_output_chars)."
                ) from exc
            except BackendError as exc:
                last = exc
            except (OSError, ConnectionError, ValueError) as exc:
                last = exc
            except Exception as exc:  # a bug in the adapter: not retried, but say where it happened
                raise APRBackendError(f"backend {type(self.backend).__name__} raised in {_where(ctx)}): "
                                      f"{type(exc).__name__}: {exc}") from exc
            if attempt + 1 < cfg.backend_attempts:
                await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt) * (1 + random.random()))
        where = _where(ctx)
        raise APRBackendError(
            f"backend {type(self.backend).__name__} failed in {where}) after {cfg.backend_attempts} "
            f"attempts: {type(last).__name__}: {last}"
        ) from last

    async def _call(self, ctx: dict[str, Any], prompt: str, stops: list[str], max_tokens: int,
                    pieces: list[str]) -> Completion:
        stream = getattr(self.backend, "stream", None)
        if stream is None:
            return await self.backend.complete(prompt, stop=stops, max_tokens=max_tokens,
                                               temperature=self.config.temperature)
        final: Completion | None = None
        async for item in stream(prompt, stop=stops, max_tokens=max_tokens,
                                 temperature=self.config.temperature):
            if isinstance(item, str):
                pieces.append(item)
                _emit({"apr": "token", "ctx": ctx["id"], "text": item})
            else:
                final = item
        if final is None:
            raise BackendError("stream ended without a completion")
        return final

    def _account(self, ctx: dict[str, Any], comp: Completion) -> None:
        rec = ctx["rec"]
        rec["calls"] += 1
        rec["prompt_tokens"] += comp.prompt_tokens
        rec["completion_tokens"] += comp.completion_tokens
        rec["cached_prompt_tokens"] += comp.cached_prompt_tokens or 0

    def _tool_calls_of(self, events: list[Any], repairs: list[dict[str, Any]],
                       ctx: dict[str, Any]) -> list[dict[str, Any]]:
        """The calls the parser closed in this step (a call may have opened in an earlier piece)."""
        calls = [{"name": ev.name, "arguments": ev.arguments, "raw": ev.raw, "error": ev.error}
                 for ev in events if isinstance(ev, ToolCall)][: self.config.max_tool_calls_per_step]
        if not calls:
            repairs.append({"ctx": ctx["id"], "kind": "stray_close", "detail": TOOL_CALL_CLOSE})
        return calls

    def _plan_spawn(self, ctx: dict[str, Any], spawn_ev: Spawn, limits: list[dict[str, Any]],
                    repairs: list[dict[str, Any]], trace: dict[str, Any] | None = None,
                    base: str | None = None) -> dict[str, Any] | None:
        """Turn the outlines the model just closed into children, within the run's limits."""
        cfg = self.config
        outlines = list(spawn_ev.outlines)
        if not outlines:
            repairs.append({"ctx": ctx["id"], "kind": "empty_spawn", "detail": "no outlines before the spawn point"})
            ctx["text"] += self.dialect.spawn_suffix()
            return None
        if len(outlines) > cfg.max_threads:
            limits.append(self._limit(ctx, "max_threads",
                                      f"more than {cfg.max_threads} outlines; kept the first {cfg.max_threads}"))
            outlines = outlines[: cfg.max_threads]
        # After a restart the in-process budget is empty: seed it from what the checkpointed state knows.
        seed = ctx.get("budget_seed", 0) + _spawned_in(trace, ctx)
        got = self.budget.reserve(ctx["run"], len(outlines), cfg.max_total_threads, seed=seed)
        if got < len(outlines):
            limits.append(self._limit(ctx, "max_total_threads",
                                      f"{cfg.max_total_threads} branches per run; {got} of {len(outlines)} run"))
            if got == 0:
                ctx["spawn_ok"] = False  # the model writes the block itself from here on
                ctx["text"] += self.dialect.spawn_suffix()
                return None
            outlines = outlines[:got]
        ctx["text"] += self.dialect.spawn_suffix()
        ctx["spawns"] += 1
        prefix = _prompt_of(ctx, base)  # one string every child refers to in memory
        now = time.time()
        children = []
        for i, o in enumerate(outlines):
            cid = f"{ctx['id']}/{ctx['spawns']}.{o.label}"
            deadline, kind = now + cfg.thread_timeout_s, "thread_timeout_s"
            if ctx["deadline"] is not None and ctx["deadline"] < deadline:
                deadline, kind = ctx["deadline"], ctx["deadline_kind"]
            children.append({
                "cid": cid, "run": ctx["run"], "depth": ctx["depth"] + 1,
                "prompt": prefix, "prompt_tail": self.dialect.branch_suffix(o.label), "label": o.label,
                "outline": o.text, "parent": ctx["id"], "deadline": deadline, "deadline_kind": kind,
                "index": i, "budget_seed": self.budget.used(ctx["run"]),
            })
        _emit({"apr": "spawn", "ctx": ctx["id"], "outlines": [[o.label, o.text] for o in outlines]})
        return {"children": children, "spawn_no": ctx["spawns"]}

    async def tools_node(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = _copy_ctx(state["apr"])
        calls = [ToolCall(c["name"], c["arguments"], c["raw"], c["error"]) for c in ctx["pending_tools"]]
        results = await run_tool_calls(calls, self.tools, self.limiter, self.config,
                                       deadline=ctx["deadline"], emit=_emit, ctx_id=ctx["id"])
        ctx["text"] += self._tool_results_text([text for text, _ in results], ctx["depth"])
        ctx["pending_tools"] = []
        return {"apr": ctx, "apr_trace": self._trace(ctx, tool_calls=[rec for _, rec in results])}

    async def merge(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = _copy_ctx(state["apr"])
        spawn = ctx["pending_spawn"] or {"children": []}
        wanted = {c["cid"] for c in spawn["children"]}
        results = sorted((r for r in state.get("apr_branch_results", []) if r["id"] in wanted),
                         key=lambda r: r["index"])
        if self.merge_strategy is not None:
            merged = self.merge_strategy(results, self.dialect)
        else:
            merged = self.dialect.merge_text([(r["label"], r["text"]) for r in results])
        ctx["text"] += merged
        ctx["pending_spawn"] = None
        _emit({"apr": "merge", "ctx": ctx["id"], "children": [r["id"] for r in results]})
        return {"apr": ctx, "apr_branch_results": Overwrite([]), "apr_trace": self._trace(ctx)}

    async def finalize(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = _copy_ctx(state["apr"])
        ctx["rec"]["ended"] = time.time()
        ctx["rec"]["end"] = ctx["end"]
        ctx["rec"]["text"] = ctx["text"]
        if ctx["depth"] > 0:
            _emit({"apr": "branch_end", "ctx": ctx["id"], "end": ctx["end"],
                   "tokens": ctx["rec"]["completion_tokens"]})
            return {"apr": ctx, "apr_trace": self._trace(ctx)}
        if ctx["id"] == "root":
            self.budget.release_run(ctx["run"])
            await self.prefixes.forget(ctx["run"])
        summary = summarize(merge_traces(state.get("apr_trace", {}), self._trace(ctx)))
        answer = self._answer_text(final_answer(ctx["text"], self.dialect)) or (
            f"[apr-agents: the model wrote no answer; the root context ended with {ctx['end']!r}]")
        msg = AIMessage(content=answer, response_metadata={"apr_end": ctx["end"], "apr_run_id": ctx["run"]})
        return {"apr": ctx, "messages": [msg],
                "apr_trace": {"contexts": {"root": ctx["rec"]}, "summary": summary, "transcript": ctx["text"]}}

    # -- routing -------------------------------------------------------------
    def route(self, state: APRState) -> str | list[Send]:
        ctx = state["apr"]
        if ctx.get("pending_tools"):
            return "tools"
        spawn = ctx.get("pending_spawn")
        if spawn:
            children = spawn["children"]
            if self.config.parallel:
                return [Send("branch", {"children": [c]}) for c in children]
            return [Send("branch", {"children": children})]
        return "finalize"


def _where(ctx: dict[str, Any]) -> str:
    where = f"context {ctx['id']!r} (depth {ctx['depth']}"
    if ctx["rec"].get("outline"):
        where += f", outline {ctx['rec']['outline'][:60]!r}"
    return where


def _prompt_of(ctx: dict[str, Any], base: str | None = None) -> str:
    """What the model continues: the (shared) prompt, the branch's own head, its text so far."""
    return (ctx["prompt"] if base is None else base) + ctx.get("prompt_tail", "") + ctx["text"]


def _copy_ctx(ctx: dict[str, Any]) -> dict[str, Any]:
    out = dict(ctx)
    out["rec"] = dict(ctx["rec"])
    return out


def _spawned_in(trace: dict[str, Any] | None, ctx: dict[str, Any]) -> int:
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


async def _gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """All results, or the first error with the others cancelled (as a failing superstep does)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _neutral(value: Any) -> Any:
    """Protocol markers made inert in every string of a JSON-like value (dict keys included)."""
    if isinstance(value, str):
        return neutralize(value)
    if isinstance(value, dict):
        return {_neutral(k) if isinstance(k, str) else k: _neutral(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_neutral(v) for v in value]
    return value


def neutralized_message(m: BaseMessage) -> BaseMessage:
    """A message whose data cannot steer the protocol (SPEC §2.7).

    User, assistant and tool messages: string content, every text of list-of-blocks content
    (what LangGraph Studio and chat UIs send) and an assistant message's tool-call names and
    arguments. System messages are the deployer's own instructions and pass unchanged.
    """
    if isinstance(m, SystemMessage):
        return m
    update: dict[str, Any] = {"content": _neutral(m.content)}
    if isinstance(m, AIMessage):
        update["tool_calls"] = [{**c, "name": neutralize(c["name"]), "args": _neutral(c["args"])}
                                for c in m.tool_calls]
        update["invalid_tool_calls"] = [_neutral(dict(c)) for c in m.invalid_tool_calls]
    return m.model_copy(update=update)


def create_apr_agent(
    backend: Any,
    tools: Sequence[BaseTool] = (),
    config: APRConfig | None = None,
    *,
    checkpointer: BaseCheckpointSaver | Literal[False] | None = None,
    store: BaseStore | None = None,
    name: str = "apr_agent",
    merge_strategy: MergeStrategy | None = None,
) -> CompiledStateGraph:
    """Build the APR agent: a compiled LangGraph graph whose model spawns parallel branches.

    Usable on its own or as a node of any ``MessagesState`` graph; its input is ``messages``,
    and it appends one ``AIMessage`` (the answer) and leaves the run's trace in ``apr_trace``.

    Args:
        backend: a text-completion backend (``LlamaCppBackend``, ``VLLMBackend``,
            ``OpenAICompatibleBackend``, ``default_backend()``, anything with the ``Backend``
            protocol): the model writes the protocol's spawn blocks in its text. Or a LangChain
            chat model with tool calling: the model spawns through a ``spawn`` tool call.
        tools: LangChain tools every context may call (concurrently within a step).
        config: limits and behaviour (``APRConfig``); defaults if omitted.
        checkpointer: a LangGraph checkpointer for durable runs (each branch is then a
            checkpointed subgraph run that resumes where it stopped).
        store: a LangGraph store. With a checkpointer, a spawn's shared prefix is written to it
            once, and the branches' checkpoints hold its key instead of a copy each. A LangGraph
            server passes its own store.
        name: the graph's name.
        merge_strategy: how branch results are folded into the parent (default: the
            dialect's ``<Thread>`` blocks in outline order).

    Returns:
        The compiled graph (``invoke``/``ainvoke``/``stream``/``astream`` as any LangGraph graph).

    Example::

        from langchain_core.messages import HumanMessage
        from apr_agents import APRConfig, create_apr_agent, default_backend
        from tools.calculator import calculator

        graph = create_apr_agent(default_backend(), [calculator], APRConfig(max_threads=4))
        state = graph.invoke({"messages": [HumanMessage("What is 17*23 + 4*9?")]})
        print(state["messages"][-1].content)
    """
    from langchain_core.language_models import BaseChatModel

    if isinstance(backend, BaseChatModel):  # tool-call mode: spawn through a `spawn` tool call
        from .chat import create_chat_apr_agent

        return create_chat_apr_agent(backend, tools, config, checkpointer=checkpointer, store=store,
                                     name=name, merge_strategy=merge_strategy)
    check_backend(backend)
    config, tools = checked_config_and_tools(config, tools)
    agent = _Agent(backend, tools, config, merge_strategy)

    routes = {"generate": (agent.route, ["tools", "branch", "finalize"]), "tools": "generate"}
    return compile_agent(agent, routes, checkpointer=checkpointer, store=store, name=name)

