"""Demo tools (installed as ``apr_tools``): plain LangChain ``@tool`` functions.

- ``calculator``: arithmetic through a safe AST evaluator (no ``eval``).
- ``lookup``: facts from the JSON knowledge base shipped beside this file.
- ``sleep_then_echo``: waits, then echoes: a stand-in for a slow API in demos.
"""

from __future__ import annotations

from langchain_core.tools import BaseTool

from .calculator import calculator, evaluate
from .latency import sleep_then_echo, with_latency
from .lookup import lookup

DEMO_TOOLS: dict[str, BaseTool] = {t.name: t for t in (calculator, lookup, sleep_then_echo)}


def get_tools(names: str | list[str] | None) -> list[BaseTool]:
    """Tools by name (comma-separated or list); ``None`` or ``"all"`` gives every demo tool."""
    if names is None or names == "all":
        return list(DEMO_TOOLS.values())
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in DEMO_TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {unknown}; available: {sorted(DEMO_TOOLS)}")
    return [DEMO_TOOLS[n] for n in wanted]


__all__ = ["DEMO_TOOLS", "calculator", "evaluate", "get_tools", "lookup", "sleep_then_echo", "with_latency"]
