"""The runnable examples that need no model or server, run as a user would (a subprocess each).

Only what each script promises to print is checked, so the examples cannot rot
silently. ``served_client.py`` runs in tests/test_server.py's world (it needs
``langgraph dev``); ``chat_model_vllm.py`` needs a ``vllm serve`` endpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


ANSWER = "Japan is the most densely populated: France 124/km2, Japan 329/km2, Kenya 95/km2."


@pytest.mark.parametrize("flags", [(), ("--durable",)], ids=["direct", "durable"])
def test_stream_branches(flags: tuple[str, ...]) -> None:
    out = run_example("examples/stream_branches.py", *flags)
    assert f"answer: {ANSWER}" in out
    for ctx in ("root/1.1", "root/1.2", "root/1.3"):
        assert f"[{ctx}] start (depth 1)" in out and f"[{ctx}] end: thread_end" in out
    assert "[root] merge: root/1.1, root/1.2, root/1.3" in out


def test_stream_branches_raw_shows_each_branch_step_as_a_task_when_durable() -> None:
    out = run_example("examples/stream_branches.py", "--raw", "--durable")
    starts = [ln for ln in out.splitlines() if "'branch_start'" in ln]
    assert len(starts) == 3 and all(ln.startswith("branch:") for ln in starts)
    assert len({ln.split()[0] for ln in starts}) == 3  # each branch's steps run under its own branch task
    steps = [ln for ln in out.splitlines() if "{'apr_step': 'root/1." in ln]
    assert len(steps) >= 6  # each branch: a lookup step, its tools, its answer


def test_user_graph_node() -> None:
    out = run_example("examples/user_graph_node.py")
    assert f"ai: {ANSWER}" in out and f"ai: {ANSWER.upper()}" in out


def test_checkpoint_resume_after_kill() -> None:
    out = run_example("examples/checkpoint_resume.py")
    assert "answer: All four answers are in." in out
    assert "merged, in outline order: ['<Thread>1', '<Thread>2', '<Thread>3', '<Thread>4']" in out
