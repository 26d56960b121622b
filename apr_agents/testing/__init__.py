"""FAKE models for tests, examples and benchmarks: import them on purpose.

Nothing here runs a model. Each fake follows the protocol so the runtime can be
tested quickly and deterministically:

- ``ScriptedBackend``: a text-protocol backend that answers by rules (per context
  path, or a function of the prompt), with optional simulated per-token latency.
- ``ScriptedChatModel``: a LangChain chat model with tool calling, for tool-call mode.
- ``ReplayBackend``: replays recorded parallel-reasoning transcripts (``docs/traces.md``).
- ``MeteredScriptedBackend``, ``CostModel``, ``FakeCostChatModel``: the scripted
  fakes with a simulated engine cost, for benchmarks of the runtime's own overhead.
- ``scripts``: ready scripts for known tasks (``arith_script``, ``demo_script``).

Example::

    from apr_agents import create_apr_agent
    from apr_agents.testing import ScriptedBackend

    backend = ScriptedBackend({"": "The answer is 4."})
    graph = create_apr_agent(backend)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .scripted import Rule, ScriptedBackend, tokenize

if TYPE_CHECKING:
    from .costmodel import CostModel, MeteredScriptedBackend
    from .fake_chat import FakeCostChatModel
    from .replay import ReplayBackend
    from .scripted_chat import ScriptedChatModel

__all__ = ["CostModel", "FakeCostChatModel", "MeteredScriptedBackend", "ReplayBackend", "Rule",
           "ScriptedBackend", "ScriptedChatModel", "tokenize"]

_LAZY = {
    "ScriptedChatModel": ".scripted_chat",
    "ReplayBackend": ".replay",
    "CostModel": ".costmodel",
    "MeteredScriptedBackend": ".costmodel",
    "FakeCostChatModel": ".fake_chat",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
