"""The embedded CPU default: a catalog model from PyPI run in-process by llama.cpp.

``default_backend()`` returns a ``LlamaCppBackend`` over the catalog's default
model (``models.DEFAULT_MODEL``: Qwen2.5-Coder-1.5B-Instruct, chosen by
``apr eval``; see README and docs/eval.md) with what makes a small model
reliable here: its own chat template, tool results in their own turn, and
grammar-constrained decoding (``grammar="protocol"``: tool arguments that follow
each tool's schema, a tool call or spawn on a context's first step, no empty
answers). Nothing touches the network: the weights come from pip packages and
are assembled once into the user cache (``models.py``).

``APR_EMBEDDED_MODEL`` (a catalog name or a ``.gguf`` path) overrides the model.
``model_path()`` is the small Gemma 3 270M base file that the engine tests,
servers and the vLLM conversion use (fast to load).

Example::

    from apr_agents import create_apr_agent, default_backend

    graph = create_apr_agent(default_backend(), tools=[...])
    graph = create_apr_agent(default_backend(model="gemma-3-270m"), tools=[...])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import models
from .models import ENV_VAR, file_sha256

if TYPE_CHECKING:
    from .llamacpp import LlamaCppBackend

SMALL_MODEL = "gemma-3-270m"
INSTALL_HINT = "pip install 'apr-agents[embedded]' (llama-cpp-python==0.3.36 and the model packages)"


def cache_dir() -> Path:
    return models.cache_dir()


def model_path(directory: str | os.PathLike[str] | None = None) -> Path:
    """The small Gemma 3 270M base GGUF (assembled on first use; no network)."""
    return models.model_path(SMALL_MODEL, directory)


def default_backend(model: str | os.PathLike[str] | None = None, **kwargs: Any) -> LlamaCppBackend:
    """The embedded CPU default: ``LlamaCppBackend`` over a catalog model.

    Args:
        model: a catalog name (``apr models`` lists them), a ``.gguf`` path, or None
            for ``APR_EMBEDDED_MODEL`` or else ``models.DEFAULT_MODEL``.
        **kwargs: passed to ``LlamaCppBackend`` (``n_ctx``, ``n_threads``, ``seed``,
            ``grammar``, ``reuse_prefix``, ...); ``model_path`` is an alias of ``model``.

    Returns:
        A ready backend. Instruction-tuned (ChatML) models get their chat template and
        ``grammar="protocol"`` unless told otherwise; base models the few-shot prompt.
    """
    from .llamacpp import LlamaCppBackend

    model = kwargs.pop("model_path", None) or model
    spec: models.ModelSpec | None
    if model is None or str(model) in models.CATALOG:
        name = str(model) if model is not None else None
        path = models.model_path(name)
        spec = models.spec_for_path(path)
    else:
        path = Path(model).expanduser()
        spec = models.spec_for_path(path)
    if spec is not None and spec.prompt_style == "chatml":
        kwargs.setdefault("chat_template", True)
        kwargs.setdefault("grammar", "protocol")
        kwargs.setdefault("n_ctx", 8192)
    return LlamaCppBackend(path, **kwargs)


__all__ = ["ENV_VAR", "INSTALL_HINT", "SMALL_MODEL", "cache_dir", "default_backend", "file_sha256", "model_path"]
