"""Drive the served APR graph over HTTP with langgraph-sdk: thread, streamed run, final state.

    python examples/served_client.py                  # starts `langgraph dev` (FAKE scripted model) and stops it
    python examples/served_client.py --url http://127.0.0.1:2024 --question "..."   # a server you started

To start one yourself (docs/deployment.md):

    cd graphs && APR_BACKEND=scripted langgraph dev --no-browser --no-reload --port 2024

Needs ``pip install 'apr-agents[serve]'`` (langgraph-cli[inmem], langgraph-sdk).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import nullcontext

from langgraph_sdk import get_client

from apr_agents.testing.scripts import arith_question
from apr_cli.bench.load import load_env, serve


async def drive(url: str, question: str) -> None:
    client = get_client(url=url)
    thread = await client.threads.create()
    print(f"thread {thread['thread_id']}\nquestion: {question}\n")
    ctx_of_ns: dict[str, str] = {"": "root"}
    t0 = time.perf_counter()
    async for part in client.runs.stream(thread["thread_id"], "apr",
                                         input={"messages": [{"role": "human", "content": question}]},
                                         stream_mode=["custom", "updates"], stream_subgraphs=True):
        mode, _, ns = part.event.partition("|")  # e.g. "custom|branch:1f0c...": which branch wrote it
        at = f"{time.perf_counter() - t0:5.2f}s"
        if mode == "custom" and part.data.get("apr") not in (None, "token"):
            ev = part.data
            if ev["apr"] == "branch_start":
                ctx_of_ns[ns] = ev["ctx"]
            details = {k: v for k, v in ev.items() if k not in ("apr", "ctx")}
            print(f"{at} [{ev['ctx']}] {ev['apr']} {details}")
        elif mode == "updates":
            print(f"{at} [{ctx_of_ns.get(ns, ns)}] node done: {', '.join(part.data)}")

    state = await client.threads.get_state(thread["thread_id"])
    values = state["values"]
    summary = values["apr_trace"]["summary"]
    print(f"\nanswer: {values['messages'][-1]['content']}")
    print(f"trace: {summary['branches']} branches, {summary['tool_calls']} tool calls, "
          f"critical path {summary['critical_path_tokens']} of {summary['total_tokens']} tokens, "
          f"contexts {sorted(values['apr_trace']['contexts'])}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", help="a running server (default: start one on 127.0.0.1 with the scripted model)")
    p.add_argument("--question", help="default: an arithmetic question the scripted model answers")
    args = p.parse_args()
    question = args.question or arith_question(3)[0]
    with nullcontext(args.url) if args.url else serve(load_env(tool_latency_s=0.3)) as url:
        asyncio.run(drive(url, question))


if __name__ == "__main__":
    main()
