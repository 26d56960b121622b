"""Checkpointing: InMemorySaver, SqliteSaver, AsyncSqliteSaver, and a real SIGKILL mid-fan-out.

The kill test runs tests/durable_child.py in a child process, waits (by reading
the child's logs and the SQLite file, not by guessing a sleep) until two of
four branches have finished and their writes are on disk while the other two
are blocked in a tool call, kills the child with SIGKILL, and resumes the same
thread in a new process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from apr_agents import create_apr_agent
from apr_agents.graph.durable import NothingToResume, RunInProgress, run_with_checkpoint
from apr_agents.testing import ScriptedBackend

CHILD = Path(__file__).with_name("durable_child.py")
ROOT = CHILD.parent.parent


def call(name: str, **args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


@tool
async def echo(text: str) -> str:
    """Return the text."""
    return f"echo {text}"


SCRIPT = {
    "": "Go.\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\nDone: both.",
    "1": f" {call('echo', text='one')} a ok</Thread>",
    "2": " nested\n<Parallel>\n<Outlines>\n<Outline>1: c</Outline>\n</Outlines>\nb ok</Thread>",
    "2/1": f" {call('echo', text='deep')} c ok</Thread>",
}
Q = {"messages": [HumanMessage("q")]}


def check_state(state: dict) -> None:
    assert state["messages"][-1].content == "Done: both."
    transcript = state["apr_trace"]["transcript"]
    for piece in ("<tool_response>echo one</tool_response>", "<tool_response>echo deep</tool_response>",
                  "b ok</Thread>"):
        assert piece in transcript
    assert sorted(state["apr_trace"]["contexts"]) == ["root", "root/1.1", "root/1.2", "root/1.2/1.1"]


async def test_in_memory_saver_keeps_state_and_each_branch_step() -> None:
    """With a checkpointer each branch step (and each nested child) is a LangGraph task whose
    result is saved as a write of the superstep the ``branch`` nodes ran in."""
    from langgraph.checkpoint.memory import InMemorySaver

    saver = InMemorySaver()
    graph = create_apr_agent(ScriptedBackend(SCRIPT), [echo], checkpointer=saver)
    cfg = {"configurable": {"thread_id": "mem-1"}}
    steps = 0
    async for ev in graph.astream(Q, cfg, stream_mode="custom"):
        steps += ev.get("apr") == "step" and ev["node"] != "branch"
    state = (await graph.aget_state(cfg)).values
    check_state(state)
    snap = await graph.aget_state(cfg)
    assert snap.next == () and snap.values["apr_trace"]["summary"]["branches"] == 3
    returns = [w for c in saver.list(None) for w in c.pending_writes or [] if w[1] == "__return__"]
    assert steps >= 6 and len(returns) == steps + 1  # every step of the three branches, and the nested child
    # a second question on the same thread continues the conversation
    state2 = await graph.ainvoke({"messages": [HumanMessage("again")]}, cfg)
    assert [m.type for m in state2["messages"]] == ["human", "ai", "human", "ai"]


def test_sync_sqlite_saver(tmp_path: Path) -> None:
    from langgraph.checkpoint.sqlite import SqliteSaver

    with SqliteSaver.from_conn_string(str(tmp_path / "cp.sqlite")) as saver:
        graph = create_apr_agent(ScriptedBackend(SCRIPT), [echo], checkpointer=saver)
        cfg = {"configurable": {"thread_id": "sync-1"}}
        check_state(graph.invoke(Q, cfg))
        assert graph.get_state(cfg).next == ()
    with SqliteSaver.from_conn_string(str(tmp_path / "cp.sqlite")) as saver:  # a fresh connection reads it back
        graph = create_apr_agent(ScriptedBackend(SCRIPT), [echo], checkpointer=saver)
        check_state(graph.get_state({"configurable": {"thread_id": "sync-1"}}).values)


async def test_run_with_checkpoint_sqlite_new_resume_and_errors(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    backend = ScriptedBackend(SCRIPT)

    def factory(cp: object) -> object:
        return create_apr_agent(backend, [echo], checkpointer=cp)

    events: list[dict] = []
    state = await run_with_checkpoint(factory, "q", db, "t-1", False, on_event=events.append)
    check_state(state)
    kinds = Counter(e["apr"] for e in events)
    assert kinds["spawn"] == 2 and kinds["branch_end"] == 3 and kinds["done"] == 1
    calls = backend.calls
    again = await run_with_checkpoint(factory, None, db, "t-1", True)  # finished: nothing runs again
    check_state(again)
    assert backend.calls == calls
    with pytest.raises(NothingToResume):
        await run_with_checkpoint(factory, None, db, "no-such-thread", True)
    with pytest.raises(ValueError):
        await run_with_checkpoint(factory, None, db, "t-2", False)


async def test_a_new_question_on_an_unfinished_thread_is_refused(tmp_path: Path) -> None:
    started, gate = asyncio.Event(), asyncio.Event()

    @tool
    async def hold(x: int) -> str:
        """Waits for the test."""
        started.set()
        await gate.wait()
        return "held"

    script = {"": f"{call('hold', x=1)} fine"}
    db = tmp_path / "runs.sqlite"

    def factory(cp: object) -> object:
        return create_apr_agent(ScriptedBackend(script), [hold], checkpointer=cp)

    task = asyncio.create_task(run_with_checkpoint(factory, "q", db, "t", False))
    await asyncio.wait_for(started.wait(), 30)  # durability="sync": the step before the tool is on disk
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(RunInProgress):
        await run_with_checkpoint(factory, "another question", db, "t", False)
    gate.set()
    state = await run_with_checkpoint(factory, None, db, "t", True)
    assert state["messages"][-1].content == "fine"


def _count(db: Path, sql: str) -> int:
    con = sqlite3.connect(db, timeout=5)
    try:
        return int(con.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        con.close()




def _step_results_on_disk(db: str | Path) -> int:
    """Branch steps (LangGraph tasks) whose results the SQLite file holds, read from outside the child."""
    with sqlite3.connect(str(db), timeout=5) as con:
        try:
            return int(con.execute("SELECT count(*) FROM writes WHERE channel = '__return__'").fetchone()[0])
        except sqlite3.OperationalError:  # the tables are not there yet
            return 0


def _branch_writes_on_disk(db: str | Path) -> int:
    """Finished root-level branch tasks whose writes the store holds, read from outside the child.

    Only writes attached to the root's newest checkpoint (the step that sent the branches):
    ``prepare`` also writes ``apr_branch_results`` (its reset), under an older checkpoint.
    """
    sql = ("SELECT count(DISTINCT task_id) FROM {table} "
           "WHERE checkpoint_ns = '' AND channel = 'apr_branch_results' AND checkpoint_id = "
           "(SELECT max(checkpoint_id) FROM checkpoints WHERE checkpoint_ns = '')")
    if str(db).startswith("postgresql://"):
        import psycopg

        try:
            with psycopg.connect(str(db), connect_timeout=5) as con:
                return int(con.execute(sql.format(table="checkpoint_writes")).fetchone()[0])
        except psycopg.errors.UndefinedTable:
            return 0
    return _count(Path(db), sql.format(table="writes"))


def _lines(path: Path) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []


def _child(db: Path, work: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(CHILD), str(db), str(work), "thread-A", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mode", "store"), [("parallel", "sqlite"), ("sequential", "sqlite"),
                                             pytest.param("parallel", "postgres", marks=pytest.mark.slow)])
def test_sigkill_mid_fan_out_then_resume(tmp_path: Path, mode: str, store: str,
                                         request: pytest.FixtureRequest) -> None:
    """parallel: one Send task per branch; sequential: all four inside one ``branch`` node. Either
    way each branch step is a LangGraph task whose result is saved as it completes."""
    work = tmp_path
    db: str | Path = tmp_path / "runs.sqlite"
    if store == "postgres":
        db = request.getfixturevalue("postgres_url")
        _drop_thread(str(db), "thread-A")
    flags = ("--sequential",) if mode == "sequential" else ()
    first = _child(db, work, *flags)
    deadline = time.monotonic() + 60
    ready = False
    while time.monotonic() < deadline and first.poll() is None:
        tools = {(ev, tag) for _, ev, tag in _lines(work / "tools.log")}
        if mode == "parallel":
            # branches 1 and 2 finished and their writes are in the file; 3 and 4 are blocked in their tool
            on_disk = _branch_writes_on_disk(db)
            ready = {("end", "1"), ("end", "2"), ("start", "3"), ("start", "4")} <= tools and on_disk >= 2
        else:
            # 1 and 2 finished inside the node, their three steps' results saved, and 3's first
            # step; 3 is blocked in its tool; 4 has not started
            ready = {("end", "1"), ("end", "2"), ("start", "3")} <= tools and _step_results_on_disk(db) >= 7
        if ready:
            break
        time.sleep(0.02)
    if not ready:
        first.kill()
        out, err = first.communicate()
        pytest.fail(f"child never reached the kill point (rc={first.returncode}):\n{err[-3000:]}")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    assert first.returncode == -signal.SIGKILL
    pid1 = str(first.pid)
    assert ("end", "3") not in {(ev, tag) for _, ev, tag in _lines(work / "tools.log")}

    (work / "gate").touch()  # the resumed process's blocked tools may finish
    second = _child(db, work, "--resume", *flags)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    pid2 = str(second.pid)

    # the run finished, with every branch's work merged in outline order
    assert result["answer"] == "All parts done."
    transcript = result["transcript"]
    positions = [transcript.index(f"<tool_response>result-{i}</tool_response>") for i in range(1, 5)]
    assert positions == sorted(positions)

    calls = {pid: Counter(p for q, p in _lines(work / "calls.log") if q == pid) for pid in (pid1, pid2)}
    tools = {pid: Counter(f"{ev} {tag}" for q, ev, tag in _lines(work / "tools.log") if q == pid)
             for pid in (pid1, pid2)}
    done_before = {"start 1": 1, "end 1": 1, "start 2": 1, "end 2": 1}
    if mode == "parallel":
        # first process: the root spawned, all four branches wrote their tool call, 1 and 2 finished
        assert calls[pid1] == {"root": 1, "1": 2, "2": 2, "3": 1, "4": 1}
        assert tools[pid1] == {**done_before, "start 3": 1, "start 4": 1}
        # 3 and 4 resume from their last completed step: the tool in flight runs again, their first
        # step (the model call that asked for it) does not
        assert calls[pid2]["3"] == 1 and calls[pid2]["4"] == 1
    else:
        assert calls[pid1] == {"root": 1, "1": 2, "2": 2, "3": 1}
        assert tools[pid1] == {**done_before, "start 3": 1}
        assert calls[pid2]["3"] == 1 and calls[pid2]["4"] == 2  # 4 had not started
    # resumed process: finished branches 1 and 2 are not run again (no model call, no tool call)
    assert calls[pid2]["1"] == 0 and calls[pid2]["2"] == 0
    assert tools[pid2] == {"start 3": 1, "end 3": 1, "start 4": 1, "end 4": 1}
    assert calls[pid2]["root"] == 2  # after the first merge, after the second
    # the thread budget survives the restart: 4 branches used before, 1 of 2 allowed after
    assert result["contexts"] == ["root", "root/1.1", "root/1.2", "root/1.3", "root/1.4", "root/2.5"]
    assert result["summary"]["branches"] == 5
    assert any(e["limit"] == "max_total_threads" and "1 of 2" in e["detail"] for e in result["limits"])


def _drop_thread(url: str, thread_id: str) -> None:
    """A reused external server may hold the thread from an earlier run."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5, autocommit=True) as con:
        for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
            try:
                con.execute(f"DELETE FROM {table} WHERE thread_id = %s", (thread_id,))
            except psycopg.errors.UndefinedTable:
                pass
