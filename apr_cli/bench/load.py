"""Load test of the served graph: many concurrent runs against a real LangGraph server.

    python -m apr_cli.bench.load            # starts `langgraph dev` on 127.0.0.1, 100 runs, stops
    python -m apr_cli.bench.load --url http://127.0.0.1:2024 --runs 20   # an already running server
    python -m apr_cli.bench.load --in-process memory   # the same runs, no server (InMemorySaver)

Loopback only and bounded: a fixed number of runs, an overall timeout, and
the server it started is stopped at the end. The model is the FAKE
ScriptedBackend (``APR_BACKEND=scripted APR_SCRIPT=arith``): each question
asks for ``a*b + c*d``; the root spawns two branches, each branch calls the
``calculator`` tool (with simulated API latency), and the root's answer is
the sum of the two tool results it finds in the merged branches. So a
correct answer proves that both branches ran their tool and were merged into
that run's own context.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from apr_agents.testing.scripts import arith_question

GRAPH_ID = "apr"
# -- the server ----------------------------------------------------------------
def default_config() -> Path:
    """``graphs/langgraph.json`` of a source checkout, or one written to a temp folder."""
    repo = Path(__file__).resolve().parents[2] / "graphs" / "langgraph.json"
    if repo.is_file():
        return repo
    folder = Path(tempfile.mkdtemp(prefix="apr-graph-"))
    (folder / "apr_graph.py").write_text("from apr_agents.graph.deploy import graph_from_env\n\n"
                                         "graph = graph_from_env()\n")
    (folder / "langgraph.json").write_text(json.dumps({"dependencies": ["."],
                                                       "graphs": {GRAPH_ID: "./apr_graph.py:graph"}}))
    return folder / "langgraph.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(env: Mapping[str, str], *, config: Path | None = None, port: int | None = None,
          n_jobs_per_worker: int = 10, workdir: Path | None = None,
          start_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``langgraph dev`` on 127.0.0.1 (no browser, no reload) and yield its base URL.

    ``env`` adds to this process's environment (the ``APR_*`` settings). The
    server's files (``.langgraph_api``) and its log go to ``workdir`` (a temp
    folder by default), never beside the graph. Stops the server on exit.
    """
    config = config or default_config()
    port = port or free_port()
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="apr-serve-")) if workdir is None else workdir
    log_path = workdir / "server.log"
    full_env = {**os.environ, "LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGSMITH_TRACING": "false",
                "LANGCHAIN_TRACING_V2": "false", **env}
    cmd = [_langgraph_cli(), "dev", "--config", str(_anchored(config, workdir)), "--host", "127.0.0.1",
           "--port", str(port), "--no-browser", "--no-reload", "--n-jobs-per-worker", str(n_jobs_per_worker)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"langgraph dev exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                if httpx.get(f"{url}/ok", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"langgraph dev not up after {start_timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield url
    finally:
        _stop(proc)
        if own:
            import shutil

            if os.environ.get("APR_KEEP_SERVER_LOG"):
                print(f"server log: {log_path}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def _anchored(config: Path, workdir: Path) -> Path:
    """A copy of ``config`` in ``workdir`` with its paths made absolute.

    ``langgraph dev`` resolves a config's paths against its working folder and
    keeps its state (``.langgraph_api``) there; so the server runs in
    ``workdir``, away from the graph's folder, and the copy points back at it.
    """
    spec = json.loads(config.read_text())
    base = config.resolve().parent

    def anchor(path: str) -> str:
        return str((base / path).resolve()) if path.startswith(".") else path

    spec["dependencies"] = [anchor(d) for d in spec.get("dependencies", [])]
    graphs = {}
    for gid, ref in spec.get("graphs", {}).items():
        if isinstance(ref, str) and ":" in ref:
            path, var = ref.rsplit(":", 1)
            graphs[gid] = f"{anchor(path)}:{var}"
        else:
            graphs[gid] = ref
    spec["graphs"] = graphs
    if isinstance(spec.get("env"), str):
        spec["env"] = anchor(spec["env"])
    out = workdir / "langgraph.json"
    out.write_text(json.dumps(spec, indent=1))
    return out


def _langgraph_cli() -> str:
    """The ``langgraph`` command of this environment (from ``langgraph-cli[inmem]``)."""
    import shutil

    beside = Path(sys.executable).with_name("langgraph")
    found = str(beside) if beside.is_file() else shutil.which("langgraph")
    if not found:
        raise RuntimeError("`langgraph` not found: pip install 'langgraph-cli[inmem]' (extra apr-agents[serve])")
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def load_env(tool_latency_s: float = 0.2, token_latency_s: float = 0.0) -> dict[str, str]:
    """``APR_*`` settings of the load test's served graph."""
    return {"APR_BACKEND": "scripted", "APR_SCRIPT": "arith", "APR_TOOLS": "calculator",
            "APR_TOOL_LATENCY_S": str(tool_latency_s), "APR_TOKEN_LATENCY_S": str(token_latency_s),
            "APR_LLM_CONCURRENCY": "256", "APR_TOOL_CONCURRENCY": "256"}


# -- the client ----------------------------------------------------------------
async def one_run(client: Any, question: str, *, stream: bool = False) -> dict[str, Any]:
    """Create a thread, run the question on it, return the final state values and timings."""
    t0 = time.perf_counter()
    thread = await client.threads.create()
    inp = {"messages": [{"role": "human", "content": question}]}
    events = 0
    if stream:
        values: dict[str, Any] = {}
        async for part in client.runs.stream(thread["thread_id"], GRAPH_ID, input=inp,
                                             stream_mode=["values", "custom"], stream_subgraphs=True):
            events += 1
            if part.event == "values":
                values = part.data
    else:
        values = await client.runs.wait(thread["thread_id"], GRAPH_ID, input=inp)
    if not isinstance(values, dict):
        values = {}
    messages = values.get("messages") or [{}]
    return {"thread_id": thread["thread_id"], "latency_s": time.perf_counter() - t0,
            "answer": messages[-1].get("content", ""), "events": events,
            "summary": (values.get("apr_trace") or {}).get("summary", {})}


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


async def run_load(url: str, runs: int = 100, *, concurrency: int | None = None, seed: int = 0,
                   stream: bool = False, timeout_s: float = 300.0) -> dict[str, Any]:
    """``runs`` runs, ``concurrency`` at once (default: all), each checked against its correct answer."""
    from langgraph_sdk import get_client

    client = get_client(url=url, timeout=httpx.Timeout(timeout_s, connect=10.0))
    sem = asyncio.Semaphore(concurrency or runs)

    async def task(i: int) -> dict[str, Any]:
        question, expected = arith_question(i, seed)
        async with sem:
            try:
                out = await one_run(client, question, stream=stream)
            except Exception as exc:  # noqa: BLE001 - a failed run is counted, not fatal
                return {"i": i, "ok": False, "error": f"{type(exc).__name__}: {exc}", "latency_s": None}
        out.update(i=i, expected=f"Answer: {expected}", ok=out["answer"] == f"Answer: {expected}")
        return out

    return await _measured(task, runs, concurrency, timeout_s)


async def run_in_process(runs: int = 100, *, concurrency: int | None = None, seed: int = 0,
                         checkpointer: str = "none", tool_latency_s: float = 0.2, token_latency_s: float = 0.0,
                         timeout_s: float = 300.0) -> dict[str, Any]:
    """The same runs on the same graph (``graph_from_env`` with the load-test settings), in this
    process with no server: what the HTTP server, its queue and its store add is the difference.
    ``checkpointer``: ``none`` or ``memory`` (``InMemorySaver``: each branch step a LangGraph task)."""
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.memory import InMemorySaver

    from apr_agents.graph.deploy import graph_from_env

    saver = {"none": None, "memory": InMemorySaver()}[checkpointer]
    graph = graph_from_env(load_env(tool_latency_s, token_latency_s), checkpointer=saver)
    sem = asyncio.Semaphore(concurrency or runs)

    async def task(i: int) -> dict[str, Any]:
        question, expected = arith_question(i, seed)
        async with sem:
            t0 = time.perf_counter()
            try:
                state = await graph.ainvoke({"messages": [HumanMessage(question)]},
                                            {"configurable": {"thread_id": f"load-{i}"}})
            except Exception as exc:  # noqa: BLE001 - a failed run is counted, not fatal
                return {"i": i, "ok": False, "error": f"{type(exc).__name__}: {exc}", "latency_s": None}
        answer = state["messages"][-1].content
        return {"i": i, "latency_s": time.perf_counter() - t0, "answer": answer,
                "summary": state["apr_trace"]["summary"], "expected": f"Answer: {expected}",
                "ok": answer == f"Answer: {expected}"}

    return await _measured(task, runs, concurrency, timeout_s)


async def _measured(task: Any, runs: int, concurrency: int | None, timeout_s: float) -> dict[str, Any]:
    """Run ``task(i)`` for every run at once (each task bounds itself) and report."""
    t0 = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(runs))), timeout_s)
    wall = time.perf_counter() - t0
    lat = [r["latency_s"] for r in results if r["latency_s"] is not None]
    ok = sum(1 for r in results if r["ok"])
    return {
        "runs": runs, "concurrency": concurrency or runs, "ok": ok, "failed": runs - ok, "wall_s": round(wall, 3),
        "throughput_runs_per_s": round(runs / wall, 2) if wall else None,
        "p50_s": round(percentile(lat, 50), 3), "p95_s": round(percentile(lat, 95), 3),
        "max_s": round(max(lat), 3) if lat else None,
        "branches": sum(int(r.get("summary", {}).get("branches", 0)) for r in results),
        "tool_calls": sum(int(r.get("summary", {}).get("tool_calls", 0)) for r in results),
        "failures": [r for r in results if not r["ok"]][:5],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apr_cli.bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100, help="runs in all (default 100)")
    p.add_argument("--concurrency", type=int, default=None, help="runs at once (default: all of them)")
    p.add_argument("--url", help="an already running server with the graph 'apr' (APR_SCRIPT=arith)")
    p.add_argument("--tool-latency", type=float, default=0.2, help="simulated API latency per tool call, s")
    p.add_argument("--token-latency", type=float, default=0.0, help="simulated decode time per token, s")
    p.add_argument("--n-jobs-per-worker", type=int, default=None,
                   help="server run slots (default: --concurrency or --runs)")
    p.add_argument("--stream", action="store_true", help="stream each run (values + custom, subgraphs)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    p.add_argument("--json", dest="json_out", help="also write the report here")
    p.add_argument("--in-process", choices=["none", "memory"], default=None,
                   help="no server: run the same graph in this process, with no checkpointer or InMemorySaver")
    args = p.parse_args(argv)
    n_jobs = args.n_jobs_per_worker or args.concurrency or args.runs

    async def go(url: str) -> dict[str, Any]:
        return await run_load(url, args.runs, concurrency=args.concurrency, stream=args.stream,
                              timeout_s=args.timeout)

    if args.in_process:
        report = asyncio.run(run_in_process(args.runs, concurrency=args.concurrency, checkpointer=args.in_process,
                                            tool_latency_s=args.tool_latency, token_latency_s=args.token_latency,
                                            timeout_s=args.timeout))
    elif args.url:
        report = asyncio.run(go(args.url))
    else:
        with serve(load_env(args.tool_latency, args.token_latency), n_jobs_per_worker=n_jobs) as url:
            report = asyncio.run(go(url))
    report["settings"] = {"tool_latency_s": args.tool_latency, "token_latency_s": args.token_latency,
                          "n_jobs_per_worker": n_jobs, "stream": args.stream, "in_process": args.in_process}
    print(json.dumps(report, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
