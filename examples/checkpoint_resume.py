"""Kill a run with branches in flight (``kill -9``), resume it from its thread id, lose nothing.

    python examples/checkpoint_resume.py            # uses a temp SQLite file
    python examples/checkpoint_resume.py --db runs.sqlite

The run (FAKE scripted backend, so it needs no model) spawns four branches,
each calling a "slow API" tool. Branches 1 and 2 answer at once; 3 and 4 hang
until a gate file appears. This script starts the run in a worker process,
waits until branches 1 and 2 are checkpointed and 3 and 4 are waiting on
their API, SIGKILLs the worker, opens the gate and resumes the same
``thread_id`` here. The log shows which process ran what: 1 and 2 never run
again, and 3 and 4 resume inside their branch (only the call that was in
flight repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.tools import tool

from apr_agents import create_apr_agent
from apr_agents.graph.durable import run_with_checkpoint
from apr_agents.testing import ScriptedBackend

THREAD = "resume-demo"


def call(name: str, **args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


SCRIPT = {
    "": ("Four independent lookups.\n<Parallel>\n<Outlines>\n"
         + "".join(f"<Outline>{i}: ask API {i}</Outline>\n" for i in range(1, 5))
         + "</Outlines>\nAll four answers are in."),
    **{str(i): f" asking {call('slow_api', part=i)} API {i} answered.</Thread>" for i in range(1, 5)},
}


def build(workdir: Path) -> Any:
    log = workdir / "activity.log"

    def note(text: str) -> None:
        with open(log, "a") as f:
            f.write(f"pid {os.getpid()}: {text}\n")

    @tool
    async def slow_api(part: int) -> str:
        """A remote API; parts 3 and 4 hang until the gate file exists."""
        note(f"tool call for part {part}")
        while part > 2 and not (workdir / "gate").exists():  # noqa: ASYNC110 - another process opens it
            await asyncio.sleep(0.05)
        return f"value-{part}"

    class LoggedBackend(ScriptedBackend):
        async def stream(self, prompt: str, **kw: Any) -> Any:
            note(f"model call for context {self.context_of(prompt)[0] or 'root'}")
            async for item in super().stream(prompt, **kw):
                yield item

    return lambda checkpointer: create_apr_agent(LoggedBackend(SCRIPT), [slow_api], checkpointer=checkpointer)


def branches_on_disk(db: Path) -> int:
    """Branches of the root's spawn whose results the checkpoint file already holds."""
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return int(con.execute("SELECT count(DISTINCT task_id) FROM writes WHERE checkpoint_ns = '' "
                                   "AND channel = 'apr_branch_results'").fetchone()[0])
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", help="SQLite checkpoint file (default: a temp file)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="apr-resume-"))
    db = Path(args.db or workdir / "runs.sqlite")
    factory = build(workdir)

    if args.worker:  # the process that gets killed
        asyncio.run(run_with_checkpoint(factory, "Ask the four APIs.", db, THREAD, resume=False))
        return

    if db.exists():
        db.unlink()
    worker = subprocess.Popen([sys.executable, __file__, "--worker", "--workdir", str(workdir), "--db", str(db)])
    deadline = time.monotonic() + 60
    while branches_on_disk(db) < 2 or "part 4" not in _read(workdir / "activity.log"):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the worker ended early")
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    print(f"killed worker {worker.pid} (exit {worker.returncode}) with branches 3 and 4 in flight\n")

    (workdir / "gate").touch()
    t0 = time.perf_counter()
    state = asyncio.run(run_with_checkpoint(factory, None, db, THREAD, resume=True))
    print(_read(workdir / "activity.log"))
    print(f"resumed in {time.perf_counter() - t0:.2f} s in pid {os.getpid()}")
    print("answer:", state["messages"][-1].content)
    transcript = state["apr_trace"]["transcript"]
    print("merged, in outline order:", [line.split(":")[0] for line in transcript.splitlines()
                                        if line.startswith("<Thread>")])
    print("checkpoints in", db)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


if __name__ == "__main__":
    main()
