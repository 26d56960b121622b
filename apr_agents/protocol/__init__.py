"""Text protocol: dialects, the incremental parser and the whole-document view."""

from .dialects import APR, CANONICAL, DIALECTS, MULTIVERSE, Dialect, get_dialect, neutralize
from .document import BlockNode, Document, ThreadNode, parse_document
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
from .parser import StreamParser, parse_events, parse_tool_call

__all__ = [
    "APR", "CANONICAL", "DIALECTS", "MULTIVERSE", "BlockNode", "BranchEnd", "Dialect", "Document",
    "Event", "Outline", "ParallelClose", "ParallelOpen", "Repair", "Spawn", "StreamParser", "Text",
    "ThreadClose", "ThreadNode", "ThreadOpen", "ToolCall", "ToolResponse", "get_dialect", "neutralize",
    "parse_document", "parse_events", "parse_tool_call",
]
