"""Shared benchmark plumbing: machine facts, timing, progress, and the report files."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is just "absent"
            return "absent"

    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "langgraph": ver("langgraph"),
        "langchain-core": ver("langchain-core"),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def finite_pos(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.{digits}f}"
    return str(x)


def md_table(headers: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c, digits) for c in r) + " |")
    return "\n".join(out)


@dataclass
class SuiteResult:
    """What one suite hands back: its rows, goals, notes, and the markdown body."""

    name: str
    title: str
    quick: bool
    data: dict[str, Any] = field(default_factory=dict)
    markdown: str = ""
    goals: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    plot: str | None = None
    seconds: float = 0.0

    def goal(self, name: str, measured: float | None, target: str, met: bool | None, note: str = "") -> None:
        self.goals.append({"goal": name, "measured": measured, "target": target, "met": met, "note": note})


def write_result(res: SuiteResult, out_dir: Path, mach: dict[str, Any]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = res.name + ("-quick" if res.quick else "")
    lines = [f"# {res.title}", "",
             f"_{mach['date']} · {mach['nproc']} CPU ({mach['cpu']}) · Python {mach['python']} · "
             f"langgraph {mach['langgraph']} · load average {mach.get('load_avg_1m')} at start (shared machine) · "
             f"{'quick' if res.quick else 'full'} run · {res.seconds:.0f} s_", ""]
    if res.goals:
        lines += ["## Goals", "",
                  md_table(["goal", "measured", "target", "met", "note"],
                           [[g["goal"], g["measured"], g["target"],
                             "–" if g["met"] is None else ("met" if g["met"] else "NOT met"), g["note"]]
                            for g in res.goals]), ""]
    lines.append(res.markdown.strip())
    if res.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in res.skipped]
    if res.plot:
        lines += ["", f"![{res.name}]({Path(res.plot).name})"]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    js = out_dir / f"{stem}.json"
    payload = {"suite": res.name, "title": res.title, "quick": res.quick, "machine": mach,
               "seconds": round(res.seconds, 2), "goals": res.goals, "skipped": res.skipped,
               "data": res.data}
    js.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    written = [md, js]
    if res.plot:
        written.append(Path(res.plot))
    return written


class Bar:
    """A rich progress bar over a known number of steps (quiet when not a terminal)."""

    def __init__(self, title: str, total: int) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[what]}"),
                                 console=console, transient=False)
        self.task = self.progress.add_task(title, total=total, what="")

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, what: str = "", n: int = 1) -> None:
        self.progress.update(self.task, advance=n, what=what)

    def note(self, what: str) -> None:
        self.progress.update(self.task, what=what)


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)


def new_figure(path: Path, figsize: tuple[float, float]) -> tuple[Any, Any] | None:
    """``(fig, ax)`` on matplotlib's file-only Agg backend, or None without matplotlib (no plot then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return plt.subplots(figsize=figsize)


def save_figure(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
