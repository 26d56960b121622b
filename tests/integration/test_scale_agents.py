"""Two REAL agent servers (stock langgraph-api, runtime langgraph-runtime-pg) sharing one REAL
PostgreSQL and Redis on 127.0.0.1; one server SIGKILLed during a fan-out.

The agent model is the FAKE scripted backend (``APR_SCRIPT=arith``): the test is about
durability (runs, checkpoints and the queue in Postgres), not about a model. Tool calls are
real (``calculator``, with latency) and audited in a file by every server process.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("langgraph_sdk")
from apr_cli.scale.agents import PG_VENV, _pg_bin

if not (PG_VENV / "bin" / "python").exists():
    pytest.skip("needs .venv-pg with langgraph-runtime-pg (make setup-scale)", allow_module_level=True)
if not shutil.which("redis-server"):
    pytest.skip("needs redis-server (apt-get install redis-server)", allow_module_level=True)
try:
    _pg_bin("initdb")
except FileNotFoundError:
    pytest.skip("needs PostgreSQL (apt-get install postgresql)", allow_module_level=True)

from apr_cli.scale.durability import run_durability

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


async def test_100_runs_on_two_servers_one_sigkilled_mid_fan_out_all_finish() -> None:
    report = await run_durability(100, 2, tool_latency=1.0, spread=2.0, kill_after_ends=30, timeout_s=400)
    summary = {k: v for k, v in report.items() if k != "server_logs_tail"}
    print(f"\ndurability: {summary}")
    assert report["unfinished"] == 0 and report["status_counts"] == {"success": 100}, report
    assert report["answers_ok"] == 100, report["wrong"]
    # the killed server held runs mid-fan-out, and they finished on the other server
    assert report["runs_touched_by_killed_server"] > 0 and report["tool_calls_cut_by_kill"] > 0
    assert report["runs_resumed_elsewhere"] > 0
    assert report["of_which_finished_elsewhere"] == report["tool_calls_cut_by_kill"]
    # finished (checkpointed) steps were not run again: every tool call that had ended 2 s before the
    # kill ran exactly once over both servers; only steps in flight at the kill ran again (at-least-once)
    assert report["tool_calls_ended_settle_s_before_kill"] >= 5 and report["of_which_ran_again"] == 0
    assert all(gap < report["settle_s"] for gap in report["ran_again_ended_s_before_kill"])
    assert report["tool_calls_distinct"] == 200  # two branches x one calculator call x 100 runs
