"""Look facts up in a small local knowledge base (``kb.json`` beside this file)."""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path

from langchain_core.tools import tool

KB_PATH = Path(__file__).with_name("kb.json")


@cache
def knowledge_base() -> dict[str, dict[str, object]]:
    return {k.lower(): v for k, v in json.loads(KB_PATH.read_text(encoding="utf-8")).items()}


@tool
def lookup(topic: str) -> str:
    """Facts about a country or city (population, capital, area, ...) from a local knowledge base."""
    kb = knowledge_base()
    key = topic.strip().lower()
    if key in kb:
        facts = kb[key]
        return f"{topic.strip()}: " + "; ".join(f"{k}: {v}" for k, v in facts.items())
    near = difflib.get_close_matches(key, list(kb), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    return f"no entry for {topic!r}.{hint}"
