"""How the APR graph is built: the node set both modes share, compiled on public LangGraph API.

``compile_agent(agent, routes, checkpointer=..., name=...)`` turns an agent object (text mode's
``_Agent`` in ``agent.py``, tool-call mode's ``_ChatAgent`` in ``chat.py``) into the compiled
graph the user gets (input ``messages`` only), and gives the agent's ``branch`` node the
same nodes and edges to run each branch along (``core.BranchRunner``). Also here: the node
wrapper (a plain public ``Runnable`` with a sync twin), the wrapper that checkpoints growing
context fields as deltas, the compiled graph class whose sync ``stream`` stops its work when
closed, and the construction-time checks of config and tools.

Usage (what ``create_apr_agent`` does)::

    agent = _Agent(backend, tools, config, None)
    routes = {"generate": (agent.route, ["tools", "branch", "finalize"]), "tools": "generate"}
    graph = compile_agent(agent, routes, checkpointer=None, name="apr_agent")
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Literal

from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Overwrite, Send

from ..config import APRConfig
from ..runtime.sync_loop import cancel_scope, run_sync
from ..runtime.trace import merge_traces
from .state import REDUCERS, APRInput, APROutput, APRState, apply_update


class _Node(Runnable[Any, Any]):
    """A graph node with an async function and its sync twin, so ``graph.invoke`` works too.

    A plain public ``Runnable`` calling ``func(state, config)``: ``RunnableLambda`` inspects
    signatures and opens a callback run on every call, which cost ~30% of a run in the
    overhead benchmark (docs/benchmarks/overhead.md). Pregel sets the config context
    (stream writer, config) around every task itself.
    """

    def __init__(self, func: Callable[[Any, RunnableConfig], Any],
                 afunc: Callable[[Any, RunnableConfig], Coroutine[Any, Any, Any]], name: str) -> None:
        self.func, self.afunc, self.name = func, afunc, name

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self.func(input, ensure_config(config))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self.afunc(input, ensure_config(config))


def _node(afunc: Callable[..., Any], sync: Callable[..., Any] | None = None, name: str = "") -> _Node:
    def default_sync(state: Any, config: RunnableConfig) -> Any:
        return run_sync(afunc(state, config))

    return _Node(sync or default_sync, afunc, name)


def checked_config_and_tools(config: APRConfig | None,
                             tools: Sequence[BaseTool]) -> tuple[APRConfig, list[BaseTool]]:
    """One clear error at construction for a bad config or tool list (both modes)."""
    config = config or APRConfig()
    if not isinstance(config, APRConfig):
        raise TypeError(f"config must be an APRConfig, not {type(config).__name__}")
    tools = list(tools)
    for t in tools:
        if not isinstance(t, BaseTool):
            raise TypeError(f"tools must be LangChain BaseTool objects (e.g. from @tool); got {t!r}")
    for t in tools:
        _check_tool_schema(t)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tool names: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return config, tools


def _check_tool_schema(t: BaseTool) -> None:
    """A tool whose argument schema the runtime cannot read fails here, not mid-run."""
    try:
        params = convert_to_openai_tool(t)["function"].get("parameters", {})
    except Exception as exc:
        raise ValueError(f"tool {t.name!r}: its argument schema cannot be read: {type(exc).__name__}: {exc}") from exc
    problem = None
    if not isinstance(params, dict):
        problem = "the schema is not a JSON object"
    elif not isinstance(params.get("properties", {}), dict):
        problem = "'properties' is not an object"
    elif not all(isinstance(v, dict) for v in params.get("properties", {}).values()):
        problem = "each property must be a JSON schema object"
    elif not isinstance(params.get("required", []), list) or not all(
            isinstance(r, str) for r in params.get("required", [])):
        problem = "'required' must be a list of property names"
    if problem:
        raise ValueError(f"tool {t.name!r} has a malformed argument schema: {problem}: {str(params)[:200]}")


def compile_agent(agent: Any, routes: dict[str, Any], *,
                  checkpointer: BaseCheckpointSaver | Literal[False] | None, name: str,
                  store: BaseStore | None = None) -> CompiledStateGraph:
    """The node set both modes share; ``routes`` gives the mode's edges out of generate and tools.

    A route is a node name or ``(function, targets)`` for a conditional edge; the generate
    route may answer ``"finalize"``. The same table (``agent.flow``) drives the graph and
    each branch (``core.BranchRunner``), which runs ``agent.nodes``: the same node functions,
    with the same delta-shaped updates.

    Fewer supersteps, fewer checkpoints: a branch's setup runs in its first ``generate``
    step (the root keeps a ``prepare`` node: it starts each new question), and a context
    that ends is closed in the ``generate`` step that ended it.
    """
    route_generate, targets = routes["generate"]

    async def generate(state: APRState, config: RunnableConfig, *, branch: bool) -> dict[str, Any]:
        update: dict[str, Any] = {}
        if branch and state.get("apr_spawn_input"):  # a branch's first step: set its context up
            update = agent._start_branch(state["apr_spawn_input"])
            state = _applied(state, update)
        step = await agent.generate(state, config)
        state = _applied(state, step)
        update = _combined(update, step)
        if route_generate(state) == "finalize":
            update = _combined(update, await agent.finalize(state, config))
        return update

    async def generate_root(state: APRState, config: RunnableConfig) -> dict[str, Any]:
        return await generate(state, config, branch=False)

    async def generate_branch(state: APRState, config: RunnableConfig) -> dict[str, Any]:
        return await generate(state, config, branch=True)

    def after_generate(state: APRState) -> str | list[Send]:
        nxt = route_generate(state)
        return END if nxt == "finalize" else nxt

    agent.flow = {
        "prepare": "generate",
        "generate": (after_generate, [t for t in targets if t != "finalize"] + [END]),
        **{k: v for k, v in routes.items() if k != "generate"},
        "branch": "merge",
        "merge": "generate",
    }
    grows, once = getattr(agent, "delta_fields", ({}, {}))

    def wrap(afunc: Callable[..., Any]) -> Callable[..., Any]:
        return _as_deltas(afunc, grows, once) if grows or once else afunc

    # A branch runs these nodes along ``flow`` (core.BranchRunner), with the same delta-shaped
    # updates the graph checkpoints; the root's generate never reads a spawn spec, so nothing a
    # caller puts in the state can make the root a branch.
    agent.nodes = {"generate": wrap(generate_branch), "tools": wrap(agent.tools_node), "merge": wrap(agent.merge)}
    agent.make_tasks()
    g = StateGraph(APRState, input_schema=APRInput, output_schema=APROutput)
    nodes = {"prepare": agent.prepare, "generate": generate_root, "tools": agent.tools_node, "merge": agent.merge}
    for node, afunc in nodes.items():
        g.add_node(node, _node(wrap(afunc), name=node))
    g.add_node("branch", _node(agent.branch, agent.branch_sync, name="branch"))
    g.add_edge(START, "prepare")
    for node, nxt in agent.flow.items():
        if isinstance(nxt, tuple):
            g.add_conditional_edges(node, nxt[0], nxt[1])
        else:
            g.add_edge(node, nxt)
    graph = g.compile(checkpointer=checkpointer, store=store, name=name)
    graph.__class__ = APRCompiledGraph
    graph.sync_workers = 2 * agent.config.max_total_threads + 8  # each live branch: its node and its step
    return graph


def _as_deltas(afunc: Callable[[Any, RunnableConfig], Coroutine[Any, Any, dict[str, Any]]],
               grows: dict[str, str], once: dict[str, str],
               ) -> Callable[[Any, RunnableConfig], Coroutine[Any, Any, dict[str, Any]]]:
    """A node whose growing context fields travel in ``DeltaChannel``s instead of ``apr``.

    ``grows`` maps a context field that steps only append to (text mode's ``text``, tool-call
    mode's ``messages``) to its channel; ``once`` maps a field set when a context starts and
    never changed (text mode's ``prompt``) to its channel. The node still sees the whole
    context; what it returns is split: ``apr`` without those fields, each growing channel gets
    only what the step appended (``Overwrite`` when a context starts), and each ``once``
    channel is written only when a context starts. So a checkpoint stores each step's delta,
    never the whole text or prompt again (docs/checkpointing.md, "Storage bounds").
    """
    fields = {**grows, **once}

    async def run(state: Any, config: RunnableConfig) -> dict[str, Any]:
        ctx = state.get("apr")
        before: dict[str, Any] = {}
        if ctx is not None:
            # an unwritten DeltaChannel reads as its type's empty value: a ``once`` field that was
            # never written (a branch whose prompt is a reference) is not there, not ""
            before = {f: ctx[f] if f in ctx else state[ch] for f, ch in fields.items()
                      if f in ctx or (ch in state and (f in grows or state[ch]))}
            state = {**state, "apr": {**ctx, **before}}
        update = await afunc(state, config)
        new = update.get("apr")
        if new is None or not any(f in new for f in fields):
            return update
        update = {**update, "apr": {k: v for k, v in new.items() if k not in fields}}
        same = ctx is not None and new.get("id") == ctx.get("id")
        for f, ch in grows.items():
            if f not in new:
                continue
            added = _appended(before.get(f), new[f]) if same else None
            if added is None:  # a new context (a run's root, a branch's first step)
                update[ch] = Overwrite(new[f])
            elif len(added):
                update[ch] = added
        for f, ch in once.items():
            if f in new and not (same and new[f] is before.get(f)):
                update[ch] = Overwrite(new[f])
        return update

    return run


def _appended(old: Any, new: Any) -> Any:
    """What ``new`` adds at the end of ``old`` (a str or list), or ``None`` if it is not an extension."""
    if old is None or len(new) < len(old):
        return None
    if isinstance(new, str):
        return new[len(old):] if new.startswith(old) else None
    if all(a is b or a == b for a, b in zip(new, old, strict=False)):
        # a tuple: LangGraph turns message-shaped dicts in a list written to a DeltaChannel into
        # messages; the context's messages are stored as ``message_to_dict`` dicts, kept as they are
        return tuple(new[len(old):])
    return None


class APRCompiledGraph(CompiledStateGraph):
    """LangGraph's compiled graph, whose sync ``stream`` (and so ``invoke``) stops its work when
    left early: closing the generator (or an exception in the consumer) cancels every branch,
    tool and model call the run started (``runtime.sync_loop.cancel_scope``), as leaving
    ``astream`` does.

    In a checkpointed sync run a live branch holds one of LangGraph's worker threads while its
    current step (a task) runs in another, so unless the caller sets ``max_concurrency`` the pool
    is sized for the run's branch budget (``sync_workers``) instead of Python's default of
    ``cpu_count + 4``, which a wide spawn would exhaust. Everything else is
    ``CompiledStateGraph``'s own behaviour."""

    sync_workers: int = 136

    def stream(self, input: Any, config: RunnableConfig | None = None,  # type: ignore[override]
               **kwargs: Any) -> Iterator[Any]:
        config = ensure_config(config)
        if config.get("max_concurrency") is None:
            config["max_concurrency"] = self.sync_workers
        with cancel_scope() as scope:
            inner = super().stream(input, config, **kwargs)
            finished = False
            try:
                for item in inner:  # noqa: UP028 - ``yield from`` would close ``inner`` (and wait) first
                    yield item
                finished = True
            finally:
                if not finished:
                    scope.cancel()  # before closing: LangGraph's close waits for running nodes
                inner.close()


def _applied(state: Any, update: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    apply_update(out, update)
    return out


def _combined(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """One update that folds into the state like ``first`` and then ``then`` would.

    For the keys the steps folded into ``generate`` write (``prepare`` of a branch, ``generate``,
    ``finalize``): none of them writes ``apr_branch_results``, whose reset would not combine.
    """
    out = dict(first)
    for key, value in then.items():
        if key not in out or isinstance(value, Overwrite):
            out[key] = value
            continue
        old = out[key]
        wrap = isinstance(old, Overwrite)  # a reset followed by more: still one reset
        old = old.value if wrap else old
        if key == "apr_trace":
            new = merge_traces(old, value)
        elif key == "messages":
            new = [*old, *value]
        else:
            new = value
        out[key] = Overwrite(new) if wrap and key in REDUCERS else new
    return out
