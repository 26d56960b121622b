"""ScriptedBackend: a FAKE, deterministic model for unit tests and overhead benchmarks.

It is no engine. A script says, for each context of a run (root ``""``, branch
``"1"``, nested branch ``"2/1"``), the whole text that context's model writes.
Like a real model it sees only the prompt: it finds which context the prompt
belongs to (the threads still open in it), skips what that context has
already written (segments found in order in the prompt), and returns the next
piece cut at the first stop string. Latency can be simulated per call, per
prompt token and per generated token, so tests can prove concurrency by wall
time.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ..backends.base import BackendError, Completion, complete_from_stream, first_stop
from ..protocol.dialects import TOOL_CALL_CLOSE, Dialect, get_dialect
from ..protocol.parser import StreamParser

Reply = str | Callable[[str], str]
ASSISTANT = "### Assistant\n"
_PIECE_RE = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> list[str]:
    """Whitespace-attached word pieces; ``''.join(tokenize(t)) == t``."""
    return _PIECE_RE.findall(text)


@dataclass(frozen=True)
class Rule:
    reply: Reply
    path: str = "*"  # "" root, "1", "2/1"; "*" any context
    contains: str | None = None  # regex that must match somewhere in the prompt


class ScriptedBackend:
    """FAKE backend (tests and overhead benchmarks only): replies by rules."""

    def __init__(
        self,
        script: Mapping[str, Reply] | Sequence[Rule] | Callable[[str], str],
        *,
        dialect: str | Dialect = "canonical",
        call_latency_s: float = 0.0,
        token_latency_s: float = 0.0,
        prefill_latency_s: float = 0.0,
        fail_first: int = 0,
        hang_on: str | None = None,
    ) -> None:
        if callable(script):
            self.rules: list[Rule] = [Rule(script)]
        elif isinstance(script, Mapping):
            self.rules = [Rule(reply, path=path) for path, reply in script.items()]
        else:
            self.rules = list(script)
        self.dialect = get_dialect(dialect)
        self.call_latency_s = call_latency_s
        self.token_latency_s = token_latency_s
        self.prefill_latency_s = prefill_latency_s  # per prompt token not seen before
        self.fail_first = fail_first
        self.hang_on = hang_on
        self.calls = 0
        self.calls_by_path: Counter[str] = Counter()
        self.prompts: list[str] = []
        self.cancelled = 0
        self._seen_prefixes: set[int] = set()
        self._splitters = sorted(  # where a context's script can be cut (outline closes: eager spawn)
            {s for s in (TOOL_CALL_CLOSE, self.dialect.spawn_marker, self.dialect.thread_close,
                         self.dialect.outline_close) if s}, key=len, reverse=True
        )

    # -- the Backend protocol --------------------------------------------------
    def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str:
        parts = []
        if tools:
            names = ", ".join(t.get("function", t).get("name", "?") for t in tools)
            parts.append(f"### Tools\n{names}\n")
        for m in messages:
            role = {SystemMessage: "System", HumanMessage: "User", AIMessage: "Assistant",
                    ToolMessage: "Tool"}.get(type(m), m.type)
            parts.append(f"### {role}\n{m.content}\n")
        parts.append(ASSISTANT)
        return "".join(parts)

    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                       temperature: float = 0.0) -> Completion:
        return await complete_from_stream(
            self.stream(prompt, stop=stop, max_tokens=max_tokens, temperature=temperature))

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        self.calls += 1
        self.prompts.append(prompt)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise BackendError("scripted failure (fail_first)")
        path, anchor = self.context_of(prompt)
        self.calls_by_path[path] += 1
        remaining = self._remaining(self._reply_for(prompt, path), prompt[anchor:])
        text, hit = first_stop(remaining, stop)
        pieces = tokenize(text)
        finish = "stop" if hit else "eos"
        if len(pieces) > max_tokens:
            pieces, hit, finish = pieces[:max_tokens], None, "length"
        prompt_pieces = len(tokenize(prompt))
        try:
            await self._prefill_delay(prompt, prompt_pieces)
            if self.hang_on is not None and self.hang_on in text:
                await asyncio.sleep(3600)
            for p in pieces:
                if self.token_latency_s:
                    await asyncio.sleep(self.token_latency_s)
                yield p
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield Completion(text="".join(pieces), stop=hit, finish_reason=finish,
                         prompt_tokens=prompt_pieces, completion_tokens=len(pieces))

    # -- helpers ---------------------------------------------------------------
    async def _prefill_delay(self, prompt: str, n_tokens: int) -> None:
        delay = self.call_latency_s
        if self.prefill_latency_s:
            # Simulated prefix cache: only the part past the longest cached prefix costs.
            cached = 0
            for cut in range(len(prompt), 0, -max(1, len(prompt) // 64)):
                if hash(prompt[:cut]) in self._seen_prefixes:
                    cached = cut
                    break
            for cut in range(len(prompt), 0, -max(1, len(prompt) // 64)):
                self._seen_prefixes.add(hash(prompt[:cut]))
            new_tokens = n_tokens * (len(prompt) - cached) / max(1, len(prompt))
            delay += self.prefill_latency_s * new_tokens
        if delay:
            await asyncio.sleep(delay)

    def context_of(self, prompt: str) -> tuple[str, int]:
        """Which context a prompt continues: its path of open thread labels, and where it starts."""
        start = prompt.rfind(ASSISTANT)
        start = 0 if start < 0 else start + len(ASSISTANT)
        p = StreamParser(self.dialect)
        p.feed(prompt[start:])
        opened = p.open_threads()
        if not opened:
            return "", start
        labels = [lbl or "?" for lbl, _ in opened]
        body = opened[-1][1]
        label_end = re.match(r"\s*[0-9.]+\s*:?", prompt[start + body:])
        return "/".join(labels), start + body + (label_end.end() if label_end else 0)

    def _reply_for(self, prompt: str, path: str) -> str:
        for rule in self.rules:
            if rule.path not in ("*", path):
                continue
            if rule.contains is not None and not re.search(rule.contains, prompt):
                continue
            return rule.reply(prompt) if callable(rule.reply) else rule.reply
        return ""

    def _remaining(self, reply: str, written: str) -> str:
        segments = self._segments(reply)
        pos = 0
        for k, seg in enumerate(segments):
            i = written.find(seg, pos)
            if i < 0:
                return "".join(segments[k:])
            pos = i + len(seg)
        return ""

    def _segments(self, reply: str) -> list[str]:
        pattern = "|".join(re.escape(s) for s in self._splitters)
        out, pos = [], 0
        for m in re.finditer(pattern, reply):
            out.append(reply[pos:m.end()])
            pos = m.end()
        if pos < len(reply):
            out.append(reply[pos:])
        return out
