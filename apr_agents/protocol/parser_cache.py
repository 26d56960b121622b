"""Each context's parse, kept between its steps: a ``StreamParser`` per (run, context), LRU by size.

A text-mode step feeds the parser only what the context text gained since the last step (the
model's text, tool responses, merged threads) instead of parsing the whole context again. A
miss (a resumed run, another process, a text that is not a continuation of the one parsed)
parses the whole text, which is always correct. The cache is bounded in characters of
context text (a parser holds about its text again, so ~2-3x that in bytes at most); the
least recently used contexts go first, which are those of abandoned runs.

Usage::

    cache = ParserCache(lambda: StreamParser(dialect), max_chars=32 * 2**20)
    parser = cache.parser_of(key, text)        # has consumed exactly ``text``
    events = cache.feed(key, parser, text + piece, piece)
    cache.drop(key)                            # the context ended, failed or was cancelled
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from .parser import StreamParser

#: characters of context text whose parse is kept between steps (LRU over contexts)
PARSER_CACHE_CHARS = 32 * 2**20


class ParserCache:
    """Parsers of live contexts, keyed by e.g. ``(run_id, context_id)``."""

    def __init__(self, new_parser: Callable[[], StreamParser], max_chars: int = PARSER_CACHE_CHARS) -> None:
        self.new_parser = new_parser
        self.max_chars = max_chars
        self._parsers: OrderedDict[Hashable, tuple[StreamParser, str]] = OrderedDict()
        self.chars = 0  # characters of context text the cached parsers hold

    def __len__(self) -> int:
        return len(self._parsers)

    def parser_of(self, key: Hashable, text: str) -> StreamParser:
        """A parser that has consumed exactly ``text``."""
        hit = self.drop(key)
        if hit is not None and text.startswith(hit[1]):
            parser, seen = hit
            parser.feed(text[len(seen):])
        else:
            parser = self.new_parser()
            parser.feed(text)
        self.keep(key, parser, text)
        return parser

    def feed(self, key: Hashable, parser: StreamParser, text: str, piece: str) -> list[Any]:
        """Feed ``piece``, the end of ``text``, and remember that the parser has seen ``text``."""
        events = parser.feed(piece)
        self.drop(key)
        self.keep(key, parser, text)
        return events

    def keep(self, key: Hashable, parser: StreamParser, text: str) -> None:
        """Cache a context's parse; evict the least recently used past ``max_chars``."""
        self._parsers[key] = (parser, text)
        self.chars += len(text)
        while self.chars > self.max_chars and len(self._parsers) > 1:
            _, (_, old) = self._parsers.popitem(last=False)
            self.chars -= len(old)

    def drop(self, key: Hashable) -> tuple[StreamParser, str] | None:
        hit = self._parsers.pop(key, None)
        if hit is not None:
            self.chars -= len(hit[1])
        return hit

    def texts(self) -> list[str]:
        return [text for _, text in self._parsers.values()]
