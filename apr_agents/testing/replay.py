"""ReplayBackend: plays back a recorded parallel-reasoning transcript, segment by segment.

A FAKE model for tests and measurements, like :class:`ScriptedBackend`: it knows
one recorded root transcript (e.g. a Multiverse-32B output), and answers every
prompt the runtime sends with the text the recorded model wrote next *in that
context*, cut at the stop strings of the call, as an engine would have produced
it. The runtime, not the recording, decides where branches run: the backend
only has to tell from the prompt which context (the root, or which branch of
which spawn) it continues, and how far.

How the recording is cut into contexts (the execution semantics of SPEC §2):

* A context writes until a spawn marker (``</Goal>``, ``</Outlines>``) that
  closes the outlines of a block opened at its own top level. If its depth is
  below ``max_depth`` and the block has outlines, the runtime spawns there. A
  marker of a block the context writes inline (nested in another of its own
  open blocks, or past ``max_depth``) is plain text.
* Branch *i* of a spawn replays the *i*-th ``<Path>``/``<Thread>`` that follows
  in the recording (its body after the ``i:`` label). A branch ends at the first
  thread close at its own level (not inside a block it writes itself), or at the
  end of the recording. An outline for which the recording holds no further
  thread gets an empty branch (end of sequence at once).
* The parent goes on where the recording goes on after the last replayed
  thread (a newline the runtime's merge already wrote is skipped).

From this the backend precomputes, for every context, the exact text the
runtime will hold for it (``expected_text``: the model's pieces plus the
runtime's spawn suffixes and merges). Every call checks that the prompt is a
prefix of that text; when it is not, the runtime did something else than the
recording implies and :class:`ReplayDivergence` says where. That makes a replay
a test of the runtime: it must execute the structure the recording has.

Records with tool calls cannot be replayed (the tool responses are the
runtime's, not the model's) and are refused at construction; so is the APR
dialect. The run must not hit ``max_total_threads``, ``max_tokens`` or a
timeout, or the runtime's text and the expected text part ways.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ..backends.base import Completion, complete_from_stream, first_stop
from ..protocol.dialects import TOOL_CALL_CLOSE, Dialect, get_dialect
from ..protocol.parser import Spawn, StreamParser
from .scripted import tokenize

CHATML_ASSISTANT = "<|im_start|>assistant\n"
_LABEL_RE = re.compile(r"\s*([0-9]{1,9}(?:\.[0-9]{1,9})*)\s*:")


class ReplayDivergence(RuntimeError):
    """The runtime's prompt is not what the recording implies at this point (not retried)."""


@dataclass
class _Span:
    start: int  # in the context's expected text
    end: int
    terminator: str  # what the model writes after text[start:end] that the runtime does not keep ("" or a close tag)


@dataclass
class _SpawnPoint:
    prefix_end: int  # in the parent's expected text: right after the spawn suffix
    merge_end: int
    children: dict[str, _Context]


@dataclass
class ReplayContext:
    """What the replay expects of one context: its text, how it ends, its spawns."""

    key: str  # "" for the root, "1.2/2.1": spawn number.label per level
    depth: int
    text: str = ""
    end: str = "eos"  # "eos" | "thread_end"
    record_start: int = 0
    record_end: int = 0
    spans: list[_Span] = field(default_factory=list)
    spawns: list[_SpawnPoint] = field(default_factory=list)

    def walk(self) -> list[ReplayContext]:
        out = [self]
        for sp in self.spawns:
            for child in sp.children.values():
                out.extend(child.walk())
        return out

    def span_at(self, pos: int) -> _Span | None:
        for s in self.spans:
            if s.start <= pos <= s.end:
                return s
        return None


_Context = ReplayContext


