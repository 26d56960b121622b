"""Whole-text view: a transcript as a tree of parallel blocks, threads and repairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from .dialects import Dialect
from .parser import (
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
    parse_events,
)


@dataclass
class ThreadNode:
    label: str | None = None
    text: str = ""
    truncated: bool = False
    blocks: list[BlockNode] = field(default_factory=list)


@dataclass
class BlockNode:
    outlines: list[Outline] = field(default_factory=list)
    threads: list[ThreadNode] = field(default_factory=list)

    def walk(self) -> list[BlockNode]:
        out = [self]
        for t in self.threads:
            for b in t.blocks:
                out.extend(b.walk())
        return out


@dataclass
class Document:
    blocks: list[BlockNode] = field(default_factory=list)
    repairs: list[Repair] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    final_text: str = ""
    last_text: str = ""  # the last non-blank top-level text, even if a block came after it

    def all_blocks(self) -> list[BlockNode]:
        out: list[BlockNode] = []
        for b in self.blocks:
            out.extend(b.walk())
        return out


def parse_document(text: str, dialect: str | Dialect = "canonical") -> Document:
    doc = Document()
    # stack of containers: each item is a BlockNode or an open ThreadNode
    stack: list[BlockNode | ThreadNode] = []
    for ev in parse_events(text, dialect):
        top = stack[-1] if stack else None
        if isinstance(ev, ParallelOpen):
            blk = BlockNode()
            if isinstance(top, ThreadNode):
                top.blocks.append(blk)
            elif top is None:
                doc.blocks.append(blk)
            else:  # a block opened between threads: keep it at that block's level
                doc.blocks.append(blk)
            stack.append(blk)
            doc.final_text = ""
        elif isinstance(ev, Spawn) and isinstance(top, BlockNode):
            top.outlines = list(ev.outlines)
        elif isinstance(ev, ThreadOpen) and isinstance(top, BlockNode):
            th = ThreadNode()
            top.threads.append(th)
            stack.append(th)
        elif isinstance(ev, ThreadClose):
            # close the nearest open thread (nested blocks inside it are already closed)
            while stack and not isinstance(stack[-1], ThreadNode):
                stack.pop()
            if stack:
                th = stack.pop()
                assert isinstance(th, ThreadNode)
                th.label, th.text, th.truncated = ev.label, ev.text, ev.truncated
        elif isinstance(ev, ParallelClose):
            while stack and not isinstance(stack[-1], BlockNode):
                stack.pop()
            if stack:
                stack.pop()
            doc.final_text = ""
        elif isinstance(ev, Repair):
            doc.repairs.append(ev)
        elif isinstance(ev, ToolCall):
            doc.tool_calls.append(ev)
            if not stack:
                doc.final_text = ""
        elif isinstance(ev, ToolResponse) and not stack:
            doc.final_text = ""
        elif isinstance(ev, Text) and ev.depth == 0:
            doc.final_text += ev.text
            if ev.text.strip():
                doc.last_text = ev.text.strip()
    doc.final_text = doc.final_text.strip()
    return doc
