"""The eval's report: accuracy with a Wilson interval, latency percentiles, tokens, ratios vs ReAct.

``summarize(runs)`` turns ``RunResult`` dicts into a JSON-ready report:

- ``methods``: per method, accuracy (k/n and a 95 % Wilson interval), wall time
  p50/p95, mean total and critical-path tokens, spawn rate (plugin methods),
  timeouts, errors, skipped runs;
- ``by_type`` and ``by_parts``: accuracy and p50 wall time per method;
- ``vs_react``: on questions with at least ``min_parts`` parts that both the
  method and ``react`` ran, the median and pooled wall-time speed-up over
  ``react`` (above 1 is faster), token and tool-call ratios, both accuracies, and
  the speed-up on the questions both answered right (a baseline that skipped
  lookups and guessed is fast for the wrong reason);
- ``vs_sequential``: the same pairing of ``apr`` with ``apr-seq`` (the plugin with
  ``parallel=False``), when both ran: what running a spawn's branches at once buys
  at equal accuracy, and on how many questions the two answers were graded alike.

``markdown(report)`` renders it as tables for ``docs/eval.md``.

Example::

    report = summarize([r.to_dict() for r in results])
    print(markdown(report))
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95 % by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear-interpolated percentile (as numpy's default), None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * p / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.fmean(xs) if xs else None


def _acc(runs: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(runs)
    k = sum(1 for r in runs if r["correct"])
    lo, hi = wilson(k, n)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": [lo, hi]}


def method_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in runs if not r.get("skipped")]
    walls = [r["wall_s"] for r in ran]
    spawn_flags = [r["spawned"] for r in ran if r.get("spawned") is not None]
    return {
        **_acc(ran),
        "skipped": sum(1 for r in runs if r.get("skipped")),
        "timeouts": sum(1 for r in ran if r.get("timed_out")),
        "errors": sum(1 for r in ran if r.get("error") and not r.get("timed_out")),
        "wall_p50_s": percentile(walls, 50),
        "wall_p95_s": percentile(walls, 95),
        "wall_total_s": sum(walls),
        "total_tokens_mean": _mean(r.get("total_tokens") for r in ran),
        "critical_path_tokens_mean": _mean(r.get("critical_path_tokens") for r in ran),
        "prompt_tokens_mean": _mean(r.get("prompt_tokens") for r in ran),
        "tool_calls_mean": _mean(r.get("tool_calls") for r in ran),
        "spawn_rate": (sum(spawn_flags) / len(spawn_flags)) if spawn_flags else None,
    }


def _group(runs: list[dict[str, Any]], key: str) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("skipped"):
            continue
        groups.setdefault((str(r[key]), r["method"]), []).append(r)
    for (g, m), rs in sorted(groups.items()):
        out.setdefault(g, {})[m] = {**_acc(rs), "wall_p50_s": percentile([r["wall_s"] for r in rs], 50),
                                    "spawn_rate": _mean(float(r["spawned"]) for r in rs
                                                        if r.get("spawned") is not None)}
    return out


def _speedup_p50(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> float | None:
    """Median of baseline time / method time over (method run, baseline run) pairs."""
    return percentile([b["wall_s"] / a["wall_s"] for a, b in pairs if a["wall_s"] > 0], 50)


def vs_baseline(runs: list[dict[str, Any]], baseline: str = "react", min_parts: int = 3,
                methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Paired comparison of ``methods`` (default: every other method) with ``baseline`` on questions
    with at least ``min_parts`` parts."""
    by = {(r["question_id"], r["method"]): r for r in runs if not r.get("skipped") and r["parts"] >= min_parts}
    out: dict[str, Any] = {}
    for m in sorted({m for _, m in by}):
        if m == baseline or (methods is not None and m not in methods):
            continue
        pairs = [(by[(q, m)], by[(q, baseline)]) for q, mm in by if mm == m and (q, baseline) in by]
        if not pairs:
            continue
        tot_a, tot_b = sum(a["wall_s"] for a, _ in pairs), sum(b["wall_s"] for _, b in pairs)
        right = [(a, b) for a, b in pairs if a["correct"] and b["correct"]]
        worked = [(a, b) for a, b in pairs if (b.get("tool_calls") or 0) >= b["parts"]]

        def ratio(key: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]] = pairs) -> float | None:
            xs = [(a.get(key), b.get(key)) for a, b in pairs]
            xs = [(x, y) for x, y in xs if x is not None and y]
            return sum(x for x, _ in xs) / sum(y for _, y in xs) if xs else None

        out[m] = {"questions": len(pairs), "speedup_p50": _speedup_p50(pairs),
                  "speedup_pooled": (tot_b / tot_a) if tot_a else None,
                  "total_tokens_ratio": ratio("total_tokens"),
                  "critical_path_tokens_ratio": ratio("critical_path_tokens"),
                  "tool_calls_ratio": ratio("tool_calls"),
                  "accuracy": sum(a["correct"] for a, _ in pairs) / len(pairs),
                  "baseline_accuracy": sum(b["correct"] for _, b in pairs) / len(pairs),
                  # a baseline that is fast because it skipped lookups and guessed is no
                  # yardstick: the same speed-up where both answered right
                  "both_right": len(right),
                  "graded_alike": sum(a["correct"] == b["correct"] for a, b in pairs),
                  "speedup_p50_both_right": _speedup_p50(right),
                  # ... nor where it was right by chance: the same speed-up where it made at
                  # least one tool call per part (it did the lookups the method did, or more)
                  "baseline_did_every_part": len(worked),
                  "speedup_p50_baseline_did_every_part": _speedup_p50(worked)}
    return {"baseline": baseline, "min_parts": min_parts, "methods": out}


