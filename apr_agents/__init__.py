"""apr-agents: adaptive parallel reasoning for LangGraph agents.

The model writes a spawn command when it sees independent sub-tasks; the
compiled graph runs one LangGraph branch per sub-task at once (each may call
tools and spawn again) and merges them back into the model's context.

Example::

    from langchain_core.messages import HumanMessage
    from apr_agents import APRConfig, create_apr_agent, default_backend

    graph = create_apr_agent(default_backend(), tools=[...], config=APRConfig(max_threads=4))
    state = await graph.ainvoke({"messages": [HumanMessage("Compare France and Japan")]})
    state["messages"][-1].content    # the answer
    state["apr_trace"]["summary"]    # tokens, critical-path tokens, wall time

Public names: the factories (``create_apr_agent``, ``create_chat_apr_agent``),
``APRConfig``, the state (``APRState``), the backend protocol (``Backend``,
``Completion``, ``BackendError``) and the shipped engines (``default_backend``,
``LlamaCppBackend``, ``VLLMBackend``, ``OpenAICompatibleBackend``, loaded lazily),
streaming (``stream_events``) and durable runs (``run_with_checkpoint``).
Fakes for tests are in ``apr_agents.testing``; the ``apr`` command, benchmarks,
the eval and the demo are in the separate ``apr_cli`` package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends import Backend, BackendError, Completion, default_backend
from .config import APRConfig
from .graph import APRBackendError, APRState, create_apr_agent, create_chat_apr_agent
from .graph.durable import run_with_checkpoint
from .graph.streaming import stream_events

if TYPE_CHECKING:
    from .backends.llamacpp import LlamaCppBackend
    from .backends.openai_compat import OpenAICompatibleBackend
    from .backends.vllm import VLLMBackend

__all__ = [
    "APRBackendError", "APRConfig", "APRState", "Backend", "BackendError", "Completion", "LlamaCppBackend",
    "OpenAICompatibleBackend", "VLLMBackend", "create_apr_agent", "create_chat_apr_agent", "default_backend",
    "run_with_checkpoint", "stream_events",
]
__version__ = "0.2.0"

_ENGINES = {"LlamaCppBackend", "OpenAICompatibleBackend", "VLLMBackend"}


def __getattr__(name: str) -> Any:
    if name in _ENGINES:
        from . import backends

        return getattr(backends, name)
    raise AttributeError(name)
