"""The demo task that ``apr demo`` asks the real embedded model, and how its answer is checked.

The question has two independent parts (one country each), so the model can
spawn one branch per country; the demo tools answer after a simulated remote
latency. The expected answer comes from the shipped knowledge base
(``apr_tools/kb.json``), not from the model.
"""

from __future__ import annotations

import re
from typing import Any

from apr_agents.testing.scripts import DEMO_QUESTION, demo_script

#: What ``apr demo`` asks the embedded model.
EMBEDDED_DEMO_QUESTION = "What is the population of France plus the population of Canada, in millions?"
DEMO_PARTS = ("France", "Canada")
#: Asked once, untimed, before timed runs that share a prefix cache (``apr demo``, ``apr eval
#: --isolate``): it puts the agent's instructions in the cache, so every timed run starts warm.
WARM_UP_QUESTION = "What is 17 + 25?"


def can_isolate(backend: Any) -> bool:
    """Whether ``backend`` can snapshot and restore its prefix cache (``LlamaCppBackend`` can), so that
    timed runs can each start from the cache the warm-up left."""
    return callable(getattr(backend, "snapshot_cache", None)) and callable(getattr(backend, "restore_cache", None))


def expected_answer() -> float:
    """The demo question's answer computed from the knowledge base the tools read."""
    from apr_tools.lookup import knowledge_base

    kb = knowledge_base()
    return round(sum(float(kb[c.lower()]["population_millions"]) for c in DEMO_PARTS), 1)


def answer_is_right(answer: str, expected: float | None = None, rel_tol: float = 0.005) -> bool:
    """True when a number in ``answer`` is within ``rel_tol`` of the expected value."""
    want = expected_answer() if expected is None else expected
    for raw in re.findall(r"-?\d[\d,]*(?:\.\d+)?", answer):
        try:
            value = float(raw.replace(",", ""))
        except ValueError:
            continue
        if abs(value - want) <= rel_tol * abs(want):
            return True
    return False


__all__ = ["DEMO_QUESTION", "EMBEDDED_DEMO_QUESTION", "WARM_UP_QUESTION", "answer_is_right", "can_isolate",
           "demo_script", "expected_answer"]
