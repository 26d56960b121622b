"""The one interface a model adapter implements, and the errors it may raise.

The runtime duck-types backends: any object with ``complete`` and ``render``
works, no base class required (SPEC §3).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from typing import Any, Protocol, runtime_checkable

from langchain_core.messages import BaseMessage
from pydantic import BaseModel, ConfigDict

from ..protocol.dialects import Dialect

# Set by the runtime to the run id around each backend call, so a multi-replica
# backend can send every context of one run (all branches of a spawn) to one
# replica and its prefix cache.
route_key: ContextVar[str | None] = ContextVar("apr_route_key", default=None)


class Completion(BaseModel):
    """One backend call's result. ``text`` never includes the stop string."""

    model_config = ConfigDict(frozen=True)

    text: str
    stop: str | None = None
    finish_reason: str = "stop"  # "stop" | "length" | "eos" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int | None = None
    #: the engine's own span for this call (``time.time()`` read by the engine as it began and as it
    #: finished), after any wait in its queue (a serial engine's turn, a batched engine's
    #: admission), and that wait in seconds; ``None`` when the backend does not say
    engine_started: float | None = None
    engine_ended: float | None = None
    queued_s: float | None = None


@runtime_checkable
class Backend(Protocol):
    """What the runtime needs from a model: complete raw text, render a chat."""

    async def complete(
        self,
        prompt: str,
        *,
        stop: list[str],
        max_tokens: int,
        temperature: float = 0.0,
    ) -> Completion: ...

    def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str: ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    """Optional: a backend that can yield text pieces as they are decoded.

    The final item is the ``Completion``; the runtime forwards the pieces to
    LangGraph's ``custom`` stream so consumers see branch tokens live.
    """

    def stream(
        self,
        prompt: str,
        *,
        stop: list[str],
        max_tokens: int,
        temperature: float = 0.0,
    ) -> AsyncIterator[str | Completion]: ...


class BackendError(RuntimeError):
    """A backend call failed; transient ones are retried by the runtime."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached or started (bad URL, missing model file)."""


class BackendRequestError(BackendError):
    """The request itself cannot succeed (prompt longer than the context window, bad
    parameters, an HTTP 4xx): the runtime does not retry it. The message says what to
    change (``n_ctx``, ``max_tokens``, the prompt)."""


def check_backend(backend: object) -> None:
    """Fail at construction, not deep in a run, when an object is no backend."""
    if isinstance(backend, type):
        raise TypeError(f"pass a backend instance, not the class {backend.__name__} (e.g. {backend.__name__}(...))")
    missing = [m for m in ("complete", "render") if not callable(getattr(backend, m, None))]
    if missing:
        raise TypeError(
            f"{type(backend).__name__} is not an apr_agents backend: it lacks "
            f"{', '.join(missing)}(). A backend needs async complete(prompt, *, stop, "
            "max_tokens, temperature) -> Completion and render(messages, tools) -> str."
        )


def first_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Cut ``text`` at the earliest stop string, as an engine with stop strings would."""
    best: tuple[int, str] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    return text[: best[0]], best[1]


async def complete_from_stream(stream: AsyncIterator[str | Completion]) -> Completion:
    """``complete`` for a backend whose ``stream`` ends with the ``Completion``."""
    final: Completion | None = None
    async for item in stream:
        if isinstance(item, Completion):
            final = item
    if final is None:
        raise BackendError("stream ended without a completion")
    return final


def check_dialect(backend: Any, parsed: Dialect) -> None:
    """A backend whose prompts teach one dialect cannot serve an agent that parses another."""
    taught = getattr(backend, "prompt_dialect", None)
    if isinstance(taught, Dialect) and taught.name != parsed.name:
        raise ValueError(
            f"{type(backend).__name__} prompts the model in the {taught.name!r} dialect, but "
            f"APRConfig.dialect={parsed.name!r}: the runtime would parse text the model was not taught. Use "
            f"APRConfig(dialect={taught.name!r}), or build the backend for {parsed.name!r} "
            f"(LlamaCppBackend(..., chat_template=True, dialect={parsed.name!r}))")
