"""Pure helpers of the llama.cpp backend and its batched engine: stop strings, token prefixes, grammars.

No ``llama_cpp`` import: both modes of ``LlamaCppBackend`` (``llamacpp.py``) and
``BatchedEngine`` (``llamacpp_engine.py``) use these to cut generated text at
the earliest stop string, to stream only text that cannot still become one, to
measure the token prefix a request shares with a cached sequence, to keep the
serial mode's saved KV states (``PrefixStates``; a ``CacheSnapshot`` of them), and to turn a grammar argument
into the ``(GBNF text, root rule)`` pair llama.cpp takes; ``physical_cores`` is the
default thread count.

Usage::

    from apr_agents.backends.llamacpp_helpers import find_first, holdback
    found = find_first(text, stops, 0)          # (index, stop) or None
    safe = len(text) - holdback(text, stops)    # text[:safe] can be streamed
"""

from __future__ import annotations

import codecs
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def physical_cores() -> int:
    """The physical cores this process may run on (hyper-threads of one core count once).

    llama.cpp's own tools decode on that many threads; llama-cpp-python's default is
    half the logical CPUs, which on a machine without hyper-threading leaves half the
    cores idle (measured on 2 AVX2 cores, Qwen2.5-Coder-1.5B Q4_K_M: 95 ms a token on
    one thread, 56 ms on two). Linux reads the CPU topology; elsewhere, the CPU count.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores: set[str] = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


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


class PrefixStates:
    """Saved KV states keyed by the tokens they hold; least recently used out past ``capacity_bytes``.

    The serial ``LlamaCppBackend`` holds one sequence in its KV cache. Before a call
    drops tokens of it (another agent's prompt, a sibling branch), the backend saves
    the sequence here; a later call restores the saved state that shares the most
    tokens with its prompt instead of reading them again (what vLLM's prefix caching
    and llama.cpp server's slot save/restore do). A state whose tokens are a prefix of
    a newer one's is dropped: the newer one serves every prompt the older one could.

        states = PrefixStates(capacity_bytes=1 << 30)
        states.put(tokens, blob)
        found = states.best(prompt_tokens)   # (tokens, blob, shared) or None
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.size_bytes = 0

    def __len__(self) -> int:
        return len(self._states)

    def best(self, tokens: Sequence[int]) -> tuple[tuple[int, ...], bytes, int] | None:
        """The saved state sharing the longest token prefix with ``tokens`` (and that length)."""
        found: tuple[tuple[int, ...], bytes, int] | None = None
        for key, blob in self._states.items():
            shared = common_prefix(key, tokens)
            if shared > 0 and (found is None or shared > found[2]):
                found = (key, blob, shared)
        if found is not None:
            self._states.move_to_end(found[0])
        return found

    def put(self, tokens: Sequence[int], blob: bytes) -> None:
        """Keep ``blob`` (the KV state of ``tokens``); evict older states past the budget."""
        key = tuple(tokens)
        if len(blob) > self.capacity_bytes:
            return
        for old in [k for k in self._states if len(k) <= len(key) and key[: len(k)] == k]:
            self.size_bytes -= len(self._states.pop(old))
        self._states[key] = blob
        self.size_bytes += len(blob)
        while self.size_bytes > self.capacity_bytes:
            _, dropped = self._states.popitem(last=False)
            self.size_bytes -= len(dropped)

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether a saved state already holds all of ``tokens`` (saving them again adds nothing)."""
        n = len(tokens)
        return any(len(k) >= n and common_prefix(k, tokens) == n for k in self._states)

    def discard(self, tokens: Sequence[int]) -> None:
        """Forget the state saved for exactly ``tokens`` (one the engine refused to load)."""
        blob = self._states.pop(tuple(tokens), None)
        if blob is not None:
            self.size_bytes -= len(blob)

    def clear(self) -> None:
        self._states.clear()
        self.size_bytes = 0

    def items(self) -> list[tuple[tuple[int, ...], bytes]]:
        """The saved states, least recently used first."""
        return list(self._states.items())


@dataclass(frozen=True)
class CacheSnapshot:
    """What a ``LlamaCppBackend``'s prefix cache held at one moment (``snapshot_cache()``).

    ``sequences``: ``(sequence id, tokens, KV state)`` for every cached sequence; the
    serial mode's saved states have id ``-1``. The KV states are llama.cpp's own bytes,
    valid only for the context that wrote them (``restore_cache`` of the same backend).
    """

    sequences: tuple[tuple[int, tuple[int, ...], bytes], ...]

    @property
    def tokens(self) -> int:
        """Tokens held, over all sequences."""
        return sum(len(t) for _, t, _ in self.sequences)


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


class DecodedText:
    """The text of one call, built token by token: end tokens, stop strings, the token budget and
    streaming (``emit`` gets only text that cannot still turn into a stop string).

    ``take(token)`` returns False once the call is over; ``finish`` then says why (``"eos"``,
    ``"stop"`` with ``hit``, ``"length"``); ``close()`` returns the text.
    """

    def __init__(self, stops: Sequence[str], end_stops: Sequence[str], budget: int,
                 emit: Callable[[str], None] | None, is_end: Callable[[int], bool],
                 piece: Callable[[int], bytes]) -> None:
        self.stops = list(stops)
        self.all_stops = self.stops + list(end_stops)
        self.budget = budget
        self.emit = emit
        self._is_end = is_end
        self._piece = piece
        self._longest = max((len(s) for s in self.all_stops), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0
        self.n_out = 0
        self.hit: str | None = None
        self.finish: str | None = None
        self._cut = False

    def take(self, token: int) -> bool:
        if self._is_end(token):
            self.finish = "eos"
            return False
        return self._append(self._decoder.decode(self._piece(token)), 1)

    def take_text(self, text: str, n_tokens: int) -> bool:
        """Text that ``n_tokens`` more tokens hold (jump-forward's forced text), as ``take``."""
        return self._append(text, n_tokens)

    def _append(self, text: str, n_tokens: int) -> bool:
        self.n_out += n_tokens
        before = len(self.text)
        self.text += text
        found = (find_first(self.text, self.all_stops, max(0, before - self._longest + 1))
                 if self.all_stops else None)
        if found is not None:
            self.text, self._cut = self.text[: found[0]], True
            if found[1] in self.stops:
                self.hit, self.finish = found[1], "stop"
            else:
                self.finish = "eos"
            return False
        if self.n_out >= self.budget:
            self.finish = "length"
            return False
        if self.emit is not None:
            safe = len(self.text) - holdback(self.text, self.all_stops)
            if safe > self.emitted:
                self.emit(self.text[self.emitted:safe])
                self.emitted = safe
        return True

    def close(self, *, emit: bool = True) -> str:
        """The whole text (the decoder flushed unless a stop string cut it); streams what is left
        unless ``emit`` is False (a cancelled call)."""
        if not self._cut:
            self.text += self._decoder.decode(b"", final=True)
            self._cut = True
        if emit and self.emit is not None and len(self.text) > self.emitted:
            self.emit(self.text[self.emitted:])
            self.emitted = len(self.text)
        return self.text


__all__ = ["CacheSnapshot", "DecodedText", "PrefixStates", "common_prefix", "find_first", "grammar_source", "holdback",
           "physical_cores"]
