"""Agent servers that share one durable store: PostgreSQL + Redis + N stock LangGraph servers.

The served graph (``graphs/apr_graph.py``) runs on the stock ``langgraph-api``
server with the ``langgraph-runtime-pg`` runtime (``LANGGRAPH_RUNTIME_EDITION=pg``,
MIT, PyPI): runs, threads and checkpoints in PostgreSQL, the run queue's
heartbeats and stream pub/sub in Redis. Every server process takes runs from
the same queue (``FOR UPDATE SKIP LOCKED``); a run whose server died stops
heartbeating, the next sweep (every ``2 x heartbeat`` seconds) puts it back to
pending, another server claims it and LangGraph resumes it from its last
checkpoint (same run id in the checkpoint's metadata), so finished branches
are not run again.

``langgraph-runtime-pg`` pins ``langgraph-api==0.11.1`` while the ``serve``
extra brings a newer one, so the servers run from their own virtual
environment (``make setup-scale`` makes ``.venv-pg``); PostgreSQL and Redis
come from the system (Debian: ``apt-get install postgresql redis-server``).

Usage::

    python -m apr_cli.scale.agents --servers 2 --port 2024      # until Ctrl-C

    with Postgres(tmp) as pg, Redis(tmp) as redis:
        servers = [AgentServer(pg.uri, redis.uri, tmp, env).ready() for _ in range(2)]  # in turn: the
        # first one creates the schema (two at once race on the migration)
        ...
        servers[0].kill()                # SIGKILL: its runs resume on the other
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .engines import _Process, free_port

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = ROOT / "graphs"
PG_VENV = ROOT / ".venv-pg"


def _pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} not found: apt-get install postgresql")
    return found


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (its own data folder and port)."""

    def __init__(self, base: Path, *, port: int | None = None, db: str = "apr") -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir=base))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        run = lambda cmd: subprocess.run(_as_postgres_user(cmd), check=True, capture_output=True, text=True)  # noqa: E731
        run([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        run([_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start", "-o",
             f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off"])
        run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", db])
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def query(self, sql: str) -> str:
        out = subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d",
                              self.uri.rsplit("/", 1)[1], "-At", "-c", sql],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        subprocess.run(_as_postgres_user([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Redis(_Process):
    """A throwaway Redis on 127.0.0.1 without persistence."""

    name = "redis-server"

    def __init__(self, base: Path, *, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise FileNotFoundError("redis-server not found: apt-get install redis-server")
        port = port or free_port()
        super().__init__([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(base)], base / f"redis-{port}.log", port)
        self.uri = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.2)
        raise TimeoutError(f"redis on port {port} did not answer: {self.log_tail()}")

    def __enter__(self) -> Redis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_python() -> str:
    exe = PG_VENV / "bin" / "python"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} missing: make setup-scale (langgraph-runtime-pg needs its own venv)")
    return str(exe)


class AgentServer(_Process):
    """One stock ``langgraph-api`` server process, runtime ``pg``, serving ``graphs/apr_graph.py``."""

    name = "agent server"

    def __init__(self, database_uri: str, redis_uri: str, log_dir: Path, env: dict[str, str] | None = None, *,
                 port: int | None = None, n_jobs: int = 50, heartbeat_s: float = 2.0) -> None:
        port = port or free_port()
        graphs = {"apr": f"{GRAPHS / 'apr_graph.py'}:graph"}
        full_env = {
            **os.environ, **(env or {}),
            "LANGGRAPH_RUNTIME_EDITION": "pg", "DATABASE_URI": database_uri, "REDIS_URI": redis_uri,
            "LANGSERVE_GRAPHS": json.dumps(graphs), "N_JOBS_PER_WORKER": str(n_jobs),
            "LG_BG_JOB_HEARTBEAT": str(heartbeat_s), "LANGGRAPH_ALLOW_BLOCKING": "true",
            "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false", "LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [server_python(), "-m", "uvicorn", "langgraph_api.server:app", "--host", "127.0.0.1",
               "--port", str(port), "--no-access-log"]
        self._env = full_env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"agent-server-{port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=str(log_dir), start_new_session=True)

    def ready(self, timeout_s: float = 120.0) -> AgentServer:
        self.wait_ready("/ok", timeout_s)
        return self


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="PostgreSQL + Redis + N agent servers on 127.0.0.1 (Ctrl-C stops all).")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--port", type=int, default=2024, help="first server's port; the others follow")
    ap.add_argument("--log-dir", type=Path, default=Path("out/agents"))
    args = ap.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="apr-agents-"))
    os.chmod(base, 0o755)
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k.startswith("APR_")}
    with Postgres(base) as pg, Redis(base) as redis:
        servers: list[AgentServer] = []
        try:
            for i in range(args.servers):  # one after another: the first one migrates the database
                servers.append(AgentServer(pg.uri, redis.uri, args.log_dir.resolve(), env, port=args.port + i))
                servers[-1].ready()
            print(f"postgres {pg.uri}  redis {redis.uri}", flush=True)
            print("agent servers: " + " ".join(s.url for s in servers), flush=True)
            while all(s.alive() for s in servers):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            for s in servers:
                s.stop()
    shutil.rmtree(base, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
