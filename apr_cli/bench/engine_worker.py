"""Runs the engine-batching measurement inside another environment (vLLM's CPU build in ``.venv-vllm``).

    python -m apr_cli.bench.engine_worker --engine vllm --ks 1,2,4,8 --tokens 64 --reps 2

Prints one JSON line: ``{"engine": ..., "rows": [...]}`` or ``{"error": ...}``.
The model: ``APR_BENCH_VLLM_MODEL`` (a model name or local folder/file), else
the embedded Gemma 3 270M (``VLLMBackend(None)``); ``enforce_eager`` unless
``APR_BENCH_VLLM_EAGER=0``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any


def build_vllm() -> Any:
    from apr_agents.backends.vllm import VLLMBackend

    model = os.environ.get("APR_BENCH_VLLM_MODEL") or None  # None: the embedded Gemma 3 270M
    eager = os.environ.get("APR_BENCH_VLLM_EAGER", "1") != "0"  # no torch.compile: starts in far less time
    return VLLMBackend(model, enforce_eager=eager)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        from apr_cli.bench.engines import bench_engine

        if args.engine != "vllm":
            raise ValueError(f"unknown engine {args.engine!r}")
        engine = build_vllm()
        try:
            t0 = time.perf_counter()
            asyncio.run(engine.start())
            start_s = time.perf_counter() - t0
            rows = asyncio.run(bench_engine(engine, [int(k) for k in args.ks.split(",")], args.tokens, args.reps))
        finally:
            engine.shutdown()
        payload: dict[str, Any] = {"engine": repr(engine), "start_s": start_s, "rows": rows}
    except Exception as exc:  # noqa: BLE001 - reported to the parent process as data
        payload = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    print(json.dumps(payload, default=str), flush=True)
    return 0 if "rows" in payload else 1


if __name__ == "__main__":
    sys.exit(main())
