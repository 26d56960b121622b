"""Does this engine, on this machine, decode K sequences together faster than one after another?

The plugin's branches pay only where they do (a spawn otherwise costs its extra
tokens one after another), so this is the first number to look at before
expecting a speed-up from spawning. For K = 1, 2, 4 (and 8 with ``--max-k 8``) it
sends K different prompts of the same shape one by one, then all at once, and
prints the wall times and their ratio (the batching gain: 1.0 means none).
Greedy, ``--tokens`` tokens per request with end of sequence ignored where the
backend allows it, after one warm-up call.

Usage::

    python -m apr_cli.bench.batch_gain --backend embedded --batched --n-threads 2
    python -m apr_cli.bench.batch_gain --backend vllm        # in .venv-vllm; the model converted once
    python -m apr_cli.bench.batch_gain --backend vllm --model qwen2.5-coder-1.5b-instruct --max-k 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

PROMPT = "<|im_start|>user\nWrite a long story about a dragon number {}.<|im_end|>\n<|im_start|>assistant\n"


def make_backend(kind: str, model: str | None, *, batched: bool, n_threads: int | None) -> Any:
    from apr_agents.backends.models import DEFAULT_MODEL

    if kind == "vllm":
        from apr_agents.backends.vllm import VLLMBackend

        return VLLMBackend(model or DEFAULT_MODEL, chat_template=True, enforce_eager=True, max_model_len=4096)
    from apr_agents.backends import embedded

    kwargs: dict[str, Any] = {"n_ctx": 4096, "batched": batched, "n_seq_max": 8}
    if n_threads is not None:
        kwargs["n_threads"] = n_threads
    return embedded.default_backend(model=model or DEFAULT_MODEL, **kwargs)


async def measure(backend: Any, *, tokens: int, max_k: int) -> list[dict[str, Any]]:
    extra = {"ignore_eos": True} if type(backend).__name__ == "VLLMBackend" else {}

    async def one(i: int) -> Any:
        return await backend.complete(PROMPT.format(i), stop=[], max_tokens=tokens, temperature=0.0, **extra)

    await one(999)
    rows = []
    k = 1
    while k <= max_k:
        t0 = time.perf_counter()
        done = [await one(i) for i in range(k)]
        alone = time.perf_counter() - t0
        t1 = time.perf_counter()
        done += await asyncio.gather(*(one(100 + i) for i in range(k)))
        together = time.perf_counter() - t1
        rows.append({"k": k, "one_by_one_s": round(alone, 2), "together_s": round(together, 2),
                     "gain": round(alone / together, 2),
                     "tokens_per_request": round(sum(c.completion_tokens for c in done) / len(done), 1)})
        print(f"K={k}: one by one {alone:.2f} s, together {together:.2f} s, gain {alone / together:.2f}x", flush=True)
        k *= 2
    return rows


async def amain(args: argparse.Namespace) -> int:
    backend = make_backend(args.backend, args.model, batched=args.batched, n_threads=args.n_threads)
    t0 = time.perf_counter()
    if hasattr(backend, "start"):
        await backend.start()
    print(f"{backend!r} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        rows = await measure(backend, tokens=args.tokens, max_k=args.max_k)
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            res = close()
            if asyncio.iscoroutine(res):
                await res
    if args.json:
        print(json.dumps({"backend": repr(backend), "tokens": args.tokens, "rows": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apr_cli.bench.batch_gain", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["embedded", "vllm"], default="embedded")
    p.add_argument("--model", help="catalog name, .gguf path or (vllm) checkpoint folder; default: the embedded default")
    p.add_argument("--batched", action="store_true", help="embedded: the batched engine (else one sequence at a time)")
    p.add_argument("--n-threads", type=int, help="embedded: decode threads (default: one per physical core)")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--max-k", type=int, default=4)
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":  # vLLM starts its engine process with `spawn`: the guard is required
    raise SystemExit(main())
