"""Scale-out measurements: routing policies and a replica killed mid-run (docs/scale-out.md).

For each policy: start ``--replicas`` llama.cpp replicas behind ``vllm-router``,
run ``--runs`` agent runs of ``apr_cli.scale.workload`` at once through it, and
report the prefix-cache hit rate (prompt tokens the replicas reused from their
KV cache / all prompt tokens, read from the replicas' own logs), the
branch-phase wall time (first branch start to last branch end, per run, from
its trace) and the total wall time. ``--kill`` adds a pass with the first
policy where one replica is SIGKILLed ``--kill-after`` seconds into the runs,
and compares every answer with the undisturbed pass of that policy.

Usage::

    python -m apr_cli.scale.bench --runs 12 --policies cache_aware consistent_hash round_robin --kill \\
        --json out/scale-engines.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from .engines import POLICIES, EngineCluster
from .workload import content_ok, run_many, skeleton, workload_backend, workload_graph


async def _pass(cluster: EngineCluster, runs: int, kill_after: float | None = None) -> dict[str, Any]:
    graph = workload_graph(workload_backend(cluster.url))
    before = cluster.prefix_cache()
    t = time.perf_counter()
    task = asyncio.ensure_future(run_many(graph, list(range(runs))))
    killed = None
    if kill_after is not None:
        await asyncio.sleep(kill_after)
        victim = cluster.replicas[0]
        killed = {"replica": victim.url, "served_before_kill": victim.completions_served()}
        victim.kill()
    results = await task
    wall = time.perf_counter() - t
    after = cluster.prefix_cache()
    hit = after["hit_tokens"] - before["hit_tokens"]
    evaluated = after["evaluated_tokens"] - before["evaluated_tokens"]
    ok = [r for r in results if isinstance(r, dict)]
    phases = [r["branch_phase_s"] for r in ok if r["branch_phase_s"] is not None]
    return {
        "runs": runs, "finished": len(ok), "errors": [repr(r)[:300] for r in results if not isinstance(r, dict)],
        "content_ok": sum(content_ok(r) for r in ok), "wall_s": round(wall, 2),
        "branch_phase_mean_s": round(statistics.mean(phases), 2) if phases else None,
        "branch_phase_max_s": round(max(phases), 2) if phases else None,
        "prefix_hit_rate": round(hit / (hit + evaluated), 4) if hit + evaluated else 0.0,
        "hit_tokens": hit, "evaluated_tokens": evaluated,
        "requests_per_replica": [a - b for a, b in zip(after["requests_per_replica"],
                                                       before["requests_per_replica"], strict=True)],
        "backend_calls": sum(r["backend_calls"] for r in ok), "killed": killed,
        "answers": {r["i"]: r["transcript"] for r in ok},
    }


async def measure(policies: list[str], runs: int, replicas: int, kill: bool, kill_after: float,
                  ram_cache: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "replicas": replicas, "policies": {}}
    for policy in policies:
        with EngineCluster(replicas, policy=policy, ram_cache=ram_cache) as cluster:
            await _pass(cluster, 2)  # warm both replicas' caches with the few-shot prefix
            out["policies"][policy] = await _pass(cluster, runs)
            if kill and policy == policies[0]:
                res = await _pass(cluster, runs, kill_after=kill_after)
                ref = out["policies"][policy]["answers"]
                res["same_as_undisturbed"] = sum(ref.get(i) == t for i, t in res["answers"].items())
                res["same_skeleton_as_undisturbed"] = sum(skeleton(ref.get(i, "")) == skeleton(t)
                                                          for i, t in res["answers"].items())
                out["kill"] = {"policy": policy, **res}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=["consistent_hash", "cache_aware", "round_robin"])
    ap.add_argument("--kill", action="store_true", help="also SIGKILL a replica mid-run (first policy)")
    ap.add_argument("--kill-after", type=float, default=4.0)
    ap.add_argument("--ram-cache", action="store_true", help="replicas keep a RAM cache of prompt states")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = asyncio.run(measure(args.policies, args.runs, args.replicas, args.kill, args.kill_after, args.ram_cache))
    rows = [(p, r) for p, r in out["policies"].items()] + ([("kill:" + out["kill"]["policy"], out["kill"])]
                                                          if "kill" in out else [])
    print("| policy | runs finished | content ok | prefix hit rate | branch phase mean s | max s | wall s | "
          "requests per replica |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['finished']}/{r['runs']} | {r['content_ok']} | {r['prefix_hit_rate']:.1%} | "
              f"{r['branch_phase_mean_s']} | {r['branch_phase_max_s']} | {r['wall_s']} | {r['requests_per_replica']} |")
    if "kill" in out:
        k = out["kill"]
        print(f"kill: {k['killed']}; same transcript as undisturbed: {k['same_as_undisturbed']}/{k['finished']}, "
              f"same skeleton: {k['same_skeleton_as_undisturbed']}/{k['finished']}; "
              f"backend calls {k['backend_calls']} vs {out['policies'][out['kill']['policy']]['backend_calls']}; "
              f"errors {k['errors']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
