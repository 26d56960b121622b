"""Watch every branch of a run live: spawns, tokens, tool calls, branch ends, merges.

    python examples/stream_branches.py              # FAKE scripted model, instant
    python examples/stream_branches.py --raw        # LangGraph's own stream tuples instead
    python examples/stream_branches.py --backend embedded   # the embedded CPU model
    python examples/stream_branches.py --raw --durable   # checkpointed: branch steps run as tasks

Uses ``apr_agents.graph.streaming.stream_events`` (the normalised events the
CLI's live tree draws); ``--raw`` shows what it is built on:
``graph.astream(..., stream_mode=["updates", "custom", "messages"], subgraphs=True)``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from typing import Any

from langchain_core.messages import HumanMessage

from apr_agents import APRConfig, create_apr_agent
from apr_agents.graph.streaming import stream_events
from apr_agents.testing import ScriptedBackend
from apr_agents.testing.scripts import DEMO_QUESTION, demo_script
from apr_tools import calculator, lookup, with_latency


def build(backend_kind: str, durable: bool = False) -> tuple[Any, dict[str, Any]]:
    if backend_kind == "embedded":
        from apr_agents import default_backend

        backend = default_backend()
    else:
        backend = ScriptedBackend(demo_script(), token_latency_s=0.01)  # FAKE model
    tools = [with_latency(lookup, 0.3), with_latency(calculator, 0.1)]  # slow "APIs"
    if not durable:
        return create_apr_agent(backend, tools, APRConfig(max_threads=4)), {}
    from langgraph.checkpoint.memory import InMemorySaver

    graph = create_apr_agent(backend, tools, APRConfig(max_threads=4), checkpointer=InMemorySaver())
    return graph, {"configurable": {"thread_id": "stream-branches"}}


async def normalised(graph: Any, config: dict[str, Any]) -> None:
    t0 = time.time()
    words: dict[str, list[str]] = defaultdict(list)
    async for ev in stream_events(graph, {"messages": [HumanMessage(DEMO_QUESTION)]}, config, steps=False):
        kind, ctx, at = ev["apr"], ev["ctx"], f"{ev['t'] - t0:6.2f}s"
        indent = "  " * ctx.count("/")
        if kind == "token":
            words[ctx].append(ev["text"])
            continue
        if words[ctx]:  # flush what this context wrote since its last event
            print(f"{at} {indent}[{ctx}] wrote: {''.join(words.pop(ctx)).strip()[:90]!r}")
        if kind == "spawn":
            print(f"{at} {indent}[{ctx}] spawn: " + "; ".join(f"{lbl}: {text}" for lbl, text in ev["outlines"]))
        elif kind == "branch_start":
            print(f"{at} {indent}[{ctx}] start (depth {ev['depth']}): {ev['outline']}")
        elif kind == "tool_start":
            print(f"{at} {indent}[{ctx}] tool {ev['name']}({ev['args']}) ...")
        elif kind == "tool_end":
            print(f"{at} {indent}[{ctx}] tool {ev['name']} done in {ev['duration_s']:.2f}s"
                  + (f" error={ev['error']}" if ev["error"] else ""))
        elif kind == "branch_end":
            print(f"{at} {indent}[{ctx}] end: {ev['end']}, {ev['tokens']} tokens")
        elif kind == "merge":
            print(f"{at} {indent}[{ctx}] merge: {', '.join(ev['children'])}")
        elif kind == "done":
            summary = ev["state"]["apr_trace"]["summary"]
            print(f"{at} answer: {ev['answer']}")
            print(f"         {summary['branches']} branches, at most {summary['max_concurrent_branches']} at once, "
                  f"{summary['tool_calls']} tool calls")


async def raw(graph: Any, config: dict[str, Any]) -> None:
    async for ns, mode, chunk in graph.astream({"messages": [HumanMessage(DEMO_QUESTION)]}, config,
                                               stream_mode=["updates", "custom", "messages"], subgraphs=True):
        where = "|".join(n.split(":")[0] + ":" + n.split(":")[1][:8] for n in ns) or "(root graph)"
        if mode == "custom" and chunk.get("apr") == "token":
            continue  # one line per piece is too much here
        if mode == "updates":
            chunk = {node: (upd or {}).get("apr", {}).get("id", "") for node, upd in chunk.items()}
        if mode == "messages":
            msg, meta = chunk
            chunk = (type(msg).__name__, msg.content[:60], meta["langgraph_node"])
        print(f"{where:32} {mode:8} {chunk}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--raw", action="store_true", help="print LangGraph's stream tuples")
    p.add_argument("--backend", choices=["scripted", "embedded"], default="scripted")
    p.add_argument("--durable", action="store_true",
                   help="with a checkpointer: each branch step is a LangGraph task, saved as it completes")
    args = p.parse_args()
    graph, config = build(args.backend, args.durable)
    asyncio.run(raw(graph, config) if args.raw else normalised(graph, config))


if __name__ == "__main__":
    main()
