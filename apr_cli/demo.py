"""The demo task ``apr demo`` asks the real embedded model."""

from __future__ import annotations

from apr_agents.testing.scripts import DEMO_QUESTION, demo_script

#: What ``apr demo`` asks the embedded model.
EMBEDDED_DEMO_QUESTION = "What is the population of France plus the population of Canada, in millions?"

__all__ = ["DEMO_QUESTION", "EMBEDDED_DEMO_QUESTION", "demo_script"]
