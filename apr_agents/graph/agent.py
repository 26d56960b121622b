"""``create_apr_agent`` and the text mode: the model writes the spawn protocol in its text.

One graph serves the root and every branch. A context loops
``generate -> tools -> generate`` until its model stops at a spawn point; then
each outline becomes a ``Send`` to the ``branch`` node, which runs the same
graph again for that branch (a subgraph run with its own checkpoints, or the
same nodes called inline: ``APRConfig.branch_runs``). When
all branches of the spawn are back, ``merge`` folds them into the parent's text
in outline order and the parent goes on generating. What both modes share (the
branch node, the retry policy) is in ``core.py``; the graph's wiring in ``build.py``.

Usage::

    from langchain_core.messages import HumanMessage
    from apr_agents import APRConfig, create_apr_agent, default_backend

    graph = create_apr_agent(default_backend(), tools, APRConfig(max_threads=4))
    answer = graph.invoke({"messages": [HumanMessage("...")]})["messages"][-1].content
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Overwrite, Send

from ..backends.base import BackendError, Completion, check_backend, check_dialect, route_key
from ..config import APRConfig
from ..protocol.dialects import TOOL_CALL_CLOSE, Dialect, get_dialect
from ..protocol.document import parse_document
from ..protocol.parser import Repair, Spawn, StreamParser, ToolCall
from ..protocol.parser_cache import ParserCache
from ..runtime.limits import Limiter, ThreadBudget
from ..runtime.tool_exec import run_tool_calls
from ..runtime.trace import merge_traces, new_record, summarize
from .build import checked_config_and_tools, compile_agent
from .core import BranchRunner, call_with_retries, copy_ctx, emit, model_call, prompt_of, spawned_in, where
from .eager import EagerSpawn
from .inputs import neutralized_message
from .prefixes import SharedPrefixes
from .state import APRState

MergeStrategy = Callable[[list[dict[str, Any]], Dialect], str]


def final_answer(text: str, dialect: Dialect) -> str:
    """The root text after the last protocol block (SPEC §2.8)."""
    doc = parse_document(text, dialect)
    return doc.final_text or doc.last_text


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
        # checkpointed as deltas: the context text (apr_text) and, once per context, its prompt
        self.delta_fields = ({"text": "apr_text"}, {"prompt": "apr_prompt"})
        self.parsers = ParserCache(lambda: StreamParser(self.dialect, max_outlines=config.max_threads + 1))
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
        ctx = copy_ctx(state["apr"])
        limits: list[dict[str, Any]] = []
        repairs: list[dict[str, Any]] = []
        spawned: list[list[str]] = []
        timed: list[dict[str, Any]] = []  # this step's model calls, for the trace
        cfg = self.config
        base = await self._base_prompt(ctx)
        eager: EagerSpawn | None = None  # spawn_at="outline": branches started as their outlines close
        folded: list[dict[str, Any]] = []  # traces of eager branches merged in this step
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
                if cfg.spawn_at == "outline" and ctx["spawn_ok"]:
                    stops.append(self.dialect.outline_close)
                started = time.time()
                comp, timed_out = await self._complete(ctx, prompt_of(ctx, base), stops, left)
                self._account(ctx, comp)
                timed.append(model_call(started, prompt_tokens=comp.prompt_tokens,
                                        completion_tokens=comp.completion_tokens,
                                        cached_prompt_tokens=comp.cached_prompt_tokens or 0,
                                        engine=(comp.engine_started, comp.engine_ended)))
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
                if comp.stop == self.dialect.outline_close and cfg.spawn_at == "outline" and ctx["spawn_ok"]:
                    eager = eager or EagerSpawn(self, ctx, base, state.get("apr_trace"), config)
                    eager.start(own.closed_outlines(), limits)  # branch i starts now; the model goes on
                    continue
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
                    if spawn_ev is not None and cfg.spawn_at == "outline":
                        eager = eager or EagerSpawn(self, ctx, base, state.get("apr_trace"), config)
                        eager.start([(o.label, o.text) for o in spawn_ev.outlines], limits)
                        done = await eager.finish()
                        eager = None
                        if done is not None:
                            cids, trace = done
                            spawned.append(cids)
                            folded.append(trace)
                        continue
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
            self.parsers.drop((ctx["run"], ctx["id"]))
            if eager is not None:
                await eager.cancel()
            raise
        finally:
            route_key.reset(token)
        if ctx["end"] is not None:
            ctx["rec"]["end"] = ctx["end"]
            self.parsers.drop((ctx["run"], ctx["id"]))
        trace = self._trace(ctx, spawns=spawned, model_calls=timed, limits=limits, repairs=repairs)
        for branch_trace in folded:
            trace = merge_traces(branch_trace, trace)
        return {"apr": ctx, "apr_trace": trace}

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
        return str(await self.prefixes.get(ctx["run"], ctx["prompt_ref"], where(ctx) + ")"))

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
        """A parser that has consumed exactly ``ctx["text"]`` (kept between the context's steps)."""
        return self.parsers.parser_of((ctx["run"], ctx["id"]), ctx["text"])

    def _feed(self, parser: StreamParser, ctx: dict[str, Any], piece: str) -> list[Any]:
        """Feed ``piece``, the end of ``ctx["text"]``, and remember that the parser has seen it."""
        return self.parsers.feed((ctx["run"], ctx["id"]), parser, ctx["text"], piece)

    async def _complete(self, ctx: dict[str, Any], prompt: str, stops: list[str],
                        max_tokens: int) -> tuple[Completion, bool]:
        """One backend call under the shared retry policy; returns (completion, deadline_hit)."""
        pieces: list[str] = []

        def attempt() -> Coroutine[Any, Any, Completion]:
            pieces.clear()  # what this attempt streamed, kept if the deadline cuts it
            return self._call(ctx, prompt, stops, max_tokens, pieces)

        comp = await call_with_retries(ctx, self.config, self.limiter, attempt,
                                       what=f"backend {type(self.backend).__name__}")
        if comp is None:
            return Completion(text="".join(pieces), stop=None, finish_reason="abort",
                              completion_tokens=len(pieces)), True
        return comp, False

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
                emit({"apr": "token", "ctx": ctx["id"], "text": item})
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
        seed = ctx.get("budget_seed", 0) + spawned_in(trace, ctx)
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
        prefix = prompt_of(ctx, base)  # one string every child refers to in memory
        children = [self.child_spec(ctx, ctx["spawns"], i, o.label, o.text, prefix, self.dialect.branch_suffix(o.label))
                    for i, o in enumerate(outlines)]
        emit({"apr": "spawn", "ctx": ctx["id"], "outlines": [[o.label, o.text] for o in outlines]})
        return {"children": children, "spawn_no": ctx["spawns"]}

    def child_spec(self, ctx: dict[str, Any], spawn_no: int, index: int, label: str, outline: str, prefix: str,
                   tail: str) -> dict[str, Any]:
        """One branch's spec: its id, its prompt (the shared prefix and its own head), its deadline."""
        deadline, kind = time.time() + self.config.thread_timeout_s, "thread_timeout_s"
        if ctx["deadline"] is not None and ctx["deadline"] < deadline:
            deadline, kind = ctx["deadline"], ctx["deadline_kind"]
        return {"cid": f"{ctx['id']}/{spawn_no}.{label}", "run": ctx["run"], "depth": ctx["depth"] + 1,
                "prompt": prefix, "prompt_tail": tail, "label": label, "outline": outline, "parent": ctx["id"],
                "deadline": deadline, "deadline_kind": kind, "index": index,
                "budget_seed": self.budget.used(ctx["run"])}

    async def tools_node(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = copy_ctx(state["apr"])
        calls = [ToolCall(c["name"], c["arguments"], c["raw"], c["error"]) for c in ctx["pending_tools"]]
        results = await run_tool_calls(calls, self.tools, self.limiter, self.config,
                                       deadline=ctx["deadline"], emit=emit, ctx_id=ctx["id"])
        ctx["text"] += self._tool_results_text([text for text, _ in results], ctx["depth"])
        ctx["pending_tools"] = []
        return {"apr": ctx, "apr_trace": self._trace(ctx, tool_calls=[rec for _, rec in results])}

    async def merge(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = copy_ctx(state["apr"])
        spawn = ctx["pending_spawn"] or {"children": []}
        wanted = {c["cid"] for c in spawn["children"]}
        results = sorted((r for r in state.get("apr_branch_results", []) if r["id"] in wanted),
                         key=lambda r: r["index"])
        ctx["text"] += self.merged_text(results)
        ctx["pending_spawn"] = None
        emit({"apr": "merge", "ctx": ctx["id"], "children": [r["id"] for r in results]})
        return {"apr": ctx, "apr_branch_results": Overwrite([]), "apr_trace": self._trace(ctx)}

    def merged_text(self, results: list[dict[str, Any]]) -> str:
        """What a spawn's merge writes into the parent: the branches' threads, in outline order."""
        if self.merge_strategy is not None:
            return self.merge_strategy(results, self.dialect)
        return self.dialect.merge_text([(r["label"], r["text"]) for r in results])

    async def finalize(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = copy_ctx(state["apr"])
        ctx["rec"]["ended"] = time.time()
        ctx["rec"]["end"] = ctx["end"]
        ctx["rec"]["text"] = ctx["text"]
        if ctx["depth"] > 0:
            emit({"apr": "branch_end", "ctx": ctx["id"], "end": ctx["end"],
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
    check_dialect(backend, get_dialect(config.dialect))
    agent = _Agent(backend, tools, config, merge_strategy)

    routes = {"generate": (agent.route, ["tools", "branch", "finalize"]), "tools": "generate"}
    return compile_agent(agent, routes, checkpointer=checkpointer, store=store, name=name)