class ReplayBackend:
    """FAKE backend (tests and measurements only): replays one recorded transcript.

    ``record`` is the model's own text for the root context (no chat template).
    ``max_depth`` and ``max_threads`` must be those of the agent's ``APRConfig``:
    they decide which blocks the runtime executes. ``render`` turns the
    conversation into the prompt; the default is the ChatML (Qwen) template, and
    the model text starts after the last ``<|im_start|>assistant`` line.
    """

    def __init__(
        self,
        record: str,
        *,
        dialect: str | Dialect = "multiverse",
        max_depth: int = 2,
        max_threads: int = 8,
        render: Callable[[list[BaseMessage], list[dict[str, Any]]], str] | None = None,
        assistant_marker: str = CHATML_ASSISTANT,
        token_latency_s: float = 0.0,
    ) -> None:
        self.dialect = get_dialect(dialect)
        if self.dialect.name == "apr" or not self.dialect.thread_open:
            raise ValueError("ReplayBackend replays tag dialects (canonical, multiverse), not 'apr'")
        if TOOL_CALL_CLOSE in record:
            raise ValueError("a record with tool calls cannot be replayed: tool responses come from the runtime")
        self.record = record
        self.max_depth = max_depth
        self.max_threads = max_threads
        self._render = render
        self.assistant_marker = assistant_marker
        self.token_latency_s = token_latency_s
        self.calls = 0
        self.calls_by_context: Counter[str] = Counter()
        self.cancelled = 0
        self.root = self._emulate(0, depth=0, key="")

    # -- the Backend protocol ------------------------------------------------------
    def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str:
        if self._render is not None:
            return self._render(messages, tools)
        roles = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant", ToolMessage: "tool"}
        parts = [f"<|im_start|>{roles.get(type(m), m.type)}\n{m.content}<|im_end|>\n" for m in messages]
        return "".join(parts) + self.assistant_marker

    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                       temperature: float = 0.0) -> Completion:
        return await complete_from_stream(
            self.stream(prompt, stop=stop, max_tokens=max_tokens, temperature=temperature))

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        self.calls += 1
        ctx, written = self.locate(prompt)
        self.calls_by_context[ctx.key] += 1
        text, hit = self.next_segment(ctx, written, stop)
        pieces = tokenize(text)
        finish = "stop" if hit else "eos"
        if len(pieces) > max_tokens:
            pieces, hit, finish = pieces[:max_tokens], None, "length"
        try:
            for p in pieces:
                if self.token_latency_s:
                    await asyncio.sleep(self.token_latency_s)
                yield p
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield Completion(text="".join(pieces), stop=hit, finish_reason=finish,
                         prompt_tokens=len(tokenize(prompt)), completion_tokens=len(pieces))

    # -- inspection ------------------------------------------------------------------
    def contexts(self) -> list[ReplayContext]:
        """Every context the replay expects the runtime to run, root first, depth-first."""
        return self.root.walk()

    # -- prompt -> (context, text written so far) ----------------------------------
    def locate(self, prompt: str) -> tuple[ReplayContext, str]:
        anchors = [m.end() for m in re.finditer(re.escape(self.assistant_marker), prompt)] or [0]
        errors = []
        for a in reversed(anchors):
            try:
                return self._descend(prompt[a:])
            except ReplayDivergence as exc:
                errors.append(str(exc))
        raise ReplayDivergence(errors[0])

    def _descend(self, written: str) -> tuple[ReplayContext, str]:
        ctx = self.root
        while True:
            if ctx.text.startswith(written) and ctx.span_at(len(written)) is not None:
                return ctx, written
            for sp in reversed(ctx.spawns):
                if len(written) < sp.prefix_end or not written.startswith(ctx.text[: sp.prefix_end]):
                    continue
                rest = written[sp.prefix_end:]
                child = next(((lbl, c) for lbl, c in sp.children.items()
                              if rest.startswith(self.dialect.branch_suffix(lbl))), None)
                if child is None:
                    continue
                written = rest[len(self.dialect.branch_suffix(child[0])):]
                ctx = child[1]
                break
            else:
                common = _common_prefix(ctx.text, written)
                raise ReplayDivergence(
                    f"context {ctx.key or 'root'!r}: the prompt's text departs from the recording at "
                    f"character {common} of {len(written)}: expected {ctx.text[common:common + 60]!r}, "
                    f"got {written[common:common + 60]!r}")

    def next_segment(self, ctx: ReplayContext, written: str, stop: list[str]) -> tuple[str, str | None]:
        span = ctx.span_at(len(written))
        assert span is not None  # _descend only returns positions inside a span
        remaining = ctx.text[len(written): span.end]
        if span.end < len(ctx.text) and ctx.text[span.end - len(self.dialect.spawn_marker): span.end] \
                == self.dialect.spawn_marker and self.dialect.spawn_marker not in stop:
            raise ReplayDivergence(
                f"context {ctx.key or 'root'!r}: the recording spawns at character {span.end}, but the "
                f"runtime did not ask to stop at {self.dialect.spawn_marker!r} (stops: {stop})")
        return first_stop(remaining + span.terminator, stop)

    # -- the recording -> the contexts the runtime will run ----------------------------
    def _emulate(self, start: int, *, depth: int, key: str) -> ReplayContext:
        d = self.dialect
        rec = self.record
        ctx = ReplayContext(key=key, depth=depth, record_start=start)
        own = StreamParser(d)
        pos = start
        text: list[str] = []
        length = 0
        span_start = 0
        stops = [d.spawn_marker, d.thread_close] if depth > 0 else [d.spawn_marker]
        pattern = re.compile("|".join(re.escape(s) for s in stops))

        def add(s: str) -> None:
            nonlocal length
            text.append(s)
            length += len(s)

        while True:
            m = pattern.search(rec, pos)
            if m is None:
                add(rec[pos:])
                own.feed(rec[pos:])
                ctx.spans.append(_Span(span_start, length, ""))
                ctx.end, ctx.record_end = "eos", len(rec)
                break
            before, mk = rec[pos:m.start()], m.group(0)
            own.feed(before)
            if mk == d.thread_close:
                if own.depth == 0:  # a close at the branch's own level ends it
                    add(before)
                    ctx.spans.append(_Span(span_start, length, mk))
                    ctx.end, ctx.record_end = "thread_end", m.end()
                    break
                add(before + mk)
                own.feed(mk)
                pos = m.end()
                continue
            # a spawn marker: does it close the outlines of a block at the context's top level?
            spawned = [ev for ev in own.feed(mk) if isinstance(ev, Spawn) and ev.depth == 1]
            add(before + mk)
            pos = m.end()
            if not spawned or depth >= self.max_depth:
                continue
            ctx.spans.append(_Span(span_start, length, ""))
            outlines = list(spawned[-1].outlines)[: self.max_threads]
            add(d.spawn_suffix())
            if rec.startswith(d.spawn_suffix(), pos):
                pos += len(d.spawn_suffix())
            if not outlines:  # the runtime records an empty spawn and lets the model go on
                span_start = length
                continue
            prefix_end = length
            children: dict[str, ReplayContext] = {}
            for o in outlines:
                child_start = self._next_thread(pos)
                ck = f"{key}/{len(ctx.spawns) + 1}.{o.label}" if key else f"{len(ctx.spawns) + 1}.{o.label}"
                if child_start is None:  # nothing left to replay for this outline: an empty branch
                    child = ReplayContext(key=ck, depth=depth + 1, record_start=pos, record_end=pos,
                                          spans=[_Span(0, 0, "")])
                else:
                    child = self._emulate(child_start, depth=depth + 1, key=ck)
                    pos = child.record_end
                children[o.label] = child
            merged = d.merge_text([(lbl, c.text) for lbl, c in children.items()])
            add(merged)
            own.feed(merged)
            pos = self._skip_merged_tail(pos)
            ctx.spawns.append(_SpawnPoint(prefix_end, length, children))
            span_start = length
        ctx.text = "".join(text)
        return ctx

    def _skip_merged_tail(self, pos: int) -> int:
        """Where the model goes on after a merge: past what the merge wrote after the last thread."""
        d = self.dialect
        rec = self.record
        if rec.startswith("\n", pos):
            pos += 1
        if d.parallel_close and d.merge_closes_parallel:  # canonical: the merge closed the block too
            j = pos
            while j < len(rec) and rec[j].isspace():
                j += 1
            if rec.startswith(d.parallel_close, j):
                pos = j + len(d.parallel_close)
                if rec.startswith("\n", pos):
                    pos += 1
        return pos

    def _next_thread(self, pos: int) -> int | None:
        """Body start of the thread that follows ``pos`` after nothing but whitespace, if any."""
        d = self.dialect
        rec = self.record
        i = pos
        while i < len(rec) and rec[i].isspace():
            i += 1
        if not rec.startswith(d.thread_open, i):
            return None
        i += len(d.thread_open)
        m = _LABEL_RE.match(rec, i)
        return m.end() if m else i


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:  # binary search on prefix equality: fast for long texts
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
