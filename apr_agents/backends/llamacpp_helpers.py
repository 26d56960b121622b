"""Pure helpers of the llama.cpp backend and its batched engine: stop strings, token prefixes, grammars.

No ``llama_cpp`` import: both modes of ``LlamaCppBackend`` (``llamacpp.py``) and
``BatchedEngine`` (``llamacpp_engine.py``) use these to cut generated text at
the earliest stop string, to stream only text that cannot still become one, to
measure the token prefix a request shares with a cached sequence, and to turn a
grammar argument into the ``(GBNF text, root rule)`` pair llama.cpp takes.

Usage::

    from apr_agents.backends.llamacpp_helpers import find_first, holdback
    found = find_first(text, stops, 0)          # (index, stop) or None
    safe = len(text) - holdback(text, stops)    # text[:safe] can be streamed
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still start a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_first(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]`` (the longest one on a tie)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def grammar_source(grammar: Any) -> tuple[str, str] | None:
    """``(GBNF text, root rule)`` from a GBNF string or a ``llama_cpp.LlamaGrammar``."""
    if grammar is None:
        return None
    if isinstance(grammar, str):
        return grammar, "root"
    text = getattr(grammar, "_grammar", None)
    if isinstance(text, str):
        return text, str(getattr(grammar, "_root", "root"))
    raise TypeError(f"grammar must be a GBNF string or a llama_cpp.LlamaGrammar, not {type(grammar).__name__}")


__all__ = ["common_prefix", "find_first", "grammar_source", "holdback"]
