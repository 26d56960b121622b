"""Servers the backend tests start on 127.0.0.1.

- ``FakeCompletionsServer``: a FAKE OpenAI-style ``/v1/completions`` endpoint
  (stdlib ``http.server`` in a thread). It is no model: it answers with a reply
  function, and can be told to fail (HTTP 500/400, hang, drop the connection,
  cut a stream short). It records every request body. Used for the routing and
  failover logic only.
- ``LlamaServer``: a REAL ``python -m llama_cpp.server`` process over the
  embedded Gemma 3 270M GGUF, killable with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_reply(body: dict[str, Any]) -> dict[str, Any]:
    return {"text": "ok", "finish_reason": "length"}


class FakeCompletionsServer:
    """FAKE completions server: ``reply(body) -> {"text", "finish_reason", "stop_reason"?}``.

    ``mode``: "ok", "500", "400", "429", "hang" (sleep ``hang_s`` then answer),
    "drop" (close the socket without answering), "cut" (stream: send some text,
    then end without a finish reason).
    """

    def __init__(self, reply: Callable[[dict[str, Any]], dict[str, Any]] = default_reply) -> None:
        self.reply = reply
        self.mode = "ok"
        self.hang_s = 5.0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # each request's headers, lower-cased names
        self.error_text = ""  # the error message of modes "500"/"400" (default: "fake <mode>")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                server.bodies.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                mode = server.mode
                if mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode in ("500", "400", "429"):
                    self._send(int(mode), {"error": {"message": server.error_text or f"fake {mode}"}})
                    return
                if mode == "hang":
                    time.sleep(server.hang_s)
                out = server.reply(body)
                usage = {"prompt_tokens": len(body.get("prompt", "").split()),
                         "completion_tokens": len(out["text"].split())}
                choice = {"index": 0, "text": out["text"], "finish_reason": out.get("finish_reason", "stop")}
                if "stop_reason" in out:
                    choice["stop_reason"] = out["stop_reason"]
                if not body.get("stream"):
                    self._send(200, {"id": "fake", "object": "text_completion", "choices": [choice],
                                     "usage": usage})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                words = out["text"].split(" ")
                pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
                if mode == "cut":
                    pieces = pieces[: max(1, len(pieces) // 2)]
                for p in pieces:
                    self._event({"choices": [{"index": 0, "text": p, "finish_reason": None}]})
                if mode != "cut":
                    last = {"index": 0, "text": "", "finish_reason": choice["finish_reason"]}
                    if "stop_reason" in choice:
                        last["stop_reason"] = choice["stop_reason"]
                    self._event({"choices": [last]})
                    self._event({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, data: dict[str, Any]) -> None:
                self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
                self.wfile.flush()

            def _send(self, status: int, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # bursts of concurrent branches must not be refused

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # "drop" mode and clients that hang up: expected here, not worth a traceback

        self._httpd = Server(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class LlamaServer:
    """A REAL llama-cpp-python OpenAI-compatible server process on 127.0.0.1."""

    def __init__(self, model: Path, log_dir: Path, *, n_ctx: int = 2048, n_threads: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"llama-server-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
             "--interrupt_requests", "False"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"llama server on {self.url} not ready after {timeout_s}s: {self.log_tail()}")

    def completions_served(self) -> int:
        """Requests to /v1/completions in the server's own access log."""
        return self.log_path.read_text(errors="replace").count("POST /v1/completions")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
