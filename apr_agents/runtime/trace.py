"""The run trace (SPEC §5): a JSON-serialisable record per context and its summary.

``merge_traces`` folds one trace write into another: parallel branches each
return their own records and they fold together without clobbering each
other. A write is a delta: a context's scalar fields replace the old ones, its
``model_calls`` (start, duration, the engine's own span and tokens of each model call), ``tool_calls`` and
``spawns`` are appended (a step writes only the ones it
added), ``limits`` and ``repairs`` are appended without duplicates. So a step's
write stays the size of what the step did, whatever the run's length, and the
graph keeps the trace in a ``DeltaChannel`` (``graph/state.py``). A new run
resets it with LangGraph's ``Overwrite``.
"""

from __future__ import annotations

import time
from typing import Any


def new_record(cid: str, *, parent: str | None, depth: int, label: str | None,
               outline: str | None) -> dict[str, Any]:
    """A context's trace record as it starts (SPEC §5); both agent modes fill in the rest."""
    return {"id": cid, "parent": parent, "depth": depth, "label": label, "outline": outline,
            "started": time.time(), "ended": None, "prompt_tokens": 0, "completion_tokens": 0,
            "cached_prompt_tokens": 0, "calls": 0, "model_calls": [], "tool_calls": [], "spawns": [],
            "end": None, "truncated": False}


#: context-record lists that a write appends to (a step writes only its new entries)
APPENDED = ("model_calls", "tool_calls", "spawns")


def merge_traces(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    if not right:
        return left or {}
    out = dict(left or {})
    for key, val in right.items():
        if key == "contexts":
            ctxs = dict(out.get("contexts", {}))
            for cid, rec in val.items():
                old = ctxs.get(cid, {})
                new = {**old, **rec}
                for grows in APPENDED:
                    if grows in rec and old.get(grows):
                        new[grows] = [*old[grows], *rec[grows]]
                ctxs[cid] = new
            out["contexts"] = ctxs
        elif key in ("limits", "repairs"):
            seen = {_key(e) for e in out.get(key, [])}
            merged = list(out.get(key, []))
            for e in val:
                if _key(e) not in seen:
                    seen.add(_key(e))
                    merged.append(e)
            out[key] = merged
        else:
            out[key] = val
    return out


def _key(e: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, str(v)) for k, v in e.items()))


def critical_path_tokens(contexts: dict[str, dict[str, Any]], root: str) -> int:
    """Longest chain of sequential tokens through the spawn tree.

    A context's own tokens are sequential; each of its spawns adds the slowest
    branch of that spawn, since the parent waits for the merge.
    """
    memo: dict[str, int] = {}

    def cp(cid: str, depth: int = 0) -> int:
        if cid in memo:
            return memo[cid]
        rec = contexts.get(cid, {})
        total = int(rec.get("completion_tokens", 0))
        if depth < 10_000:
            for group in rec.get("spawns", []):
                kids = [cp(k, depth + 1) for k in group if k in contexts]
                total += max(kids, default=0)
        memo[cid] = total
        return total

    return cp(root)


def max_concurrent(contexts: dict[str, dict[str, Any]]) -> int:
    """The most branches alive at one time."""
    spans = [(float(rec["started"]), float(rec.get("ended") or rec["started"])) for rec in contexts.values()
             if rec.get("depth", 0) >= 1 and rec.get("started") is not None]
    return _most_at_once(spans)


def engine_span(call: dict[str, Any]) -> tuple[float, float]:
    """The span a ``model_calls`` record had on the engine: the engine's own where the backend
    reported it, else the call's span as the runtime saw it."""
    if "engine_started" in call:
        return float(call["engine_started"]), float(call["engine_ended"])
    return float(call["started"]), float(call["started"]) + float(call.get("duration_s") or 0.0)


def max_concurrent_model_calls(contexts: dict[str, dict[str, Any]]) -> int:
    """The most model calls the engine worked on at one time, over every context (``engine_span``:
    a serial engine reads 1 however many branches wait for it, a batching engine more)."""
    return _most_at_once([engine_span(m) for rec in contexts.values() for m in rec.get("model_calls", [])])


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = [edge for start, end in spans for edge in ((start, 1), (end, -1))]
    alive = best = 0
    for _, d in sorted(edges, key=lambda e: (e[0], e[1])):
        alive += d
        best = max(best, alive)
    return best


def summarize(trace: dict[str, Any], root: str = "root") -> dict[str, Any]:
    ctxs: dict[str, dict[str, Any]] = trace.get("contexts", {})
    root_rec = ctxs.get(root, {})
    started = [r["started"] for r in ctxs.values() if r.get("started") is not None]
    ended = [r["ended"] for r in ctxs.values() if r.get("ended") is not None]
    tool_calls = [t for r in ctxs.values() for t in r.get("tool_calls", [])]
    total = sum(int(r.get("completion_tokens", 0)) for r in ctxs.values())
    cp = critical_path_tokens(ctxs, root)
    return {
        "contexts": len(ctxs),
        "branches": sum(1 for r in ctxs.values() if r.get("depth", 0) >= 1),
        "max_depth": max((r.get("depth", 0) for r in ctxs.values()), default=0),
        "total_tokens": total,
        "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in ctxs.values()),
        "critical_path_tokens": cp,
        "token_latency_ratio": round(total / cp, 4) if cp else None,
        "wall_time_s": round(max(ended) - min(started), 6) if started and ended else None,
        "max_concurrent_branches": max_concurrent(ctxs),
        "max_concurrent_model_calls": max_concurrent_model_calls(ctxs),
        "model_call_s": round(sum(float(m.get("duration_s") or 0.0) for r in ctxs.values()
                                  for m in r.get("model_calls", [])), 4),
        "backend_calls": sum(int(r.get("calls", 0)) for r in ctxs.values()),
        "tool_calls": len(tool_calls),
        "tool_errors": sum(1 for t in tool_calls if t.get("error")),
        "limits_hit": sorted({e["limit"] for e in trace.get("limits", [])}),
        "repairs": len(trace.get("repairs", [])),
        "end": root_rec.get("end"),
    }
