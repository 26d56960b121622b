"""Incremental parser: model text in chunks of any size -> protocol events.

It never raises on bad text. Malformed, unclosed, duplicated or mis-numbered
blocks become events plus ``Repair`` records. Text between markers is emitted
as one ``Text`` event, so the event list does not depend on how the input was
chunked (a property the fuzz tests check). The events are in ``events.py``.

Usage::

    parser = StreamParser("canonical")
    for piece in model_stream:
        for ev in parser.feed(piece):
            ...
    events = parser.close()
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from functools import lru_cache

from .dialects import (
    APR,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    Dialect,
    get_dialect,
)
from .events import (
    BranchEnd,
    Event,
    Outline,
    ParallelClose,
    ParallelOpen,
    Repair,
    Spawn,
    Text,
    ThreadClose,
    ThreadOpen,
    ToolCall,
    ToolResponse,
)

_LABEL_RE = re.compile(r"^\s*([0-9]{1,9}(?:\.[0-9]{1,9})*)\s*[:.)]?\s?", re.DOTALL)


def split_label(text: str) -> tuple[str | None, str]:
    m = _LABEL_RE.match(text)
    if not m:
        return None, text.strip()
    return m.group(1), text[m.end():].strip()


@lru_cache(maxsize=16)
def _scanner(dialect: Dialect) -> tuple[re.Pattern[str], frozenset[str], int]:
    """Marker regex, marker prefixes (to hold back a split marker) and longest marker length."""
    markers = dialect.markers
    return (re.compile("|".join(re.escape(m) for m in markers)),
            frozenset(m[:i] for m in markers for i in range(1, len(m))),
            max(len(m) for m in markers))


def _labelled(written: list[tuple[str | None, str]], events: list[Event]) -> list[Outline]:
    """Outlines with unique labels: a missing number becomes the position, a duplicate the
    position (primed until unique); each repair is recorded in ``events``."""
    outs: list[Outline] = []
    seen: set[str] = set()
    for i, (label, text) in enumerate(written, 1):
        final = label
        if label is None:
            events.append(Repair("missing_outline_number", f"outline {i}"))
            final = str(i)
        if final in seen:
            events.append(Repair("duplicate_outline_number", f"{label} at position {i}"))
            final = str(i)
            while final in seen:
                final += "'"
        seen.add(final)
        outs.append(Outline(final, text, label))
    return outs


@dataclass
class _Block:
    outlines: list[tuple[str | None, str]] = field(default_factory=list)
    spawned: bool = False
    threads: int = 0
    thread_start: int | None = None  # offset in the raw text where the open thread's body starts
    outline_start: int | None = None


class StreamParser:
    """Feed text, get events. ``close()`` flushes and closes what is left open."""

    def __init__(self, dialect: str | Dialect = "canonical", *, max_outlines: int = 100_000) -> None:
        self.dialect = get_dialect(dialect)
        self.max_outlines = max_outlines
        self._marker_re, self._prefixes, self._maxlen = _scanner(self.dialect)
        self._pending = ""  # unscanned tail, possibly a split marker
        self._raw: list[str] = []  # consumed text in pieces; _starts[i] is where piece i starts
        self._starts: list[int] = []
        self._loose = 0  # pieces appended since the last merge
        self._raw_len = 0
        self._text_start = 0  # start of the text run not yet emitted
        self._mode = "text"  # text | tool_call | tool_response | apr_spawn | apr_join
        self._mode_start = 0
        self._json_scan = (0, False, False)  # (offset, in a string, after a backslash) in a join payload
        self._stack: list[_Block] = []
        self.closed = False
        d = self.dialect
        self._outline_data = frozenset(  # markers that are text while an outline is open
            # (a thread open still ends an unclosed outline: models write <Outline>... <Thread>)
            m for m in (d.parallel_open, d.parallel_close, d.outlines_open, d.thread_close,
                        TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE, *d.extra_markers)
            if m and d.outline_open)

    # -- public -------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._stack)

    @property
    def in_tool_call(self) -> bool:
        """Inside an open ``<tool_call>``: every marker is argument data until ``</tool_call>``."""
        return self._mode == "tool_call"

    @property
    def raw(self) -> str:
        if len(self._raw) > 1:
            self._raw, self._starts, self._loose = ["".join(self._raw)], [0], 0
        return self._raw[0] if self._raw else ""

    def open_threads(self) -> list[tuple[str | None, int]]:
        """(label, body offset) of each thread still open, outermost first."""
        out = []
        for blk in self._stack:
            if blk.thread_start is not None:
                label, _ = split_label(self._slice(blk.thread_start, blk.thread_start + 40))
                out.append((label, blk.thread_start))
        return out

    def feed(self, chunk: str) -> list[Event]:
        if self.closed or not chunk:
            return []
        events: list[Event] = []
        buf = self._pending + chunk
        pos = 0
        while True:
            m = self._marker_re.search(buf, pos)
            if m is None:
                break
            self._consume(buf[pos:m.start()])
            self._on_marker(m.group(0), events)
            pos = m.end()
        rest = buf[pos:]
        hold = self._held_prefix(rest)
        self._consume(rest[: len(rest) - hold])
        self._pending = rest[len(rest) - hold:] if hold else ""
        return events

    def close(self) -> list[Event]:
        if self.closed:
            return []
        events: list[Event] = []
        self._consume(self._pending)
        self._pending = ""
        if self._mode == "tool_call":
            events.append(Repair("unclosed_tool_call", self._slice(self._mode_start)[:200]))
            self._mode = "text"
            self._text_start = self._raw_len
        elif self._mode == "tool_response":
            events.append(ToolResponse(self._slice(self._mode_start)))
            events.append(Repair("unclosed_tool_response", ""))
            self._mode = "text"
            self._text_start = self._raw_len
        elif self._mode == "apr_spawn":
            events.append(Repair("unclosed_spawn", self._slice(self._mode_start)[:200]))
            self._mode = "text"
        elif self._mode == "apr_join":
            events.append(Repair("unclosed_join", self._slice(self._mode_start)[:200]))
            self._mode = "text"
            self._text_start = self._raw_len
        self._flush_text(events)
        while self._stack:
            blk = self._stack[-1]
            if blk.outline_start is not None:
                self._finish_outline(blk, events, repaired=True)
            if not blk.spawned:
                self._spawn(blk, events, repaired=True)
            if blk.thread_start is not None:
                self._close_thread(blk, events, truncated=True)
            events.append(Repair("unclosed_parallel", f"depth {len(self._stack)}"))
            self._stack.pop()
            events.append(ParallelClose(len(self._stack) + 1, blk.threads))
        self.closed = True
        return events

    # -- internals ----------------------------------------------------------
    def _held_prefix(self, rest: str) -> int:
        for k in range(min(len(rest), self._maxlen - 1), 0, -1):
            if rest[-k:] in self._prefixes:
                return k
        return 0

    def _in_json_string(self, end: int) -> bool:
        """Whether raw offset ``end`` of the spawn or join payload lies inside a JSON string (scanned once)."""
        pos, inside, esc = self._json_scan
        if pos < self._mode_start:
            pos, inside, esc = self._mode_start, False, False
        for ch in self._slice(pos, end):
            if esc:
                esc = False
            elif ch == "\\":
                esc = inside
            elif ch == '"':
                inside = not inside
        self._json_scan = (end, inside, esc)
        return inside

    def _consume(self, s: str) -> None:
        if s:
            self._raw.append(s)
            self._starts.append(self._raw_len)
            self._raw_len += len(s)
            self._loose += 1
            if self._loose >= 64:  # merge recent pieces: few pieces, and each character merged once
                k = len(self._raw) - self._loose
                self._raw[k:] = ["".join(self._raw[k:])]
                del self._starts[k + 1:]
                self._loose = 0

    def _slice(self, start: int, end: int | None = None) -> str:
        """Text between two offsets. Joins only the pieces that hold it: joining the whole text at
        every marker made parsing quadratic (a 10,000-outline reply took minutes)."""
        end = self._raw_len if end is None else min(end, self._raw_len)
        if start >= end:
            return ""
        i = bisect_right(self._starts, start) - 1
        j = bisect_left(self._starts, end, i + 1)
        base = self._starts[i]
        piece = self._raw[i] if j == i + 1 else "".join(self._raw[i:j])
        return piece[start - base:end - base]

    def _flush_text(self, events: list[Event]) -> None:
        if self._mode == "text" and self._raw_len > self._text_start:
            blk = self._stack[-1] if self._stack else None
            if blk is None or blk.outline_start is None:
                events.append(Text(self._slice(self._text_start), len(self._stack)))
        self._text_start = self._raw_len

    def _on_marker(self, mk: str, events: list[Event]) -> None:
        d = self.dialect
        if self._mode == "tool_response":
            if mk == TOOL_RESPONSE_CLOSE:
                events.append(ToolResponse(self._slice(self._mode_start)))
                self._mode = "text"
                self._consume(mk)
                self._text_start = self._raw_len
            else:
                self._consume(mk)
            return
        if self._mode == "tool_call":
            if mk == TOOL_CALL_CLOSE:
                events.append(parse_tool_call(self._slice(self._mode_start)))
                self._mode = "text"
                self._consume(mk)
                self._text_start = self._raw_len
            else:
                self._consume(mk)
            return
        if self._mode == "apr_join":  # the parent's join([...results...]): data, not structure
            # a "])" inside one of the JSON strings (code in a branch's text) does not end it
            end = mk == d.spawn_marker and not self._in_json_string(self._raw_len)
            self._consume(mk)
            if end:
                self._mode = "text"
                self._text_start = self._raw_len
            return
        if self._mode == "apr_spawn":
            # like join: a "])" inside one of the task strings does not end the spawn list
            if mk == d.spawn_marker and not self._in_json_string(self._raw_len):
                self._apr_spawn(events)
                self._consume(mk)
                self._text_start = self._raw_len
            else:
                self._consume(mk)
            return

        blk = self._stack[-1] if self._stack else None
        if blk is not None and blk.outline_start is not None and mk in self._outline_data:
            # a block tag or a thread close inside an outline is the outline's text: only the
            # outline's close, a next outline, the spawn point or a thread open end it (recorded)
            events.append(Repair("marker_in_outline", mk))
            self._consume(mk)
            return
        self._flush_text(events)
        if mk == TOOL_CALL_OPEN:
            self._consume(mk)
            self._mode, self._mode_start = "tool_call", self._raw_len
        elif mk == TOOL_RESPONSE_OPEN:
            self._consume(mk)
            self._mode, self._mode_start = "tool_response", self._raw_len
        elif mk == TOOL_CALL_CLOSE or mk == TOOL_RESPONSE_CLOSE:
            events.append(Repair("stray_close", mk))
            self._consume(mk)
        elif mk == d.parallel_open:
            if blk is not None and blk.thread_start is None:
                events.append(Repair("parallel_outside_thread", f"depth {len(self._stack)}"))
            self._consume(mk)
            self._stack.append(_Block())
            events.append(ParallelOpen(len(self._stack)))
            if d is APR or d.name == "apr":
                self._mode, self._mode_start = "apr_spawn", self._raw_len
        elif d.outlines_open and mk == d.outlines_open:
            self._consume(mk)
            if blk is None or blk.spawned:
                events.append(Repair("stray_outlines", f"{mk} outside an open block"))
        elif d.outline_open and mk == d.outline_open:
            if blk is None or blk.spawned:
                events.append(Repair("stray_outline", f"{mk} outside an open block"))
                self._consume(mk)
                self._text_start = self._raw_len - len(mk)
                return
            if blk.outline_start is not None:
                self._finish_outline(blk, events, repaired=True)
            self._consume(mk)
            blk.outline_start = self._raw_len
        elif d.outline_close and mk == d.outline_close:
            if blk is None or blk.outline_start is None:
                events.append(Repair("stray_close", mk))
                self._consume(mk)
                return
            self._finish_outline(blk, events)
            self._consume(mk)
        elif mk == d.spawn_marker:
            self._consume(mk)
            if blk is None or blk.spawned:
                events.append(Repair("stray_spawn_marker", mk))
                return
            if blk.outline_start is not None:
                self._finish_outline(blk, events, repaired=True, end=self._raw_len - len(mk))
            self._spawn(blk, events)
        elif d.thread_open and mk == d.thread_open:
            if blk is None:
                events.append(Repair("stray_thread", f"{mk} outside a block"))
                self._consume(mk)
                self._text_start = self._raw_len - len(mk)
                return
            if not blk.spawned:
                if blk.outline_start is not None:  # an unclosed outline ends where the thread starts
                    self._finish_outline(blk, events, repaired=True)
                self._spawn(blk, events, repaired=True)
            if blk.thread_start is not None:
                self._close_thread(blk, events, truncated=True)
                events.append(Repair("unclosed_thread", "a thread opened before the previous one closed"))
            self._consume(mk)
            blk.thread_start = self._raw_len
            events.append(ThreadOpen(len(self._stack)))
        elif mk == d.thread_close:
            if d.name == "apr" and blk is not None:
                # ``join(`` in a parent closes its spawn block; its results list follows.
                self._consume(mk)
                self._stack.pop()
                events.append(ParallelClose(len(self._stack) + 1, len(blk.outlines)))
                self._mode, self._mode_start = "apr_join", self._raw_len
                return
            elif blk is None:
                events.append(BranchEnd(self.raw))
                self._consume(mk)
            elif blk.thread_start is None:
                events.append(Repair("stray_close", mk))
                self._consume(mk)
            else:
                self._close_thread(blk, events)
                self._consume(mk)
        elif d.parallel_close and mk == d.parallel_close:
            self._consume(mk)
            if blk is None:
                events.append(Repair("stray_close", mk))
                return
            if blk.outline_start is not None:
                self._finish_outline(blk, events, repaired=True, end=self._raw_len - len(mk))
            if not blk.spawned:
                self._spawn(blk, events, repaired=True)
            if blk.thread_start is not None:
                self._close_thread(blk, events, truncated=True, end=self._raw_len - len(mk))
                events.append(Repair("unclosed_thread", "block closed with a thread open"))
            self._stack.pop()
            events.append(ParallelClose(len(self._stack) + 1, blk.threads))
        else:  # dialect extras (Conclusion tags): plain text with structure
            self._consume(mk)
            self._text_start = self._raw_len - len(mk)
            return
        self._text_start = self._raw_len

    def closed_outlines(self) -> list[tuple[str, str]]:
        """``(label, text)`` of each outline closed so far in the open, not yet spawned block at
        the top level (for eager spawn), labelled as the spawn will label them (``_labelled``)."""
        if len(self._stack) != 1 or self._stack[0].spawned:
            return []
        return [(o.label, o.text) for o in _labelled(self._stack[0].outlines[: self.max_outlines], [])]

    def _finish_outline(self, blk: _Block, events: list[Event], *, repaired: bool = False,
                        end: int | None = None) -> None:
        assert blk.outline_start is not None
        body = self._slice(blk.outline_start, end)
        blk.outline_start = None
        if repaired:
            events.append(Repair("unclosed_outline", body[:80]))
        if len(blk.outlines) >= self.max_outlines:
            if len(blk.outlines) == self.max_outlines:
                events.append(Repair("too_many_outlines", f"more than {self.max_outlines}; the rest are ignored"))
                blk.outlines.append((None, ""))  # sentinel so the repair is recorded once
            return
        blk.outlines.append(split_label(body))

    def _spawn(self, blk: _Block, events: list[Event], *, repaired: bool = False) -> None:
        blk.spawned = True
        written = blk.outlines[: self.max_outlines]
        if repaired:
            events.append(Repair("missing_spawn_marker", f"{len(written)} outlines"))
        events.append(Spawn(tuple(_labelled(written, events)), len(self._stack)))

    def _close_thread(self, blk: _Block, events: list[Event], *, truncated: bool = False,
                      end: int | None = None) -> None:
        assert blk.thread_start is not None
        body = self._slice(blk.thread_start, end)
        blk.thread_start = None
        blk.threads += 1
        label, _ = split_label(body)
        events.append(ThreadClose(label, body, len(self._stack), truncated))

    def _apr_spawn(self, events: list[Event]) -> None:
        body = self._slice(self._mode_start)
        self._mode = "text"
        blk = self._stack[-1]
        try:
            items = json.loads("[" + body + "]")
            if not isinstance(items, list):
                raise ValueError("not a list")
        except (ValueError, RecursionError) as exc:
            events.append(Repair("bad_spawn_arguments", f"{exc}"[:200]))
            items = [s.strip().strip('"') for s in body.split(",") if s.strip()]
        for i, item in enumerate(items[: self.max_outlines], 1):
            blk.outlines.append((str(i), item if isinstance(item, str) else json.dumps(item)))
        if len(items) > self.max_outlines:
            events.append(Repair("too_many_outlines", f"{len(items)} > {self.max_outlines}"))
        self._spawn(blk, events)


def parse_tool_call(body: str) -> ToolCall:
    raw = body.strip()
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return ToolCall("", {}, raw, f"tool call is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return ToolCall("", {}, raw, "tool call must be a JSON object with 'name' and 'arguments'")
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return ToolCall(str(name or ""), {}, raw, "tool call 'arguments' is a string that is not JSON")
    if not isinstance(name, str) or not name:
        return ToolCall("", {}, raw, "tool call has no 'name'")
    if not isinstance(args, dict):
        return ToolCall(name, {}, raw, "tool call 'arguments' must be a JSON object")
    return ToolCall(name, args, raw)


def parse_events(text: str, dialect: str | Dialect = "canonical", *, chunk: int | None = None) -> list[Event]:
    p = StreamParser(dialect)
    out: list[Event] = []
    if chunk:
        for i in range(0, len(text), chunk):
            out.extend(p.feed(text[i:i + chunk]))
    else:
        out.extend(p.feed(text))
    out.extend(p.close())
    return out
