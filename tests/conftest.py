"""Shared test configuration."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property-based test sizes (tests/test_fuzz_parser.py): HYPOTHESIS_PROFILE=ci (default, fast)
# or HYPOTHESIS_PROFILE=nightly (>= 10,000 examples per property).
settings.register_profile(
    "ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly", max_examples=10_000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    return found or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """APR_TEST_POSTGRES_URL, or a throwaway local server from the Debian packages (skips if neither)."""
    if url := os.environ.get("APR_TEST_POSTGRES_URL"):
        yield url
        return
    pytest.importorskip("langgraph.checkpoint.postgres")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="apr-pg-"))  # not under pytest's 0700 tmp: the server user reads it
    data = base / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        if as_user:
            shutil.chown(base, "postgres")
        for cmd in ([initdb, "-D", str(data), "-A", "trust", "-U", "apr"],
                    [pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                     "-o", f"-h 127.0.0.1 -p {port} -k {base}", "start"]):
            done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
            if done.returncode:
                pytest.skip(f"could not start a local PostgreSQL: {' '.join(cmd[:1])}: {done.stderr[-500:]}")
        yield f"postgresql://apr@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
