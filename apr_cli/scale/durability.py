"""Two agent servers, one PostgreSQL: SIGKILL one during a fan-out, every run still finishes.

Starts PostgreSQL, Redis and ``--servers`` stock LangGraph servers with the
``pg`` runtime (``apr_cli.scale.agents``), sends ``--runs`` runs spread over
the servers' HTTP APIs (``Compute a*b + c*d.``: the root spawns two branches,
each calls ``calculator``), SIGKILLs the first server once it has finished
``--kill-after-ends`` tool calls (so it holds runs whose one branch is done and
the other is still in its tool call), and waits for every run through the
survivors. The model is the FAKE scripted backend (``APR_SCRIPT=arith``): what
is tested is durability, not a model. Each tool call takes
``--tool-latency`` plus up to ``--spread`` seconds, fixed by its arguments, so the
two branches of a run finish at different times.

It reports and checks:
- every run's status is ``success`` and its answer is its own ``a*b + c*d``;
- which runs were on the killed server (their tool calls' process id), and
  that they finished on another;
- from the tool audit log (``APR_TOOL_LOG``): every tool call that had ended
  ``settle_s`` (2 s) before the kill, so that its step's checkpoint was written,
  ran exactly once over all servers; calls cut by the kill, and calls whose
  step had ended but was not yet checkpointed, ran again (at-least-once per
  step), and are counted with how long before the kill they had ended.

Usage::

    python -m apr_cli.scale.durability --runs 100 --json out/scale-durability.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from apr_agents.testing.scripts import arith_question

from .agents import AgentServer, Postgres, Redis


def _audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def run_durability(runs: int = 100, servers: int = 2, *, tool_latency: float = 1.0, spread: float = 2.0,
                         kill_after_ends: int = 20, timeout_s: float = 300.0, heartbeat_s: float = 5.0,
                         settle_s: float = 2.0, settled_ends: int = 5,
                         log_dir: Path | None = None) -> dict[str, Any]:
    from langgraph_sdk import get_client

    base = Path(tempfile.mkdtemp(prefix="apr-durability-"))
    os.chmod(base, 0o755)
    logs = log_dir or base
    audit = base / "tools.jsonl"
    env = {"APR_BACKEND": "scripted", "APR_SCRIPT": "arith", "APR_TOOLS": "calculator",
           "APR_TOOL_LATENCY_S": str(tool_latency), "APR_TOOL_LATENCY_SPREAD_S": str(spread),
           "APR_TOOL_LOG": str(audit), "APR_LLM_CONCURRENCY": "256", "APR_TOOL_CONCURRENCY": "256",
           "APR_TOOL_RATE_PER_S": "none"}
    report: dict[str, Any] = {"runs": runs, "servers": servers, "tool_latency_s": tool_latency, "spread_s": spread,
                              "heartbeat_s": heartbeat_s}
    t0 = time.perf_counter()
    try:
        with Postgres(base) as pg, Redis(base) as redis:
            procs: list[AgentServer] = []
            try:
                for _ in range(servers):  # one after another: the first one migrates the database
                    procs.append(AgentServer(pg.uri, redis.uri, logs, env, n_jobs=runs, heartbeat_s=heartbeat_s))
                    procs[-1].ready()
                report["start_s"] = round(time.perf_counter() - t0, 1)
                clients = [get_client(url=p.url) for p in procs]
                victim, survivors = procs[0], procs[1:]
                gate = asyncio.Semaphore(16)

                async def send(i: int) -> tuple[int, str, str, int]:
                    client = clients[i % servers]  # the runs go in through every server's API
                    question, expected = arith_question(i)
                    async with gate:
                        thread = await client.threads.create()
                        run = await client.runs.create(thread["thread_id"], "apr", durability="sync",
                                                       input={"messages": [{"role": "human", "content": question}]})
                    return i, thread["thread_id"], run["run_id"], expected

                t_send = time.perf_counter()
                jobs = list(await asyncio.gather(*(send(i) for i in range(runs))))
                report["send_s"] = round(time.perf_counter() - t_send, 2)

                deadline = time.monotonic() + timeout_s

                def kill_now() -> bool:
                    """The victim finished ``kill_after_ends`` tool calls, and ``settled_ends`` calls ended
                    ``settle_s`` ago (their steps are durable by then): what the report checks is there."""
                    ends = [e for e in _audit(audit) if e["event"] == "end"]
                    settled = sum(1 for e in ends if e["t"] < time.time() - settle_s)
                    return sum(1 for e in ends if e["pid"] == victim.proc.pid) >= kill_after_ends \
                        and settled >= settled_ends

                while not kill_now():
                    if time.monotonic() > deadline or not victim.alive():
                        raise TimeoutError("the victim server never finished enough tool calls")
                    await asyncio.sleep(0.05)
                victim.kill()
                t_kill = time.time()
                t_kill_perf = time.perf_counter()
                report["killed_after_s"] = round(t_kill_perf - t_send, 2)

                survivor = get_client(url=survivors[0].url)
                statuses: dict[str, str] = {}
                while len(statuses) < runs and time.monotonic() < deadline:
                    for _i, thread_id, run_id, _ in jobs:
                        if run_id in statuses:
                            continue
                        run = await survivor.runs.get(thread_id, run_id)
                        if run["status"] in ("success", "error", "timeout", "interrupted"):
                            statuses[run_id] = run["status"]
                    await asyncio.sleep(0.5)
                report["recovered_s"] = round(time.perf_counter() - t_kill_perf, 2)
                report["total_s"] = round(time.perf_counter() - t_send, 2)

                answers_ok, wrong = 0, []
                for i, thread_id, run_id, expected in jobs:
                    state = await survivor.threads.get_state(thread_id)
                    answer = (state["values"].get("messages") or [{}])[-1].get("content")
                    if statuses.get(run_id) == "success" and answer == f"Answer: {expected}":
                        answers_ok += 1
                    else:
                        wrong.append({"i": i, "status": statuses.get(run_id), "answer": answer})
                report["status_counts"] = dict(collections.Counter(statuses.values()))
                report["unfinished"] = runs - len(statuses)
                report["answers_ok"] = answers_ok
                report["wrong"] = wrong[:10]
            finally:
                for p in procs:
                    p.stop()
                report["server_logs_tail"] = {p.url: p.log_tail(600) for p in procs if report.get("answers_ok") != runs}
    finally:
        events = _audit(audit)
        shutil.rmtree(base, ignore_errors=True)

    victim_pid = procs[0].proc.pid
    ends: collections.Counter[tuple[str, str]] = collections.Counter()
    first_end: dict[tuple[str, str], float] = {}
    for e in events:
        key = (e["thread"], json.dumps(e["args"], sort_keys=True))
        if e["event"] == "end":
            ends[key] += 1
            first_end.setdefault(key, e["t"])
    on_victim = {e["thread"] for e in events if e["pid"] == victim_pid}
    # A tool call's end is logged before its step's checkpoint is written; under load the write
    # lags. Calls that ended ``settle_s`` before the kill belong to steps that were durable.
    finished_before = [k for k, t in first_end.items() if t < t_kill - settle_s]
    ran_again = [k for k, n in ends.items() if n > 1]
    report["settle_s"] = settle_s
    report["ran_again_ended_s_before_kill"] = sorted(round(t_kill - first_end[k], 2) for k in ran_again)
    report["runs_touched_by_killed_server"] = len(on_victim)
    report["runs_resumed_elsewhere"] = len({e["thread"] for e in events
                                            if e["thread"] in on_victim and e["pid"] != victim_pid})
    report["tool_calls_ended_settle_s_before_kill"] = len(finished_before)
    report["of_which_ran_again"] = sum(1 for k in finished_before if ends[k] > 1)
    done_on_victim = {(e["thread"], json.dumps(e["args"], sort_keys=True)) for e in events
                      if e["event"] == "end" and e["pid"] == victim_pid}
    cut = {(e["thread"], json.dumps(e["args"], sort_keys=True)) for e in events
           if e["event"] == "start" and e["pid"] == victim_pid} - done_on_victim
    report["tool_calls_cut_by_kill"] = len(cut)
    report["of_which_finished_elsewhere"] = sum(1 for k in cut if ends[k] >= 1)
    report["ran_again_detail"] = [
        {"args": k[1], "events": [(e["event"], "killed" if e["pid"] == victim_pid else "other",
                                   round(e["t"] - t_kill, 2)) for e in events
                                  if (e["thread"], json.dumps(e["args"], sort_keys=True)) == k]}
        for k, n in ends.items() if n > 1][:10]
    report["tool_ends_total"] = sum(ends.values())
    report["tool_calls_distinct"] = len(ends)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--tool-latency", type=float, default=1.0)
    ap.add_argument("--spread", type=float, default=2.0)
    ap.add_argument("--kill-after-ends", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--heartbeat", type=float, default=5.0, help="LG_BG_JOB_HEARTBEAT of the servers (s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    report = asyncio.run(run_durability(args.runs, args.servers, tool_latency=args.tool_latency, spread=args.spread,
                                        kill_after_ends=args.kill_after_ends, timeout_s=args.timeout,
                                        heartbeat_s=args.heartbeat))
    print(json.dumps({k: v for k, v in report.items() if k != "server_logs_tail"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
