"""``python -m apr_cli.eval`` / ``apr eval``: the real-model benchmark (see docs/eval.md).

Examples::

    apr eval --quick                                   # 4 questions, apr vs react, < 10 min on 2 cores
    apr eval --backend embedded --model qwen2.5-coder-1.5b-instruct --out docs/eval --name full
    apr eval --backend scripted --methods apr,react    # the FAKE oracle: checks the harness only
    apr eval --questions mine.jsonl --tools mypkg.tools:TOOLS --methods apr,apr-seq
    apr eval --regrade docs/eval/quick-embedded.json   # grade stored answers again (no model)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from apr_agents.graph.merge import MERGES
from apr_cli.cli import merge_name

from .grading import grade
from .methods import EVAL_SYSTEM, METHODS, AgentSettings, RunResult
from .questions import generate, interleaved, load_jsonl, save_jsonl, stratified
from .report import markdown, plot, summarize
from .runner import can_isolate, make_backend, run_eval
from .tools import eval_tools, load_tools

#: ``--quick``: one question of each kind that matters, (type, parts): a 3-part sum and a 3-part
#: comparison (where spawning should pay), a 2-part distance and a single-part control (where it
#: should not). Sized for 2 CPU cores: with the 1.5B default a plugin run took 60-100 s and a
#: ReAct run 30-40 s here, so 8 runs fit in 10 minutes with the model load.
QUICK_KINDS = (("population_sum", 3), ("largest_population", 3), ("capital_distance", 2), ("single_population", 1))
QUICK_QUESTIONS = len(QUICK_KINDS)
QUICK_METHODS = ("apr", "react")
QUICK_TIMEOUT_S = 150.0
QUICK_DEADLINE_S = 540.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apr eval", description="Multi-part questions on real data: accuracy and "
                                "latency of the plugin beside ReAct, one model, one engine.")
    p.add_argument("--backend", default="embedded", choices=["embedded", "openai", "vllm", "scripted"],
                   help="embedded: llama.cpp in-process; scripted: a FAKE oracle that checks the harness only")
    p.add_argument("--model", help="catalog name or .gguf path (embedded), model name (openai/vllm)")
    p.add_argument("--base-url", help="OpenAI-compatible server URL(s), comma-separated")
    p.add_argument("--grammar", choices=["none", "protocol"],
                   help="embedded: constrained decoding (default: the model's own; protocol for instruct models)")
    p.add_argument("--n-ctx", type=int, default=8192, help="embedded: context window")
    p.add_argument("--jump-forward", choices=["on", "off"], default="on",
                   help="embedded: read grammar-forced text instead of decoding it (default on)")
    p.add_argument("--n-threads", type=int, help="embedded: decode threads (default: one per physical core)")
    p.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (default: all; --quick: "
                                     f"{','.join(QUICK_METHODS)})")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_QUESTIONS} questions (a 3-part sum and comparison, a 2-part distance, a "
                        f"1-part control), {QUICK_TIMEOUT_S:.0f} s per run, stops starting runs after "
                        f"{QUICK_DEADLINE_S:.0f} s")
    p.add_argument("--limit", type=int, help="at most this many questions (a stratified subset)")
    p.add_argument("--questions", help="JSONL file of questions (each line: question, grading, ...)")
    p.add_argument("--dump-questions", metavar="FILE", help="write the question set as JSONL and exit")
    p.add_argument("--tools", help="your tools as module:attr (a list of tools or a function returning one)")
    p.add_argument("--tool-latency", type=float, default=1.0, help="seconds each tool call waits (default 1)")
    p.add_argument("--concurrency", type=int, default=1, help="runs in flight at once (default 1: clean latency)")
    p.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                   help="every run starts from the same prefix cache (a warm-up run per method, then the "
                        "cache restored before each run); auto: on where the backend can (embedded) and "
                        "--concurrency is 1")
    p.add_argument("--timeout", type=float, help=f"seconds per run (default 240; --quick {QUICK_TIMEOUT_S:.0f})")
    p.add_argument("--deadline", type=float, help="seconds for the whole eval; later runs are skipped")
    p.add_argument("--max-tokens", type=int, default=512, help="generated tokens per context / per chat call")
    p.add_argument("--max-threads", type=int, default=6)
    p.add_argument("--max-depth", type=int, default=1)
    p.add_argument("--apr-config", default="{}", help="more APRConfig fields for the plugin methods, as JSON "
                                                      "(e.g. '{\"max_steps\": 8}')")
    p.add_argument("--format-options", default="{}",
                   help="attributes of the backend's prompt format, as JSON (ChatMLFormat: e.g. "
                        "'{\"count_items\": false}', '{\"thread_tool_calls\": 2}')")
    p.add_argument("--merge", choices=list(MERGES),
                   help="plugin methods' merge: each thread without its tool calls and results "
                        "(apr_agents.graph.merge.thread_conclusions; the default: more right and faster on the "
                        "whole set, docs/eval.md), or every thread whole (the library's default, SPEC 2.4; the "
                        "default with --backend scripted, whose oracle checks that every tool result reached "
                        "the root)")
    p.add_argument("--lenient-tool-calls", action="store_true",
                   help="chat methods: also read tool calls written as bare or fenced JSON (no <tool_call> tags)")
    p.add_argument("--system", default=EVAL_SYSTEM, help="system message for every method ('' for none)")
    p.add_argument("--seed", type=int, default=0, help="question generation seed")
    p.add_argument("--out", default="docs/eval", help="folder for NAME.json and NAME.md (default docs/eval)")
    p.add_argument("--name", help="result file name (default: quick or full, with the backend)")
    p.add_argument("--doc", help="also write the tables into this markdown file between eval:NAME markers")
    p.add_argument("--plot", action="store_true", help="also write NAME.png (matplotlib)")
    p.add_argument("--regrade", metavar="RESULTS",
                   help="grade the answers stored in NAME.json (or NAME.runs.jsonl, with the questions of "
                        "--questions/--seed) again with the current grader, rewrite it and its tables; no model")
    p.add_argument("--quiet", action="store_true")
    return p


def _model_name(backend: Any, args: argparse.Namespace) -> Any:
    """The model the backend runs: its file (llama.cpp), its name or folder (vLLM), else --model."""
    return getattr(backend, "model_path", None) or getattr(backend, "model", None) or args.model


def _methods(args: argparse.Namespace) -> list[str]:
    if not args.methods:
        return list(QUICK_METHODS if args.quick else METHODS)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return wanted


def _questions(args: argparse.Namespace) -> list[Any]:
    qs = load_jsonl(args.questions) if args.questions else generate(args.seed)
    if args.quick and args.limit is None and not args.questions:
        return quick_set(qs)
    limit = args.limit if args.limit is not None else (QUICK_QUESTIONS if args.quick else None)
    if limit is not None and limit < len(qs):
        return stratified(qs, limit, seed=args.seed)
    return qs if args.questions else interleaved(qs)


def quick_set(questions: list[Any]) -> list[Any]:
    """The first question of each ``QUICK_KINDS`` kind, in that order."""
    picked = []
    for kind in QUICK_KINDS:
        hit = next((q for q in questions if (q.type, q.parts) == kind), None)
        if hit is not None:
            picked.append(hit)
    return picked


def update_doc(path: Path, name: str, text: str) -> None:
    """Replace (or append) the block between ``<!-- eval:NAME:start -->`` and ``<!-- eval:NAME:end -->``."""
    start, end = f"<!-- eval:{name}:start -->", f"<!-- eval:{name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new, encoding="utf-8")


def regrade(args: argparse.Namespace) -> int:
    """Grade stored answers again: the model's outputs are kept, only ``correct`` can change."""
    path = Path(args.regrade)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        payload: dict[str, Any] = {"runs": [json.loads(line) for line in text.splitlines() if line.strip()]}
        specs = {q.id: q.grading for q in (load_jsonl(args.questions) if args.questions else generate(args.seed))}
    else:
        payload = json.loads(text)
        specs = {q["id"]: q["grading"] for q in payload["question_set"]}
    changed = []
    for r in payload["runs"]:
        spec = specs.get(r["question_id"])
        if spec is None:
            raise LookupError(f"no question {r['question_id']!r} to grade against (pass --questions or --seed)")
        if r.get("skipped") or r.get("error"):
            continue
        ok = grade(r.get("answer"), spec)
        if ok != r["correct"]:
            changed.append(r)
            print(f"{r['method']:<9} {r['question_id']} {r['correct']} -> {ok}: {str(r.get('answer'))[:90]!r}")
        r["correct"] = ok
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in payload["runs"]), encoding="utf-8")
        methods = list(dict.fromkeys(r["method"] for r in payload["runs"]))
        table = markdown(summarize(payload["runs"], methods))
    else:
        payload["report"] = summarize(payload["runs"], payload["meta"]["methods"])
        payload["meta"]["regraded_utc"] = stamp
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
        table = markdown(payload["report"])
        md = path.with_suffix(".md")
        if md.is_file():
            head = md.read_text(encoding="utf-8").split("\n\n", 1)[0]
            md.write_text(f"{head}\n\nRe-graded {stamp} with the current grader ({len(changed)} of "
                          f"{len(payload['runs'])} runs changed).\n\n{table}", encoding="utf-8")
    print(f"{len(changed)} of {len(payload['runs'])} runs graded differently; {path} rewritten\n\n{table}")
    return 0


