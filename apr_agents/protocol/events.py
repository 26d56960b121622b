"""The protocol's events: what ``StreamParser`` makes of model text (SPEC §2).

Each event is a frozen dataclass; ``Event`` is their union. ``Repair`` records what the
parser mended in malformed text (a duplicated label, an unclosed block, ...).

Usage::

    from apr_agents.protocol import Spawn, StreamParser

    spawns = [ev for ev in StreamParser().feed(text) if isinstance(ev, Spawn)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Text:
    text: str
    depth: int


@dataclass(frozen=True)
class ParallelOpen:
    depth: int


@dataclass(frozen=True)
class Outline:
    label: str  # unique within its spawn (repaired if the model duplicated or omitted it)
    text: str
    written_label: str | None = None


@dataclass(frozen=True)
class Spawn:
    outlines: tuple[Outline, ...]
    depth: int


@dataclass(frozen=True)
class ThreadOpen:
    depth: int


@dataclass(frozen=True)
class ThreadClose:
    label: str | None
    text: str
    depth: int
    truncated: bool = False


@dataclass(frozen=True)
class BranchEnd:
    """A thread-close marker with no thread open here: it ends the enclosing branch."""

    text: str


@dataclass(frozen=True)
class ParallelClose:
    depth: int
    threads: int


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    raw: str
    error: str | None = None


@dataclass(frozen=True)
class ToolResponse:
    text: str


@dataclass(frozen=True)
class Repair:
    kind: str
    detail: str


Event = (
    Text | ParallelOpen | Outline | Spawn | ThreadOpen | ThreadClose | BranchEnd
    | ParallelClose | ToolCall | ToolResponse | Repair
)