def summarize(runs: list[dict[str, Any]], methods: Sequence[str] | None = None) -> dict[str, Any]:
    order = list(methods) if methods else list(dict.fromkeys(r["method"] for r in runs))
    return {
        "methods": {m: method_stats([r for r in runs if r["method"] == m]) for m in order},
        "by_type": _group(runs, "type"),
        "by_parts": _group(runs, "parts"),
        "vs_react": vs_baseline(runs),
        "vs_sequential": vs_baseline(runs, "apr-seq", methods=["apr"]),
    }


def _f(x: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    """Tables for ``docs/eval.md``."""
    ms = report["methods"]
    lines = ["| method | accuracy | 95 % CI | wall p50 | wall p95 | tokens (mean) | critical-path tokens | "
             "spawn rate | timeouts | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in ms.items():
        lo, hi = s["ci95"]
        lines.append(
            f"| {m} | {s['correct']}/{s['n']} ({_f((s['accuracy'] or 0) * 100, 0)} %) | {lo:.2f}–{hi:.2f} | "
            f"{_f(s['wall_p50_s'], 1, ' s')} | {_f(s['wall_p95_s'], 1, ' s')} | {_f(s['total_tokens_mean'], 0)} | "
            f"{_f(s['critical_path_tokens_mean'], 0)} | "
            f"{_f(None if s['spawn_rate'] is None else s['spawn_rate'] * 100, 0, ' %')} | {s['timeouts']} | "
            f"{s['errors']} |")
    for title, key in (("question type", "by_type"), ("parts", "by_parts")):
        groups = report[key]
        if not groups:
            continue
        names = list(ms)
        lines += ["", f"| {title} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for g in sorted(groups, key=lambda x: (int(x) if x.isdigit() else 10**9, x)):
            cells = []
            for m in names:
                c = groups[g].get(m)
                cells.append("–" if c is None else f"{c['correct']}/{c['n']}, {_f(c['wall_p50_s'], 1, ' s')}")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += _paired(report["vs_react"], "ReAct")
    lines += _paired(report.get("vs_sequential"), "the sequential plugin")
    return "\n".join(lines) + "\n"


def _paired(vs: dict[str, Any] | None, label: str) -> list[str]:
    """The table of one ``vs_baseline`` section (none when nothing was paired)."""
    if not vs or not vs["methods"]:
        return []
    lines = ["", f"Against `{vs['baseline']}` on questions with ≥ {vs['min_parts']} parts (paired; speed-up "
             f"above 1 is faster than {label}):", "",
             "| method | questions | speed-up p50 | speed-up pooled | tokens ratio | critical-path ratio | "
             f"tool-calls ratio | accuracy | `{vs['baseline']}` accuracy | graded alike | both right | "
             f"speed-up p50, both right | `{vs['baseline']}` called a tool per part | speed-up p50 there |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, v in vs["methods"].items():
        lines.append(f"| {m} | {v['questions']} | {_f(v['speedup_p50'], 2, '×')} | "
                     f"{_f(v['speedup_pooled'], 2, '×')} | {_f(v['total_tokens_ratio'], 2)} | "
                     f"{_f(v['critical_path_tokens_ratio'], 2)} | {_f(v.get('tool_calls_ratio'), 2)} | "
                     f"{v['accuracy']:.2f} | {v['baseline_accuracy']:.2f} | {v.get('graded_alike', '–')} | "
                     f"{v.get('both_right', '–')} | {_f(v.get('speedup_p50_both_right'), 2, '×')} | "
                     f"{v.get('baseline_did_every_part', '–')} | "
                     f"{_f(v.get('speedup_p50_baseline_did_every_part'), 2, '×')} |")
    return lines


def plot(report: dict[str, Any], path: str) -> bool:
    """Accuracy (with the interval) beside p50 wall time per method; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ms = report["methods"]
    names = list(ms)
    acc = [ms[m]["accuracy"] or 0 for m in names]
    err = [[a - ms[m]["ci95"][0] for m, a in zip(names, acc, strict=True)],
           [ms[m]["ci95"][1] - a for m, a in zip(names, acc, strict=True)]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(names, acc, yerr=err, capsize=4, color="#4878a8")
    ax1.set_ylim(0, 1)
    ax1.set_title("accuracy (95 % Wilson interval)")
    ax2.bar(names, [ms[m]["wall_p50_s"] or 0 for m in names], color="#a86848")
    ax2.set_title("wall time p50 (s)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


__all__ = ["markdown", "method_stats", "percentile", "plot", "summarize", "vs_baseline", "wilson"]
