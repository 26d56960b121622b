"""Merge strategies: what a spawn's merge writes into the parent context.

The default (SPEC §2.4, ``merge_strategy=None``) writes every branch whole, as
``<Thread>i: text</Thread>`` in outline order: the parent re-reads each branch's
tool calls and tool results. ``thread_conclusions`` writes the same blocks with
each branch's tool calls and tool results left out, so the parent reads what the
branch concluded (its prose), which is what APR's ``join`` hands back: on an
engine that re-reads the merged text token by token (any engine: the threads
were decoded in other sequences) that is the difference between re-reading a
tool's whole record and one sentence per branch. A branch that wrote no prose
(cut off right after its tool result) keeps its text whole, so nothing it found
is lost.

Usage::

    from apr_agents import create_apr_agent
    from apr_agents.graph.merge import thread_conclusions

    graph = create_apr_agent(backend, tools, merge_strategy=thread_conclusions)
    graph = create_apr_agent(backend, tools, merge_strategy=merge_strategy("conclusions"))  # by name

``merge_strategy(name)`` maps the names the command line takes (``full``, ``conclusions``) to
what ``create_apr_agent`` takes, so every front end reads them alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..protocol.dialects import Dialect

_TOOL_BLOCKS = re.compile(r"<tool_call>.*?</tool_call>|<tool_response>.*?</tool_response>", re.S)


def conclusion(text: str) -> str:
    """A branch's text without its tool calls and tool results; the whole text if that leaves no prose."""
    prose = _TOOL_BLOCKS.sub("", text)
    prose = re.sub(r"\n\s*\n+", "\n", prose).strip()
    if not prose:
        return text
    return " " + prose


def thread_conclusions(results: list[dict[str, Any]], dialect: Dialect) -> str:
    """A ``merge_strategy`` for ``create_apr_agent``: each thread's conclusion, in outline order."""
    return dialect.merge_text([(r["label"], conclusion(r["text"])) for r in results])


#: What ``create_apr_agent(merge_strategy=...)`` takes (``None``: SPEC §2.4's whole threads).
Strategy = Callable[[list[dict[str, Any]], Dialect], str]

#: The merges by name: ``full`` is SPEC §2.4's default (``None``), ``conclusions`` is ``thread_conclusions``.
MERGES: dict[str, Strategy | None] = {
    "full": None,
    "conclusions": thread_conclusions,
}


def merge_strategy(name: str) -> Strategy | None:
    """The ``merge_strategy`` named ``name`` (a key of ``MERGES``); ``ValueError`` naming the choices."""
    try:
        return MERGES[name]
    except KeyError:
        raise ValueError(f"unknown merge {name!r}; choose from {', '.join(MERGES)}") from None


__all__ = ["MERGES", "conclusion", "merge_strategy", "thread_conclusions"]
