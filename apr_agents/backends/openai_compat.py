"""OpenAICompatibleBackend: raw-prompt ``/v1/completions`` on a server or a serving router.

It sends the runtime's prompt text as is (no chat endpoint), so a server with
prefix caching (``vllm serve``, SGLang, llama.cpp's server) computes the prefix
that all branches of a spawn share once. Stop strings and ``max_tokens`` go to
the server.

Replicas go **behind a serving router** (``vllm-router``, docs/scale-out.md):
the backend talks to the router as to one server. The router does what a
router does better than a client library: health checks, retries with backoff
on another worker, a circuit breaker, load balancing, cache-aware placement,
Prometheus metrics, and one view of all clients' traffic. The backend keeps
only what a router cannot know or do:

- **The routing key.** The runtime sets ``apr_agents.backends.route_key`` to the
  run id around each call; the backend sends it in the ``X-Session-ID`` header
  (``route_header``) and the router's ``consistent_hash`` policy hashes it, so
  all branches of one run land on the replica that holds their shared prefix.
  (``cache_aware`` needs no key: it matches the prompt text itself.)
- **Which stop string ended a completion** when the server does not say (below).
- **A stream that broke after text went out** is an error (``BackendError``,
  the runtime retries the whole call), never a short answer, never a silent
  resend that would duplicate text.
- **What may be retried.** HTTP 4xx other than 408/429 means the request itself
  cannot succeed (prompt longer than the context window, bad parameters):
  ``BackendRequestError`` at once, which the runtime does not retry, with a
  message that says what to change. Transport errors, 408, 429 and 5xx are
  ``BackendError`` (transient: the runtime retries, the router picks a live
  worker).

``base_url`` may still be a list of replicas (SPEC §3) for a setup without a
router: each call goes to the URL that rendezvous hashing picks for its route
key (round robin without one), falling through to the next URL only when the
connection cannot even be opened (the request never reached a server, so
resending it duplicates nothing). There is no health state, no failover after
a request was sent, and nothing that grows with the number of runs: use a
router for that.

Servers differ in how they say which stop string ended a completion: vLLM's
``stop_reason`` names it; servers that only say ``finish_reason: "stop"`` (such
as llama-cpp-python's) get it inferred (``infer_stop``): the stop that closes a
tag the **generated text** opened and left open, else the tag of the context
being continued, written by the runtime at the very end of the prompt
(``<Thread>1:``); a spawn marker is never inferred from the prompt. Otherwise it
was the end of sequence.

llama-cpp-python's server interrupts a stream when another request arrives
unless started with ``--interrupt_requests False``; a stream that ends without a
finish reason is reported as a ``BackendError`` (the runtime retries).

Usage::

    backend = OpenAICompatibleBackend("http://127.0.0.1:8000", "gemma-3-270m")   # the router
    graph = create_apr_agent(backend, tools=[...])
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from langchain_core.messages import BaseMessage

from ..protocol.dialects import CANONICAL, Dialect
from .base import BackendError, BackendRequestError, BackendUnavailable, Completion, first_stop, route_key
from .prompting import FEWSHOT_END_STOPS, render_fewshot

try:
    import httpx
except ImportError:  # pragma: no cover - httpx is a base dependency
    httpx = None  # type: ignore[assignment]

Render = Callable[[list[BaseMessage], list[dict[str, Any]]], str]

# The header vllm-router's consistent_hash policy hashes (it also reads X-User-ID).
ROUTE_HEADER = "X-Session-ID"
# Spawn markers of the shipped dialects: never inferred from the prompt (issue 12, item 4).
SPAWN_MARKERS = frozenset({"</Outlines>", "</Goal>"})
# How far back from the prompt's end the runtime's own context tag may sit (``<Path>\n12:``).
_PROMPT_TAIL = 64


def _endpoint(base_url: str) -> str:
    base = base_url.rstrip("/")
    for suffix in ("/v1/completions", "/completions"):
        if base.endswith(suffix):
            return base
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


def _innermost_open(context: str, stops: Sequence[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in stops:
        if not (s.startswith("</") and s.endswith(">")):
            continue
        at = context.rfind("<" + s[2:])
        if at >= 0 and at > context.rfind(s) and (best is None or at > best[0]):
            best = (at, s)
    return best


def infer_stop(text: str, stops: Sequence[str], prompt: str = "") -> str | None:
    """Which closing-tag stop ended a completion, for servers that do not say.

    A stop ``</X>`` is a candidate when ``<X>`` was opened after the last
    ``</X>``. The generated ``text`` decides first (the innermost open tag wins).
    When the text left nothing open, the prompt counts only through a tag in its
    last 64 characters (where the runtime writes ``<Thread>1:`` for the context
    it continues), and never for a spawn marker (``</Outlines>``): a tag further
    back in the prompt (an instruction that mentions ``<Outlines>``) says nothing
    about where this completion stopped. ``None``: the model ended its sequence.
    """
    hit = _innermost_open(text, stops)
    if hit is None and prompt:
        hit = _innermost_open(prompt[-_PROMPT_TAIL:], [s for s in stops if s not in SPAWN_MARKERS])
    return hit[1] if hit else None


def _request_error(url: str, status: int, text: str, body: dict[str, Any]) -> BackendRequestError:
    detail = text[:300]
    lowered = text.lower()
    if any(w in lowered for w in ("context", "n_ctx", "maximum", "too long", "exceed")):
        hint = (f"the prompt plus max_tokens={body.get('max_tokens')} does not fit the model's context "
                "window: lower APRConfig.max_tokens, shorten the conversation, or serve the model with a "
                "larger context (llama.cpp --n_ctx, vLLM --max-model-len)")
    else:
        hint = "the server refused the request's parameters; check model name, stop strings and max_tokens"
    return BackendRequestError(f"{url} rejected the request (HTTP {status}, not retried): {hint}. "
                               f"Server said: {detail}")


class _ConnectFailed(Exception):
    """The connection could not be opened: the request never reached the server."""


class OpenAICompatibleBackend:
    """A model behind an OpenAI-compatible ``/v1/completions`` endpoint (see module doc).

    ``base_url``: the router's or server's URL (``http://host:port`` or
    ``http://host:port/v1``), or a list of replicas without a router.
    ``model``: the served model name. ``api_key``: sent as a bearer token.
    ``timeout_s``: per request. ``route_header``: the header that carries the
    run's routing key (``None``: send none). ``render``: ``f(messages, tools) ->
    prompt``; the default is the few-shot prompt for base models (pass e.g.
    ``functools.partial(render_chat_template, template)`` for a chat model).
    ``end_stops``: extra stop strings meaning end of sequence (default: the
    few-shot turn markers when rendering few-shot). ``stream``: ``False`` hides
    ``stream()`` so the runtime uses ``complete`` (exact token usage from
    servers that do not report usage in streams). ``extra_body``: more request
    fields (``{"top_k": 20}``); it cannot override ``prompt``, ``stop``,
    ``max_tokens`` or ``stream``.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        route_header: str | None = ROUTE_HEADER,
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
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.endpoints = [_endpoint(u) for u in urls]
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.route_header = route_header
        self._render = render
        if end_stops is None:
            end_stops = FEWSHOT_END_STOPS if render is None else ()
        self.end_stops = tuple(end_stops)
        self.extra_body = {k: v for k, v in (extra_body or {}).items()
                           if k not in ("prompt", "stop", "max_tokens", "stream", "stream_options")}
        if not stream:
            self.stream = None  # type: ignore[assignment]  # the runtime then calls complete()
        self._rr = itertools.count()
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())

    # -- the Backend protocol ------------------------------------------------------
    @property
    def prompt_dialect(self) -> Dialect | None:
        """The spawn dialect the built-in few-shot prompt teaches; ``None`` with your own ``render``."""
        return CANONICAL if self._render is None else None

    def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str:
        if self._render is None:
            return render_fewshot(messages, tools)
        return self._render(messages, tools)

    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                       temperature: float = 0.0) -> Completion:
        body = self._body(prompt, stop, max_tokens, temperature, stream=False)
        errors: list[str] = []
        for endpoint in self._order():
            try:
                data = await self._post_json(endpoint, body)
            except _ConnectFailed as exc:
                errors.append(f"{endpoint} ({exc})")
                continue
            try:
                choice = data["choices"][0]
                usage = data.get("usage") or {}
                return self._completion(prompt, stop, choice.get("text") or "", choice.get("finish_reason"),
                                        choice.get("stop_reason"), usage, None)
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                raise BackendError(f"{endpoint}: malformed completion response: {str(data)[:200]}") from exc
        raise BackendUnavailable(self._unreachable(errors))

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        body = self._body(prompt, stop, max_tokens, temperature, stream=True)
        errors: list[str] = []
        for endpoint in self._order():
            try:
                async for item in self._stream_from(endpoint, prompt, stop, body):
                    yield item
                return
            except _ConnectFailed as exc:
                errors.append(f"{endpoint} ({exc})")
        raise BackendUnavailable(self._unreachable(errors))

    # -- extras ---------------------------------------------------------------------
    def replica_for(self, key: str) -> str:
        """The base URL a route key goes to first (a list of replicas without a router)."""
        return self.base_urls[self._ranked(key)[0]]

    async def aclose(self) -> None:
        clients = list(self._clients.items())
        self._clients.clear()
        for loop, client in clients:
            if loop is asyncio.get_running_loop():
                await client.aclose()

    def __repr__(self) -> str:
        urls = self.base_urls[0] if len(self.base_urls) == 1 else self.base_urls
        return f"OpenAICompatibleBackend({urls!r}, model={self.model!r})"

    # -- where a call goes ----------------------------------------------------------------
    def _ranked(self, key: str) -> list[int]:
        def score(i: int) -> int:
            raw = f"{key}\x00{self.base_urls[i]}".encode()
            return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")

        return sorted(range(len(self.base_urls)), key=score, reverse=True)

    def _order(self) -> list[str]:
        if len(self.endpoints) == 1:
            return self.endpoints
        key = route_key.get()
        if key is not None:
            return [self.endpoints[i] for i in self._ranked(key)]
        start = next(self._rr) % len(self.endpoints)
        return self.endpoints[start:] + self.endpoints[:start]

    def _unreachable(self, errors: list[str]) -> str:
        return f"cannot connect to the server(s) of model {self.model!r}: " + "; ".join(errors)

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

    def _headers(self) -> dict[str, str]:
        key = route_key.get()
        if key is None or not self.route_header:
            return {}
        return {self.route_header: key}

    def _body(self, prompt: str, stop: Sequence[str], max_tokens: int, temperature: float,
              *, stream: bool) -> dict[str, Any]:
        stops = list(dict.fromkeys([s for s in stop if s] + [s for s in self.end_stops if s]))
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "temperature": temperature}
        body.update(self.extra_body)
        body["max_tokens"] = max(1, int(max_tokens))
        if stops:
            body["stop"] = stops
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    @staticmethod
    def _check_status(endpoint: str, status: int, text: str, body: dict[str, Any]) -> None:
        if status < 400:
            return
        if status >= 500 or status in (408, 429):
            raise BackendError(f"{endpoint}: HTTP {status} (transient, retried): {text[:300]}")
        raise _request_error(endpoint, status, text, body)

    @staticmethod
    def _transport_error(endpoint: str, exc: Exception) -> Exception:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            return _ConnectFailed(error)
        return BackendError(f"{endpoint}: {error}")

    async def _post_json(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._client().post(endpoint, json=body, headers=self._headers())
        except httpx.TransportError as exc:  # connect refused, timeouts, broken connections
            raise self._transport_error(endpoint, exc) from exc
        self._check_status(endpoint, resp.status_code, resp.text, body)
        try:
            return resp.json()
        except ValueError as exc:
            raise BackendError(f"{endpoint}: response is not JSON: {resp.text[:200]!r}") from exc

    async def _stream_from(self, endpoint: str, prompt: str, stop: Sequence[str],
                           body: dict[str, Any]) -> AsyncIterator[str | Completion]:
        parts: list[str] = []
        finish: str | None = None
        stop_reason: Any = None
        usage: dict[str, Any] = {}
        chunks = 0
        try:
            async with self._client().stream("POST", endpoint, json=body, headers=self._headers()) as resp:
                if resp.status_code >= 400:
                    raw = (await resp.aread()).decode(errors="replace")
                    self._check_status(endpoint, resp.status_code, raw, body)
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
                        raise BackendError(f"{endpoint}: server error in stream: {str(event['error'])[:200]}")
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
            if parts:  # text already went out: a silent resend would duplicate it
                raise BackendError(f"stream from {endpoint} broke after it started: {type(exc).__name__}: "
                                   f"{exc}") from exc
            raise self._transport_error(endpoint, exc) from exc
        if finish is None:
            raise BackendError(f"stream from {endpoint} broke after it started: it ended without a "
                               "finish_reason (interrupted by the server?)")
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
                hit = infer_stop(text, stops, prompt)
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


__all__ = ["ROUTE_HEADER", "OpenAICompatibleBackend", "infer_stop"]
