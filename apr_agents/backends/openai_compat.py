"""OpenAICompatibleBackend: raw-prompt ``/v1/completions`` on one or more servers.

It sends the runtime's prompt text as is (no chat endpoint), so a server with
prefix caching (``vllm serve``, SGLang, llama.cpp's server) computes the prefix
that all branches of a spawn share once. Stop strings go to the server.

Several base URLs are replicas of one model. Routing is **fork-affine**: the
runtime sets ``apr_agents.backends.route_key`` to the run id around each call,
and every call with the same key goes to the same replica (rendezvous hashing,
so keys only move when their replica is down), which keeps all branches of a
run on the replica that already holds their prefix in cache. Calls without a
key go round-robin. A replica that fails (connection refused, transport error,
timeout, HTTP 5xx or 429) is marked down for ``down_for_s`` and the call fails
over to the key's next replica; down replicas are still tried last, so a call
only fails when every replica has failed, with ``BackendUnavailable`` naming
each URL and its error. A 4xx other than 429 is the request's fault: raised at
once as ``BackendError``, no failover.

Servers differ in how they say which stop string ended a completion: vLLM's
``stop_reason`` names it; servers that only say ``finish_reason: "stop"`` (such
as llama-cpp-python's) get it inferred from the text: the stop that closes the
innermost tag still open (``<tool_call>`` -> ``</tool_call>``), else end of
sequence.

llama-cpp-python's server interrupts a stream when another request arrives
unless started with ``--interrupt_requests False``; a stream that ends without a
finish reason is reported as a ``BackendError`` (the runtime retries), never
as a short answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage

from .base import BackendError, BackendUnavailable, Completion, first_stop, route_key
from .prompting import FEWSHOT_END_STOPS, render_fewshot

try:
    import httpx
except ImportError:  # pragma: no cover - httpx is a base dependency
    httpx = None  # type: ignore[assignment]

Render = Callable[[list[BaseMessage], list[dict[str, Any]]], str]


class _ReplicaFailed(Exception):
    """One replica could not answer; the call may fail over to another."""


@dataclass
class Replica:
    url: str  # base URL as given, without a trailing slash
    endpoint: str  # .../v1/completions
    requests: int = 0
    ok: int = 0
    failures: int = 0
    down_until: float = 0.0
    last_error: str | None = None
    keys: set[str] = field(default_factory=set)

    def is_down(self, now: float) -> bool:
        return self.down_until > now

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"requests": self.requests, "ok": self.ok, "failures": self.failures,
                "down": self.is_down(now), "down_for_s": max(0.0, self.down_until - now),
                "last_error": self.last_error, "route_keys": len(self.keys)}


def _endpoint(base_url: str) -> str:
    base = base_url.rstrip("/")
    for suffix in ("/v1/completions", "/completions"):
        if base.endswith(suffix):
            return base
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


def infer_stop(context: str, stops: Sequence[str]) -> str | None:
    """Which closing-tag stop ended a completion, for servers that do not say.

    ``context`` is prompt + completion text. A stop ``</X>`` is a candidate when
    ``<X>`` was opened after the last ``</X>``; the innermost one (latest opener)
    wins. ``None``: nothing is open, the model ended its sequence.
    """
    best: tuple[int, str] | None = None
    for s in stops:
        if not (s.startswith("</") and s.endswith(">")):
            continue
        opener = "<" + s[2:]
        at = context.rfind(opener)
        if at > context.rfind(s) and (best is None or at > best[0]):
            best = (at, s)
    return best[1] if best else None


class OpenAICompatibleBackend:
    """A model behind OpenAI-compatible ``/v1/completions`` endpoints (see module doc).

    ``base_url``: one URL or a list of replicas (``http://host:port`` or
    ``http://host:port/v1``). ``model``: the served model name. ``api_key``: sent
    as a bearer token. ``timeout_s``: per request. ``max_retries``: extra passes
    over all replicas (with a short backoff) after each has failed once.
    ``down_for_s``: how long a failed replica is skipped. ``render``:
    ``f(messages, tools) -> prompt``; the default is the few-shot prompt for base
    models (pass e.g. ``functools.partial(render_chat_template, template)`` for a
    chat model). ``end_stops``: extra stop strings meaning end of sequence
    (default: the few-shot turn markers when rendering few-shot). ``stream``:
    ``False`` hides ``stream()`` so the runtime uses ``complete`` (exact token
    usage from servers that do not report usage in streams). ``extra_body``:
    more request fields (``{"top_k": 20}``, ``{"ignore_eos": True}``).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 1,
        down_for_s: float = 10.0,
        render: Render | None = None,
        end_stops: Sequence[str] | None = None,
        stream: bool = True,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if httpx is None:  # pragma: no cover
            raise BackendUnavailable("httpx is not installed: pip install httpx")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise ValueError("base_url must be a URL or a non-empty list of URLs")
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate replica URLs in {urls}")
        if timeout_s <= 0 or max_retries < 0 or down_for_s < 0:
            raise ValueError("timeout_s must be > 0, max_retries and down_for_s >= 0")
        self.replicas = [Replica(u.rstrip("/"), _endpoint(u)) for u in urls]
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.down_for_s = down_for_s
        self._render = render
        if end_stops is None:
            end_stops = FEWSHOT_END_STOPS if render is None else ()
        self.end_stops = tuple(end_stops)
        self.extra_body = dict(extra_body or {})
        if not stream:
            self.stream = None  # type: ignore[assignment]  # the runtime then calls complete()
        self._rr = itertools.count()
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())

    @property
    def base_urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    # -- the Backend protocol ------------------------------------------------------
    def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str:
        if self._render is None:
            return render_fewshot(messages, tools)
        return self._render(messages, tools)

    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                       temperature: float = 0.0) -> Completion:
        body = self._body(prompt, stop, max_tokens, temperature, stream=False)

        async def attempt(replica: Replica) -> Completion:
            data = await self._post_json(replica, body)
            try:
                choice = data["choices"][0]
                usage = data.get("usage") or {}
                return self._completion(prompt, stop, choice.get("text") or "", choice.get("finish_reason"),
                                        choice.get("stop_reason"), usage, None)
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                raise _ReplicaFailed(f"malformed completion response: {str(data)[:200]}") from exc

        return await self._with_failover(attempt)

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        body = self._body(prompt, stop, max_tokens, temperature, stream=True)
        errors: list[str] = []
        for n in range(self.max_retries + 1):
            if n:
                await asyncio.sleep(self._backoff(n))
            for replica in self._order():
                yielded = False
                try:
                    async for item in self._stream_from(replica, prompt, stop, body):
                        if isinstance(item, str):
                            yielded = True
                        yield item
                    return
                except _ReplicaFailed as exc:
                    errors.append(f"{replica.url} ({exc})")
                    if yielded:  # text already went out: a silent resend would duplicate it
                        raise BackendError(f"stream from {replica.url} broke after it started: {exc}") from exc
        raise BackendUnavailable(self._all_failed(errors))

    # -- extras ---------------------------------------------------------------------
    def replica_for(self, key: str) -> str:
        """The replica URL a route key maps to while all replicas are up."""
        return max(self.replicas, key=lambda r: self._score(key, r.url)).url

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per replica: requests sent, successes, failures, whether it is marked down."""
        now = time.monotonic()
        return {r.url: r.snapshot(now) for r in self.replicas}

    async def aclose(self) -> None:
        clients = list(self._clients.items())
        self._clients.clear()
        for loop, client in clients:
            if loop is asyncio.get_running_loop():
                await client.aclose()

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend({self.base_urls!r}, model={self.model!r})"

    # -- routing and failover -----------------------------------------------------------
    @staticmethod
    def _score(key: str, url: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest(), "big")

    @staticmethod
    def _backoff(n: int) -> float:
        return min(2.0, 0.2 * 2 ** (n - 1))

    def _order(self) -> list[Replica]:
        key = route_key.get()
        if key is not None:
            ranked = sorted(self.replicas, key=lambda r: self._score(key, r.url), reverse=True)
        else:
            start = next(self._rr) % len(self.replicas)
            ranked = self.replicas[start:] + self.replicas[:start]
        now = time.monotonic()
        up = [r for r in ranked if not r.is_down(now)]
        down = [r for r in ranked if r.is_down(now)]
        return up + down

    async def _with_failover(self, attempt: Callable[[Replica], Any]) -> Completion:
        errors: list[str] = []
        for n in range(self.max_retries + 1):
            if n:
                await asyncio.sleep(self._backoff(n))
            for replica in self._order():
                try:
                    return await attempt(replica)
                except _ReplicaFailed as exc:
                    errors.append(f"{replica.url} ({exc})")
        raise BackendUnavailable(self._all_failed(errors))

    def _all_failed(self, errors: list[str]) -> str:
        return (f"all {len(self.replicas)} replica(s) of model {self.model!r} failed "
                f"({self.max_retries + 1} pass(es)): " + "; ".join(errors))

    def _mark(self, replica: Replica, error: str | None) -> None:
        key = route_key.get()
        if error is None:
            replica.ok += 1
            replica.down_until = 0.0
            if key is not None:
                replica.keys.add(key)
        else:
            replica.failures += 1
            replica.last_error = error
            replica.down_until = time.monotonic() + self.down_for_s

    # -- HTTP ----------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s)),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
            self._clients[loop] = client
        return client

    def _body(self, prompt: str, stop: Sequence[str], max_tokens: int, temperature: float,
              *, stream: bool) -> dict[str, Any]:
        stops = list(dict.fromkeys([s for s in stop if s] + [s for s in self.end_stops if s]))
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": max(1, max_tokens),
                                "temperature": temperature}
        if stops:
            body["stop"] = stops
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)
        return body

    def _check_status(self, replica: Replica, status: int, text: str) -> None:
        if status < 400:
            return
        detail = f"HTTP {status}: {text[:300]}"
        if status >= 500 or status == 429:
            self._mark(replica, detail)
            raise _ReplicaFailed(detail)
        replica.last_error = detail
        raise BackendError(f"{replica.endpoint} rejected the request: {detail}")

    async def _post_json(self, replica: Replica, body: dict[str, Any]) -> dict[str, Any]:
        replica.requests += 1
        try:
            resp = await self._client().post(replica.endpoint, json=body)
        except httpx.TransportError as exc:  # connect refused, timeouts, broken connections
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._mark(replica, error)
            raise _ReplicaFailed(error) from exc
        self._check_status(replica, resp.status_code, resp.text)
        try:
            data = resp.json()
        except ValueError as exc:
            self._mark(replica, "response is not JSON")
            raise _ReplicaFailed(f"response is not JSON: {resp.text[:200]!r}") from exc
        self._mark(replica, None)
        return data

    async def _stream_from(self, replica: Replica, prompt: str, stop: Sequence[str],
                           body: dict[str, Any]) -> AsyncIterator[str | Completion]:
        replica.requests += 1
        parts: list[str] = []
        finish: str | None = None
        stop_reason: Any = None
        usage: dict[str, Any] = {}
        chunks = 0
        try:
            async with self._client().stream("POST", replica.endpoint, json=body) as resp:
                if resp.status_code >= 400:
                    self._check_status(replica, resp.status_code, (await resp.aread()).decode(errors="replace"))
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        continue
                    if event.get("error"):
                        raise _ReplicaFailed(f"server error in stream: {str(event['error'])[:200]}")
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        piece = choice.get("text") or ""
                        if piece:
                            chunks += 1
                            parts.append(piece)
                            yield piece
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                            stop_reason = choice.get("stop_reason")
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._mark(replica, error)
            raise _ReplicaFailed(error) from exc
        except _ReplicaFailed as exc:
            self._mark(replica, str(exc))
            raise
        if finish is None:
            error = "stream ended without a finish_reason (interrupted by the server?)"
            self._mark(replica, error)
            raise _ReplicaFailed(error)
        self._mark(replica, None)
        yield self._completion(prompt, stop, "".join(parts), finish, stop_reason, usage, chunks)

    def _completion(self, prompt: str, stop: Sequence[str], text: str, finish: str | None,
                    stop_reason: Any, usage: dict[str, Any], chunks: int | None) -> Completion:
        stops = [s for s in stop if s]
        all_stops = stops + [s for s in self.end_stops if s and s not in stops]
        # A server that ignored a stop string: cut here, as the engine should have.
        cut, hit = first_stop(text, all_stops)
        if hit is not None:
            text = cut
            finish = "stop"
        elif finish == "stop":
            if isinstance(stop_reason, str) and stop_reason in all_stops:
                hit = stop_reason
            elif stop_reason is None:
                hit = infer_stop(prompt + text, stops)
        if hit is not None and hit not in stops:  # an end-of-turn marker: end of sequence
            hit = None
            finish = "eos"
        if finish == "stop":
            finish = "stop" if hit is not None else "eos"
        elif finish not in ("length", "abort"):
            finish = "eos"
        details = usage.get("prompt_tokens_details") or {}
        completion_tokens = usage.get("completion_tokens")
        if completion_tokens is None:
            completion_tokens = chunks or 0
        return Completion(text=text, stop=hit, finish_reason=finish,
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(completion_tokens),
                          cached_prompt_tokens=details.get("cached_tokens"))


__all__ = ["OpenAICompatibleBackend", "Replica", "infer_stop"]
