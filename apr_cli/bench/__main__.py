"""``python -m apr_cli.bench [suite ...|all] [--quick] [--out docs/benchmarks]`` (also ``apr bench ...``).

Suites: ``overhead``, ``toolbound``, ``engines``, ``traces``. Each writes
``<suite>[-quick].md``, ``.json`` and, where a picture reads better, ``.png``
into ``--out``. ``main(argv) -> int`` is the entry point the ``apr`` CLI calls.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUITES = ("overhead", "toolbound", "engines", "traces")


def _runner(name: str, args: argparse.Namespace, out: Path) -> Callable[[], Any]:
    if name == "overhead":
        from . import overhead

        return lambda: overhead.run(quick=args.quick, out_dir=out)
    if name == "toolbound":
        from . import toolbound

        return lambda: toolbound.run(quick=args.quick, latency=args.tool_latency, out_dir=out)
    if name == "engines":
        from . import engines

        wanted = tuple(args.engines.split(",")) if args.engines else (
            ("embedded",) if args.quick else ("embedded", "vllm"))
        return lambda: engines.run(quick=args.quick, out_dir=out, engines=wanted)
    if name == "traces":
        from . import traces

        return lambda: traces.run(quick=args.quick, out_dir=out,
                                  directory=Path(args.traces) if args.traces else None)
    raise ValueError(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr bench", description="Benchmarks: overhead, tool-bound latency, engine batching, token latency "
        "of recorded trajectories. Writes <suite>.md, .json and .png into --out.")
    p.add_argument("suites", nargs="*", default=["all"], metavar="suite",
                   help=f"one or more of {', '.join(SUITES)}, or all (default)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (all suites < 5 min on 2 cores)")
    p.add_argument("--out", default="docs/benchmarks", help="folder for the tables, JSON and plots")
    p.add_argument("--tool-latency", type=float, default=0.2, help="tool latency L of the tool-bound suite, s")
    p.add_argument("--engines", default=None,
                   help="engines for the engines suite, comma-separated: embedded,embedded-serial,vllm "
                        "(default: both; --quick: embedded only, vLLM CPU takes minutes to start)")
    p.add_argument("--traces", default=None, help="folder of recorded trajectories (default ../shared/traces)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names: list[str] = []
    for s in args.suites:
        if s == "all":
            names += [n for n in SUITES if n not in names]
        elif s in SUITES:
            if s not in names:
                names.append(s)
        else:
            print(f"unknown suite {s!r}; choose from {', '.join(SUITES)} or all", file=sys.stderr)
            return 2
    from .common import console, machine, md_table, write_result

    out = Path(args.out)
    mach = machine()
    console.print(f"[bold]apr bench[/]: {', '.join(names)}{' (quick)' if args.quick else ''} → {out}  "
                  f"[dim]{mach['nproc']} CPU, {mach['cpu']}[/]")
    failed, goals = [], []
    t0 = time.perf_counter()
    for name in names:
        try:
            res = _runner(name, args, out)()
        except Exception:  # noqa: BLE001 - one broken suite must not hide the others' results
            console.print(f"[red]suite {name} failed[/]")
            traceback.print_exc()
            failed.append(name)
            continue
        for path in write_result(res, out, mach):
            console.print(f"  wrote {path}")
        for s in res.skipped:
            console.print(f"  [yellow]skipped[/] {s}")
        goals += [[name, g["goal"], g["measured"], g["target"],
                   "–" if g["met"] is None else ("met" if g["met"] else "NOT met")] for g in res.goals]
    if goals:
        print(md_table(["suite", "goal", "measured", "target", "status"], goals))
    console.print(f"done in {time.perf_counter() - t0:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
