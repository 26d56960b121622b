"""Per-branch streaming: LangGraph's stream modes, normalised to one event shape.

The runtime writes its own events to LangGraph's ``custom`` stream (through
``get_stream_writer``). Every event names its context (``"ctx"``: ``"root"``,
``"root/1.2"``, ``"root/1.2/1.1"``): a consumer tells the branches apart by it,
with or without ``subgraphs=True``. In a checkpointed run each branch step is a
LangGraph task, whose result the ``updates`` stream also reports (as ``apr_step``
or ``apr_branch``); ``stream_events`` reports those steps once, as ``step`` events.
See docs/streaming.md for every shape.

``stream_events`` is what the CLI's live tree consumes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from .core import BRANCH_TASKS

APR_EVENTS = ("branch_start", "token", "tool_start", "tool_end", "spawn", "merge", "branch_end", "step")


def ns_key(ns: tuple[str, ...] | list[str] | str) -> str:
    """LangGraph's namespace tuple as one string (``""`` for the root graph)."""
    return ns if isinstance(ns, str) else "|".join(ns)


async def stream_events(
    graph: Any,
    input: dict[str, Any] | None,
    config: dict[str, Any] | None = None,
    *,
    steps: bool = True,
    **stream_kwargs: Any,
) -> AsyncIterator[dict[str, Any]]:
    """Run ``graph`` and yield its normalised APR events, then one ``done`` event.

    Every event is a dict with ``"apr"`` (the kind), ``"ctx"`` (the context
    id), ``"ns"`` (the LangGraph namespace that emitted it, ``""`` for the root
    graph) and ``"t"`` (``time.time()`` when the consumer received it), plus
    the kind's own keys:

    - ``spawn``: ``outlines`` ``[[label, text], ...]``, in outline order
    - ``branch_start``: ``label``, ``outline``, ``depth``
    - ``token``: ``text`` (one decoded piece; only from backends that stream)
    - ``tool_start``: ``name``, ``args``; ``tool_end``: ``name``, ``duration_s``, ``error``
    - ``branch_end``: ``end`` (``thread_end``/``eos``/``max_tokens``/``timeout``/...), ``tokens``
    - ``merge``: ``children`` (context ids in outline order)
    - ``step`` (when ``steps``): ``node`` (``prepare`` at the root, ``generate``/``tools``/
      ``branch``/``merge``): a node of that context's graph finished
    - ``done`` (last): ``state`` (the final state: ``messages``, ``apr_trace``)
      and ``answer`` (the final ``AIMessage``'s text)

    ``input=None`` resumes a checkpointed thread named in ``config``. Extra
    keywords (``durability``, ...) go to ``graph.astream``.
    """
    ns_ctx: dict[str, str] = {"": "root"}
    final: dict[str, Any] = {}
    modes = ["custom", "values", *(["updates"] if steps else [])]
    async for ns, mode, chunk in graph.astream(input, config, stream_mode=modes, subgraphs=True,
                                               **stream_kwargs):
        key = ns_key(ns)
        now = time.time()
        if mode == "custom":
            if not (isinstance(chunk, dict) and chunk.get("apr") in APR_EVENTS):
                continue  # another node's custom event (a user graph around the agent)
            if chunk["apr"] == "step" and not steps:
                continue  # a branch's node finished
            if chunk["apr"] == "branch_start":
                ns_ctx[key] = chunk["ctx"]
            yield {**chunk, "ns": key, "t": now}
        elif mode == "updates":
            for node, update in (chunk or {}).items():
                if node in BRANCH_TASKS:
                    continue  # a branch step's task: its own ``step`` event reports it
                ctx = (update or {}).get("apr", {}).get("id") if isinstance(update, dict) else None
                yield {"apr": "step", "ctx": ctx or _ctx_of(ns_ctx, key), "node": node, "ns": key, "t": now}
        elif mode == "values" and not ns:
            final = chunk
    messages = final.get("messages") or []
    answer = messages[-1].content if messages else ""
    yield {"apr": "done", "ctx": "root", "ns": "", "t": time.time(), "state": dict(final), "answer": answer}


def _ctx_of(ns_ctx: dict[str, str], key: str) -> str:
    """The context a namespace runs; a user graph's namespaces fall back to the nearest known one."""
    while key not in ns_ctx and key:
        key = key.rsplit("|", 1)[0] if "|" in key else ""
    return ns_ctx.get(key, "root")
