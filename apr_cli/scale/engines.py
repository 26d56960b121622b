"""Engine replicas behind ``vllm-router`` on 127.0.0.1: start, probe, kill, stop.

``EngineCluster`` starts ``n`` llama-cpp-python server replicas
(``apr_cli.scale.replica``: the stock server plus ``/health``) over one GGUF,
then ``vllm-router`` in front of them with the chosen policy, and waits until
the router serves. The backend then talks to the router only
(``OpenAICompatibleBackend(cluster.url, ...)``). Each replica logs with
``--verbose True``, so its prefix-cache reuse can be read back
(``prefix_cache()``). Everything binds 127.0.0.1; ``stop()`` (or leaving the
``with`` block) ends every process it started.

Usage::

    python -m apr_cli.scale.engines --replicas 2 --policy consistent_hash --port 8000   # until Ctrl-C

    with EngineCluster(2, policy="consistent_hash") as cluster:
        backend = OpenAICompatibleBackend(cluster.url, "gemma-3-270m")
        ...
        cluster.replicas[0].kill()          # SIGKILL one engine mid-run

On GPUs the replicas are ``vllm serve`` processes instead (they answer
``/health`` themselves); pass their URLs to ``Router`` (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

POLICIES = ("cache_aware", "consistent_hash", "round_robin", "random", "power_of_two")
_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")
_EVAL = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class _Process:
    """A child process on 127.0.0.1 with its log file."""

    name = "process"

    def __init__(self, cmd: list[str], log_path: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} on {self.url} exited with {self.proc.returncode}: {self.log_tail()}")
            if _get(self.url + path) == 200:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} on {self.url} not ready after {timeout_s}s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the router (what a crash looks like)."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class Replica(_Process):
    """One llama-cpp-python server over ``model`` (a GGUF path)."""

    name = "engine replica"

    def __init__(self, model: str | Path, log_dir: Path, *, port: int | None = None, n_ctx: int = 2048,
                 n_threads: int = 1, ram_cache: bool = False) -> None:
        port = port or free_port()
        cmd = [sys.executable, "-m", "apr_cli.scale.replica", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
               "--interrupt_requests", "False", "--verbose", "True"]
        if ram_cache:
            cmd += ["--cache", "True", "--cache_type", "ram"]
        super().__init__(cmd, log_dir / f"replica-{port}.log", port)

    def completions_served(self) -> int:
        return self.log_path.read_text(errors="replace").count("\"POST /v1/completions HTTP")

    def prefix_cache(self) -> dict[str, int]:
        """Prompt tokens reused from the KV cache vs evaluated, from the replica's own log."""
        text = self.log_path.read_text(errors="replace")
        hit = sum(int(m.group(1)) for m in _HIT.finditer(text))
        evaluated = sum(int(m.group(1)) for m in _EVAL.finditer(text))
        return {"hit_tokens": hit, "evaluated_tokens": evaluated, "requests": self.completions_served()}


class Router(_Process):
    """``vllm-router`` in front of ``worker_urls`` with one policy; retries on another worker."""

    name = "vllm-router"

    def __init__(self, worker_urls: list[str], log_dir: Path, *, policy: str = "cache_aware",
                 port: int | None = None, extra_args: list[str] | None = None) -> None:
        exe = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
        if not Path(exe).exists():
            raise FileNotFoundError("vllm-router is not installed: pip install 'apr-agents[scale]'")
        port = port or free_port()
        cmd = [exe, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls,
               "--policy", policy, "--health-check-interval-secs", "1", "--health-failure-threshold", "2",
               "--health-check-timeout-secs", "5", "--worker-startup-check-interval", "1",
               "--retry-max-retries", "5", "--retry-initial-backoff-ms", "100", "--retry-max-backoff-ms", "2000",
               "--request-timeout-secs", "600", "--queue-size", "1000", "--queue-timeout-secs", "600",
               "--log-level", "info", *(extra_args or [])]
        super().__init__(cmd, log_dir / f"router-{port}.log", port)
        self.policy = policy


class EngineCluster:
    """``n`` replicas behind one router (see module doc). ``url`` is the router's."""

    def __init__(self, n: int = 2, *, policy: str = "cache_aware", model: str | Path | None = None,
                 n_ctx: int = 2048, n_threads: int = 1, log_dir: Path | None = None, port: int | None = None,
                 ram_cache: bool = False, ready_timeout_s: float = 180.0) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one replica")
        if model is None:
            from apr_agents.backends.models import model_path

            model = model_path("gemma-3-270m")
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="apr-engines-")
        self.log_dir = Path(log_dir or self._tmp.name)  # type: ignore[union-attr]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.replicas: list[Replica] = []
        self.router: Router | None = None
        try:
            self.replicas = [Replica(model, self.log_dir, n_ctx=n_ctx, n_threads=n_threads, ram_cache=ram_cache)
                             for _ in range(n)]
            for r in self.replicas:
                r.wait_ready("/health", ready_timeout_s)
            self.router = Router([r.url for r in self.replicas], self.log_dir, policy=policy, port=port)
            self.router.wait_ready("/v1/models", ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        assert self.router is not None
        return self.router.url

    def prefix_cache(self) -> dict[str, Any]:
        per = [r.prefix_cache() for r in self.replicas]
        hit = sum(p["hit_tokens"] for p in per)
        evaluated = sum(p["evaluated_tokens"] for p in per)
        return {"hit_tokens": hit, "evaluated_tokens": evaluated,
                "hit_rate": round(hit / (hit + evaluated), 4) if hit + evaluated else 0.0,
                "requests_per_replica": [p["requests"] for p in per]}

    def stop(self) -> None:
        for p in [self.router, *self.replicas]:
            if p is not None:
                p.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EngineCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Engine replicas behind vllm-router on 127.0.0.1 (Ctrl-C stops all).")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policy", choices=POLICIES, default="cache_aware")
    ap.add_argument("--port", type=int, default=8000, help="the router's port")
    ap.add_argument("--model", default=None, help="GGUF path (default: the Gemma 3 270M of the [embedded] extra)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="threads per replica")
    ap.add_argument("--log-dir", type=Path, default=Path("out/engines"))
    args = ap.parse_args(argv)
    with EngineCluster(args.replicas, policy=args.policy, model=args.model, n_ctx=args.n_ctx,
                       n_threads=args.threads, log_dir=args.log_dir, port=args.port) as cluster:
        print(f"router {cluster.url} ({args.policy}) -> " + " ".join(r.url for r in cluster.replicas), flush=True)
        print(f"logs in {args.log_dir}; Ctrl-C stops everything", flush=True)
        try:
            while all(p.alive() for p in [cluster.router, *cluster.replicas] if p is not None):
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
