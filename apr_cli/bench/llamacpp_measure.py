"""Measure the embedded llama.cpp backend and the OpenAI-compatible backend on this machine.

    python -m apr_cli.bench.llamacpp_measure [--reps 3] [--skip-server] [--out bench.json]
    python -m apr_cli.bench.llamacpp_measure --batched-only --reps 2   # the batched engine alone

``--batched-only`` times K = 1, 2, 4, 8 branches of one spawn (prefix cached)
on ``LlamaCppBackend(batched=True)``, sent together and one after another, in
wall time and in process CPU time (``time.process_time``, all threads): on a
shared machine the CPU time is the steadier measure of the engine's own work.

Feeds the numbers in docs/engines.md. It prints the machine (``nproc``, CPU
model, load average before and after: other processes on a 2-core machine skew
every number, so look at the load) and one JSON object. Each timing is the
median of ``--reps`` runs, with min and max.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from langchain_core.messages import HumanMessage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from apr_agents.backends.base import route_key
from apr_agents.backends.embedded import model_path
from apr_agents.backends.llamacpp import LlamaCppBackend
from apr_agents.backends.openai_compat import OpenAICompatibleBackend

TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "lookup", "description": "Facts about a country or city.",
     "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}}},
    {"type": "function", "function": {"name": "sleep_then_echo", "description": "Wait, then return text.",
     "parameters": {"type": "object", "properties": {"seconds": {"type": "number"}, "text": {"type": "string"}},
                    "required": ["seconds", "text"]}}},
]
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def machine() -> dict[str, object]:
    cpu = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "loadavg": os.getloadavg()}


async def bench_llamacpp(reps: int, n_threads: int) -> dict[str, object]:
    path = model_path()
    loads = []
    for _ in range(reps):
        t = time.perf_counter()
        b = LlamaCppBackend(path, n_ctx=4096, n_threads=n_threads, end_stops=())
        loads.append(time.perf_counter() - t)
        b.close()
    b = LlamaCppBackend(path, n_ctx=4096, n_threads=n_threads, end_stops=())
    prompt = b.render([HumanMessage("What are the capitals of France and Brazil?")], TOOLS)
    out: dict[str, object] = {"n_threads": n_threads, "load_s": stats(loads)}

    prefill, ttft_cold, ttft_warm, decode = [], [], [], []
    n_prompt = 0
    for _ in range(reps):
        b.llama.reset()  # empty KV cache: the whole prompt is evaluated
        t = time.perf_counter()
        c = await b.complete(prompt, stop=[], max_tokens=1)
        prefill.append(time.perf_counter() - t)
        n_prompt = c.prompt_tokens
        b.llama.reset()
        t = time.perf_counter()
        async for _piece in b.stream(prompt, stop=[], max_tokens=8):
            ttft_cold.append(time.perf_counter() - t)
            break
        # a branch: same prefix plus a few tokens, prefix in the KV cache
        t = time.perf_counter()
        async for _piece in b.stream(prompt + "<Parallel>\n", stop=[], max_tokens=8):
            ttft_warm.append(time.perf_counter() - t)
            break
        await b.complete(STORY, stop=[], max_tokens=1)
        t = time.perf_counter()
        c = await b.complete(STORY, stop=[], max_tokens=64)
        decode.append(c.completion_tokens / (time.perf_counter() - t))
    out.update(prompt_tokens=n_prompt, prefill_s=stats(prefill),
               prefill_tok_s=round(n_prompt / statistics.median(prefill), 1),
               first_token_cold_s=stats(ttft_cold), first_token_cached_prefix_s=stats(ttft_warm),
               decode_tok_s=stats(decode))

    # 4 branches of one spawn, 48 tokens each: submitted together vs one after another
    shared = STORY + " <Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n" \
        "<Outline>3: c</Outline>\n<Outline>4: d</Outline>\n</Outlines>\n"
    branches = [shared + f"<Thread>{i}:" for i in range(1, 5)]
    await b.complete(shared, stop=[], max_tokens=1)
    together, sequential, one = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        await b.complete(branches[0], stop=[], max_tokens=48)
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = await asyncio.gather(*[b.complete(p, stop=[], max_tokens=48) for p in branches])
        together.append(time.perf_counter() - t)
        t = time.perf_counter()
        for p in branches:
            await b.complete(p, stop=[], max_tokens=48)
        sequential.append(time.perf_counter() - t)
    out["spawn4"] = {"tokens_per_branch": [c.completion_tokens for c in res], "one_branch_s": stats(one),
                     "together_s": stats(together), "sequential_s": stats(sequential),
                     "together_vs_one": round(statistics.median(together) / statistics.median(one), 2)}
    b.close()

    # grammar-constrained decoding: cost per token
    g = LlamaCppBackend(path, n_ctx=4096, n_threads=n_threads, end_stops=(), grammar="protocol")
    await g.complete(STORY, stop=[], max_tokens=1)
    gdec = []
    for _ in range(reps):
        t = time.perf_counter()
        c = await g.complete(STORY, stop=[], max_tokens=64)
        gdec.append(c.completion_tokens / (time.perf_counter() - t))
    out["decode_tok_s_protocol_grammar"] = stats(gdec)
    g.close()
    return out


async def bench_batched(reps: int, tokens: int = 32) -> dict[str, object]:
    """K branches of one spawn on the batched engine: together vs one after another (wall and CPU)."""
    b = LlamaCppBackend(model_path(), n_ctx=4096, batched=True, n_seq_max=8, end_stops=())
    shared = b.render([HumanMessage("What are the capitals of France and Brazil?")], TOOLS) + \
        "<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{i}: part {i}</Outline>\n" for i in range(1, 9)) + \
        "</Outlines>\n"
    out: dict[str, object] = {"tokens_per_branch": tokens, "engine": repr(b)}
    try:
        for k in (1, 2, 4, 8):
            branches = [shared + f"<Thread>{i}:" for i in range(1, k + 1)]
            await asyncio.gather(*[b.complete(p, stop=[], max_tokens=1) for p in branches])  # cache the prompts
            rows: dict[str, list[float]] = {"together_s": [], "together_cpu_s": [], "sequential_s": [],
                                            "sequential_cpu_s": []}
            gen = 0
            for _ in range(reps):
                w, c = time.perf_counter(), time.process_time()
                res = await asyncio.gather(*[b.complete(p, stop=[], max_tokens=tokens) for p in branches])
                rows["together_s"].append(time.perf_counter() - w)
                rows["together_cpu_s"].append(time.process_time() - c)
                gen = sum(r.completion_tokens for r in res)
                w, c = time.perf_counter(), time.process_time()
                for p in branches:
                    await b.complete(p, stop=[], max_tokens=tokens)
                rows["sequential_s"].append(time.perf_counter() - w)
                rows["sequential_cpu_s"].append(time.process_time() - c)
            med = {key: statistics.median(v) for key, v in rows.items()}
            out[f"k{k}"] = {**{key: stats(v) for key, v in rows.items()}, "generated": gen,
                            "speedup_wall": round(med["sequential_s"] / med["together_s"], 2),
                            "speedup_cpu": round(med["sequential_cpu_s"] / med["together_cpu_s"], 2)}
        out["stats"] = b.stats()
    finally:
        b.close()
    return out


async def bench_server(reps: int) -> dict[str, object]:
    from backend_servers import LlamaServer

    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    t = time.perf_counter()
    servers = [LlamaServer(model_path(), logs, n_ctx=4096) for _ in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        start_s = time.perf_counter() - t
        backend = OpenAICompatibleBackend([s.url for s in servers], "gemma", timeout_s=120, end_stops=())
        prompt = backend.render([HumanMessage("What are the capitals of France and Brazil?")], TOOLS)
        route_key.set("bench")
        home = backend.replica_for("bench")
        await backend.complete(prompt, stop=[], max_tokens=1)  # warm the home replica's cache
        first, decode, ttft = [], [], []
        for _ in range(reps):
            t = time.perf_counter()
            async for _piece in backend.stream(prompt + "<Parallel>\n", stop=[], max_tokens=8):
                ttft.append(time.perf_counter() - t)
                break
            await backend.complete(STORY, stop=[], max_tokens=1)
            t = time.perf_counter()
            c = await backend.complete(STORY, stop=[], max_tokens=64)
            decode.append(c.completion_tokens / (time.perf_counter() - t))
            t = time.perf_counter()
            await backend.complete(prompt, stop=[], max_tokens=1)
            first.append(time.perf_counter() - t)
        shared = STORY + " <Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n" \
            "<Outline>3: c</Outline>\n<Outline>4: d</Outline>\n</Outlines>\n"
        branches = [shared + f"<Thread>{i}:" for i in range(1, 5)]
        together, sequential = [], []
        for _ in range(reps):
            t = time.perf_counter()
            await asyncio.gather(*[backend.complete(p, stop=[], max_tokens=48) for p in branches])
            together.append(time.perf_counter() - t)
            t = time.perf_counter()
            for p in branches:
                await backend.complete(p, stop=[], max_tokens=48)
            sequential.append(time.perf_counter() - t)
        # fail-over: kill the home replica, time the next call (cold prompt on the other one)
        victim = next(s for s in servers if s.url == home)
        victim.kill()
        t = time.perf_counter()
        c = await backend.complete(STORY, stop=[], max_tokens=8)
        failover_s = time.perf_counter() - t
        t = time.perf_counter()
        await backend.complete(STORY, stop=[], max_tokens=8)
        after_s = time.perf_counter() - t
        return {"two_servers_ready_s": round(start_s, 2), "request_1_token_cold_prompt_s": stats(first),
                "first_token_stream_s": stats(ttft), "decode_tok_s": stats(decode),
                "spawn4_together_s": stats(together), "spawn4_sequential_s": stats(sequential),
                "failover_call_s": round(failover_s, 3), "next_call_s": round(after_s, 3)}
    finally:
        for s in servers:
            s.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--batched-only", action="store_true", help="only the batched engine (K = 1, 2, 4, 8)")
    args = ap.parse_args()
    result: dict[str, object] = {"machine": machine()}
    if args.batched_only:
        result["batched"] = await bench_batched(args.reps)
        result["loadavg_after"] = os.getloadavg()
        text = json.dumps(result, indent=1, ensure_ascii=False)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return
    result["llamacpp"] = [await bench_llamacpp(args.reps, n) for n in args.threads]
    if not args.skip_server:
        result["server"] = await bench_server(args.reps)
    result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
