"""The three spawn/merge dialects as data: markers, stop strings, branch and merge text.

Canonical (ThreadWeaver) and Multiverse are tag dialects; APR writes
``spawn([...json list...])`` in the parent and ends a child with ``join(``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"


@dataclass(frozen=True)
class Dialect:
    name: str
    parallel_open: str
    parallel_close: str | None
    outlines_open: str
    spawn_marker: str  # generation stops here: the spawn point
    outline_open: str
    outline_close: str
    thread_open: str
    thread_close: str
    thread_label_sep: str  # what follows thread_open before the label
    merge_closes_parallel: bool = True  # False: the model writes a conclusion, then closes
    extra_markers: tuple[str, ...] = ()

    @property
    def markers(self) -> tuple[str, ...]:
        tags = {
            self.parallel_open,
            self.outlines_open,
            self.spawn_marker,
            self.outline_open,
            self.outline_close,
            self.thread_open,
            self.thread_close,
            TOOL_CALL_OPEN,
            TOOL_CALL_CLOSE,
            TOOL_RESPONSE_OPEN,
            TOOL_RESPONSE_CLOSE,
            *self.extra_markers,
        }
        if self.parallel_close:
            tags.add(self.parallel_close)
        return tuple(sorted((t for t in tags if t), key=len, reverse=True))

    def stops(self, *, branch: bool, can_spawn: bool) -> list[str]:
        out = [TOOL_CALL_CLOSE]
        if can_spawn:
            out.append(self.spawn_marker)
        if branch:
            out.append(self.thread_close)
        return out

    def branch_suffix(self, label: str) -> str:
        """What a branch prompt adds after the shared prefix (SPEC §2.2)."""
        return f"{self.thread_open}{self.thread_label_sep}{label}:"

    def merge_text(self, threads: list[tuple[str, str]]) -> str:
        """The parent's continuation after a spawn: each thread in outline order."""
        parts = [f"{self.branch_suffix(label)}{text}{self.thread_close}\n" for label, text in threads]
        if self.parallel_close and self.merge_closes_parallel:
            parts.append(f"{self.parallel_close}\n")
        return "".join(parts)

    def spawn_suffix(self) -> str:
        """What follows the spawn marker in the shared branch prefix."""
        return "\n"

    def example(self, outlines: list[str]) -> str:
        """A spawn block as the model writes it, up to and including the spawn point: what
        instructions and worked examples show, so a prompt teaches the dialect it is parsed in."""
        body = "".join(f"{self.outline_open}{i}: {o}{self.outline_close}\n" for i, o in enumerate(outlines, 1))
        return f"{self.parallel_open}\n{self.outlines_open}\n{body}{self.spawn_marker}"


CANONICAL = Dialect(
    name="canonical",
    parallel_open="<Parallel>",
    parallel_close="</Parallel>",
    outlines_open="<Outlines>",
    spawn_marker="</Outlines>",
    outline_open="<Outline>",
    outline_close="</Outline>",
    thread_open="<Thread>",
    thread_close="</Thread>",
    thread_label_sep="",
)

MULTIVERSE = Dialect(
    name="multiverse",
    parallel_open="<Parallel>",
    parallel_close="</Parallel>",
    outlines_open="<Goal>",
    spawn_marker="</Goal>",
    outline_open="<Outline>",
    outline_close="</Outline>",
    thread_open="<Path>",
    thread_close="</Path>",
    thread_label_sep="\n",
    merge_closes_parallel=False,
    extra_markers=("<Conclusion>", "</Conclusion>"),
)


@dataclass(frozen=True)
class APRDialect(Dialect):
    """``spawn(["task a", "task b"])`` in the parent; a child ends at ``join(``."""

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.parallel_open, self.spawn_marker, self.thread_close, TOOL_CALL_OPEN,
                TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)

    def branch_suffix(self, label: str) -> str:
        return f"\n[child {label}]"

    def merge_text(self, threads: list[tuple[str, str]]) -> str:
        return "join(" + json.dumps([text.strip() for _, text in threads], ensure_ascii=False) + ")\n"

    def example(self, outlines: list[str]) -> str:
        return self.parallel_open + ", ".join(json.dumps(o, ensure_ascii=False) for o in outlines) + self.spawn_marker


APR = APRDialect(
    name="apr",
    parallel_open="spawn([",
    parallel_close=None,
    outlines_open="",
    spawn_marker="])",
    outline_open="",
    outline_close="",
    thread_open="",
    thread_close="join(",
    thread_label_sep="",
)

DIALECTS: dict[str, Dialect] = {"canonical": CANONICAL, "multiverse": MULTIVERSE, "apr": APR}


def get_dialect(name: str | Dialect) -> Dialect:
    if isinstance(name, Dialect):
        return name
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; choose one of {sorted(DIALECTS)}") from None


# Every marker of every dialect, so data can be neutralised whatever dialect runs.
_ALL_TAG_NAMES = (
    "Parallel", "Outlines", "Outline", "Thread", "Goal", "Path", "Conclusion",
    "tool_call", "tool_response", "Think",
)
_TAG_RE = re.compile(r"<(\s*/?\s*)(" + "|".join(_ALL_TAG_NAMES) + r")(\s*)>", re.IGNORECASE)
_FUNC_RE = re.compile(r"(spawn|join)(\s*)\(", re.IGNORECASE)  # no \b: "respawn([" holds the marker too


def neutralize(text: str) -> str:
    """Make protocol markers in data inert (SPEC §2.7) while keeping them readable.

    ``<Parallel>`` becomes ``&lt;Parallel&gt;`` and ``spawn(`` becomes ``spawn⁽``: no
    stop string, parser marker or tool-call tag survives, so data never forks,
    closes a thread or calls a tool.
    """
    text = _TAG_RE.sub(lambda m: f"&lt;{m.group(1)}{m.group(2)}{m.group(3)}&gt;", text)
    return _FUNC_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}\u207d", text)