async def amain(args: argparse.Namespace) -> int:
    if args.regrade:
        return regrade(args)
    methods = _methods(args)
    questions = _questions(args)
    if args.dump_questions:
        save_jsonl(questions, args.dump_questions)
        print(f"wrote {len(questions)} questions to {args.dump_questions}")
        return 0
    timeout = args.timeout or (QUICK_TIMEOUT_S if args.quick else 240.0)
    deadline = args.deadline or (QUICK_DEADLINE_S if args.quick else None)
    tools = load_tools(args.tools, args.tool_latency) if args.tools else eval_tools(args.tool_latency)
    merge = merge_name(args)
    overrides = json.loads(args.apr_config)
    if not isinstance(overrides, dict):
        raise ValueError("--apr-config must be a JSON object")
    settings = AgentSettings(max_tokens=args.max_tokens, max_threads=args.max_threads, max_depth=args.max_depth,
                             system=args.system, timeout_s=timeout, config_overrides=overrides,
                             lenient_tool_calls=args.lenient_tool_calls, merge=merge)
    settings.apr_config(parallel=True)  # an invalid field fails here, before the model loads
    t0 = time.perf_counter()
    backend = make_backend(args.backend, model=args.model, base_url=args.base_url, grammar=args.grammar,
                           n_ctx=args.n_ctx, n_threads=args.n_threads, questions=questions,
                           jump_forward=args.jump_forward == "on")
    if hasattr(backend, "start"):
        await backend.start()
    format_options = json.loads(args.format_options)
    if format_options:
        fmt = getattr(backend, "prompt_format", None)
        for key, value in format_options.items():
            if fmt is None or not hasattr(fmt, key):
                raise ValueError(f"--format-options: {type(fmt).__name__} has no option {key!r}")
            setattr(fmt, key, value)
    load_s = time.perf_counter() - t0
    if not args.quiet:
        print(f"backend {args.backend} ({_model_name(backend, args) or 'default'}) ready in "
              f"{load_s:.1f} s; {len(questions)} questions x {len(methods)} methods", flush=True)

    name = args.name or f"{'quick' if args.quick else 'full'}-{args.backend}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{name}.runs.jsonl"  # one line per finished run, so a killed eval keeps its data
    partial.write_text("", encoding="utf-8")

    def progress(r: RunResult, done: int, total: int) -> None:
        with partial.open("a", encoding="utf-8") as f:
            f.write(json.dumps(r.to_dict(), default=str) + "\n")
        if args.quiet:
            return
        mark = "skip" if r.skipped else ("ok  " if r.correct else ("TIME" if r.timed_out else "x   "))
        print(f"[{done:>3}/{total}] {mark} {r.method:<9} {r.question_id} {r.type:<22} {r.wall_s:6.1f} s "
              f"{(r.error or r.answer)[:70]!r}", flush=True)

    started = time.time()
    isolate = args.isolate == "on" or (args.isolate == "auto" and args.concurrency == 1 and can_isolate(backend))
    results = await run_eval(backend, questions, methods, tools, settings, concurrency=args.concurrency,
                             deadline_s=deadline, progress=progress, isolate=isolate)
    elapsed = time.time() - started
    stats = getattr(backend, "stats", None)
    engine_stats = stats() if callable(stats) else {}
    close = getattr(backend, "close", None)
    if callable(close):
        res = close()
        if asyncio.iscoroutine(res):
            await res

    runs = [r.to_dict() for r in results]
    report = summarize(runs, methods)
    command = " ".join(["apr eval", *(shlex.quote(a) for a in args.argv)])
    meta = {"command": command, "backend": args.backend, "model": str(_model_name(backend, args)),
            "methods": methods, "questions": len(questions), "seed": args.seed, "tool_latency_s": args.tool_latency,
            "timeout_s": timeout, "deadline_s": deadline, "concurrency": args.concurrency, "isolated": isolate,
            "max_tokens": args.max_tokens, "max_threads": args.max_threads, "max_depth": args.max_depth,
            "apr_config": overrides, "merge": merge, "format_options": format_options,
            "grammar": args.grammar, "n_threads": getattr(backend, "n_threads", args.n_threads),  # as the engine ran
            "jump_forward": args.jump_forward,
            "engine_stats": engine_stats,
            "lenient_tool_calls": args.lenient_tool_calls, "system": args.system,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "elapsed_s": round(elapsed, 1),
            "backend_load_s": round(load_s, 1), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    partial.unlink(missing_ok=True)  # everything is in NAME.json now
    payload = {"meta": meta, "report": report, "runs": runs,
               "question_set": [q.model_dump(include={"id", "question", "type", "parts", "grading", "answer"})
                                for q in questions]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    table = markdown(report)
    head = (f"`{command}`: backend {args.backend}, model `{meta['model']}`, {len(questions)} questions, "
            f"tool latency {args.tool_latency:g} s, {meta['started_utc']}, {elapsed:.0f} s in all "
            f"({meta['machine']}).\n\n")
    (out / f"{name}.md").write_text(head + table, encoding="utf-8")
    if args.doc:
        update_doc(Path(args.doc), name, head + table + f"\nResults: `{out / (name + '.json')}`.\n")
    if args.plot and plot(report, str(out / f"{name}.png")) and not args.quiet:
        print(f"plot: {out / (name + '.png')}")
    if not args.quiet:
        print()
        print(table)
        print(f"results: {out / (name + '.json')} and {out / (name + '.md')} ({elapsed:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from apr_agents.backends.base import BackendError

    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, ImportError, FileNotFoundError, LookupError, BackendError) as exc:
        print(f"apr eval: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
