"""Model adapters for real engines. Any object with ``complete`` and ``render`` is a backend.

Fakes for tests live in ``apr_agents.testing``.

Engine backends import their engine lazily, so ``import apr_agents`` needs none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import (
    Backend,
    BackendError,
    BackendRequestError,
    BackendUnavailable,
    Completion,
    StreamingBackend,
    check_backend,
    route_key,
)

if TYPE_CHECKING:
    from .llamacpp import LlamaCppBackend
    from .openai_compat import OpenAICompatibleBackend
    from .vllm import VLLMBackend

__all__ = [
    "Backend", "BackendError", "BackendRequestError", "BackendUnavailable", "Completion", "LlamaCppBackend",
    "OpenAICompatibleBackend", "StreamingBackend", "VLLMBackend",
    "check_backend", "default_backend", "route_key",
]

_LAZY = {
    "LlamaCppBackend": ".llamacpp",
    "OpenAICompatibleBackend": ".openai_compat",
    "VLLMBackend": ".vllm",
}


def default_backend(**kwargs: Any) -> Any:
    """The embedded CPU default: the catalog default model (GGUF from PyPI) run by llama.cpp."""
    from .embedded import default_backend as _default

    return _default(**kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
