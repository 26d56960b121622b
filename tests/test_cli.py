"""The `apr` command on the FAKE scripted backend: answer, trace file, checkpoint and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from apr_agents.testing.scripts import DEMO_QUESTION
from apr_cli.cli import main


def test_apr_run_prints_answer_and_writes_trace(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "trace.json"
    assert main(["run", DEMO_QUESTION, "--backend", "scripted", "--quiet", "--trace-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Japan is the most densely populated" in printed
    trace = json.loads(out.read_text())
    assert trace["summary"]["branches"] == 3 and trace["summary"]["tool_calls"] == 6
    assert set(trace["contexts"]) == {"root", "root/1.1", "root/1.2", "root/1.3"}


def test_apr_run_with_db_then_resume_finished_run(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "runs.sqlite")
    assert main(["run", DEMO_QUESTION, "--backend", "scripted", "--quiet", "--db", db, "--thread-id", "t1"]) == 0
    first = capsys.readouterr().out
    assert main(["run", "--resume", "t1", "--backend", "scripted", "--quiet", "--db", db]) == 0
    again = capsys.readouterr().out
    assert "Japan is the most densely populated" in first and "Japan is the most densely populated" in again


def test_apr_entry_point_runs_as_a_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "apr_cli.cli", "run", "What is 2+2?", "--backend", "scripted",
                           "--quiet", "--tools", "calculator,lookup"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout


def test_bad_tool_name_is_a_clear_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "apr_cli.cli", "run", "q", "--backend", "scripted",
                           "--tools", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown tool(s) ['nope']" in proc.stderr
