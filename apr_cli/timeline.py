"""Pictures and text views of a trace: a timeline PNG and a rich tree of threads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.tree import Tree

from apr_agents.runtime.trace import engine_span


def _children(ctxs: dict[str, dict[str, Any]], cid: str) -> list[str]:
    return [k for group in ctxs.get(cid, {}).get("spawns", []) for k in group if k in ctxs]


def thread_tree(trace: dict[str, Any], *, live: dict[str, dict[str, Any]] | None = None) -> Tree:
    """A rich Tree of contexts: label, outline, tokens, tools, how it ended."""
    ctxs = trace.get("contexts", {})
    live = live or {}

    def label(cid: str) -> str:
        rec = {**ctxs.get(cid, {}), **live.get(cid, {})}
        name = "root" if cid == "root" else f"thread {rec.get('label') or cid.rsplit('.', 1)[-1]}"
        outline = rec.get("outline")
        head = f"[bold]{name}[/bold]" + (f" [dim]{outline[:60]}[/dim]" if outline else "")
        bits = []
        if rec.get("completion_tokens") is not None:
            bits.append(f"{rec.get('completion_tokens', 0)} tok")
        tools = rec.get("tool_calls") or []
        if tools:
            bits.append(f"{len(tools)} tool call{'s' if len(tools) != 1 else ''}")
        if rec.get("started") and rec.get("ended"):
            bits.append(f"{rec['ended'] - rec['started']:.2f} s")
        end = rec.get("end")
        state = f"[green]{end}[/green]" if end in ("eos", "thread_end") else (
            f"[yellow]{end}[/yellow]" if end else "[cyan]running[/cyan]")
        return f"{head}  {' · '.join(bits)}  {state}"

    def build(node: Tree, cid: str, depth: int = 0) -> None:
        if depth > 64:
            return
        for kid in _children(ctxs, cid) or [k for k, v in live.items() if v.get("parent") == cid]:
            build(node.add(label(kid)), kid, depth + 1)

    tree = Tree(label("root"))
    build(tree, "root")
    return tree


def plot_timeline(trace: dict[str, Any], path: str | Path, *, title: str = "apr-agents run") -> Path:
    """One bar per context from start to end, its model calls and tool calls drawn inside: where
    time went, and which contexts' model calls ran at the same time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = trace.get("contexts", {})
    order: list[str] = []

    def walk(cid: str) -> None:
        order.append(cid)
        for k in _children(ctxs, cid):
            walk(k)

    if "root" in ctxs:
        walk("root")
    t0 = min((c["started"] for c in ctxs.values() if c.get("started")), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(3, len(order)) + 1))
    for row, cid in enumerate(order):
        rec = ctxs[cid]
        start = rec.get("started") or t0
        end = rec.get("ended") or start
        ax.barh(row, end - start, left=start - t0, color="#4C78A8" if rec.get("depth", 0) else "#F58518",
                alpha=0.55, height=0.6)
        for mc in rec.get("model_calls", []):  # the call: light; the engine's own span of it: dark
            ax.barh(row, mc.get("duration_s", 0), left=mc["started"] - t0, color="#B8C4D6", height=0.3)
            busy_from, busy_to = engine_span(mc)
            ax.barh(row, busy_to - busy_from, left=busy_from - t0, color="#1F3A5F", height=0.3)
        for tc in rec.get("tool_calls", []):
            ax.barh(row, tc.get("duration_s", 0), left=tc["started"] - t0, color="#54A24B", height=0.3)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(["root" if c == "root" else c.replace("root/", "") for c in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since start (dark blue: the engine on a model call, light: waiting for it; "
                  "green: tool calls)")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
