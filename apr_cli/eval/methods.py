"""The agents compared by ``apr eval``, all built through public APIs over ONE backend.

- ``apr``: ``create_apr_agent(backend, tools, APRConfig(...))``: the text protocol, spawns run in parallel.
- ``apr-seq``: the same with ``APRConfig(parallel=False)``: every spawn's branches one after another.
- ``apr-tools``: ``create_chat_apr_agent(BackendChatModel(backend), ...)``: tool-call mode, spawning
  through a ``spawn`` tool.
- ``react``: LangChain's ``create_agent`` (``langchain`` v1; else LangGraph's
  ``create_react_agent``) over ``BackendChatModel(backend, parallel_tool_calls=False)``:
  one tool call per turn.
- ``react-par``: the same ReAct agent allowing several tool calls per turn (they run concurrently).

``run_one`` runs one question with one agent under a timeout and returns a ``RunResult``
with the answer, its grade, wall time and token counts: for the plugin from
``state["apr_trace"]["summary"]``; for ReAct from the messages' ``usage_metadata``
(every ReAct step is sequential, so its critical path is its total).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool

from apr_agents import APRConfig, create_apr_agent, create_chat_apr_agent
from apr_agents.backends.chat_model import BackendChatModel
from apr_agents.graph.merge import merge_strategy
from apr_agents.runtime.trace import summarize as summarize_trace

from .grading import grade
from .questions import Question

METHODS: tuple[str, ...] = ("apr", "apr-seq", "apr-tools", "react", "react-par")
PLUGIN_METHODS = frozenset({"apr", "apr-seq", "apr-tools"})

#: Sent as a system message to every method (``--system`` replaces it, ``""`` drops it).
EVAL_SYSTEM = ("Use the tools to look facts up and to compute; do not guess numbers. "
               "Finish with one sentence that states the final answer.")


@dataclass
class RunResult:
    """One question answered by one method."""

    question_id: str
    method: str
    type: str
    parts: int
    correct: bool
    answer: str
    wall_s: float
    total_tokens: int | None = None
    critical_path_tokens: int | None = None
    prompt_tokens: int | None = None
    llm_calls: int | None = None
    tool_calls: int | None = None
    branches: int | None = None  # plugin methods only
    spawned: bool | None = None  # plugin methods only
    end: str | None = None
    timed_out: bool = False
    skipped: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AgentSettings:
    max_tokens: int = 512
    max_threads: int = 6
    max_depth: int = 1
    temperature: float = 0.0
    system: str = EVAL_SYSTEM
    timeout_s: float = 240.0
    recursion_limit: int = 100
    lenient_tool_calls: bool = False  # BackendChatModel: also read untagged JSON tool calls
    config_overrides: dict[str, Any] = field(default_factory=dict)
    merge: str = "full"  # plugin methods: "full" (SPEC's merge) or "conclusions" (thread_conclusions)

    def apr_config(self, *, parallel: bool) -> APRConfig:
        fields: dict[str, Any] = {"max_tokens": self.max_tokens, "max_threads": self.max_threads,
                                  "max_depth": self.max_depth, "temperature": self.temperature,
                                  "thread_timeout_s": self.timeout_s, "parallel": parallel}
        fields.update(self.config_overrides)
        return APRConfig(**fields)


def react_factory() -> tuple[str, Any]:
    """LangChain v1's ``create_agent`` when installed, else LangGraph's ``create_react_agent``."""
    try:
        from langchain.agents import create_agent

        return "langchain.agents.create_agent", create_agent
    except ImportError:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from langgraph.prebuilt import create_react_agent
        return "langgraph.prebuilt.create_react_agent", create_react_agent


def build_agent(method: str, backend: Any, tools: list[BaseTool], settings: AgentSettings) -> Any:
    """The compiled graph of ``method`` over ``backend`` and ``tools``."""
    merge = merge_strategy(settings.merge)
    if method == "apr":
        return create_apr_agent(backend, tools, settings.apr_config(parallel=True), merge_strategy=merge)
    if method == "apr-seq":
        return create_apr_agent(backend, tools, settings.apr_config(parallel=False), merge_strategy=merge)

    def chat(parallel: bool) -> BackendChatModel:
        return BackendChatModel(backend=backend, max_tokens=settings.max_tokens, temperature=settings.temperature,
                                parallel_tool_calls=parallel, lenient_tool_calls=settings.lenient_tool_calls)

    if method == "apr-tools":
        return create_chat_apr_agent(chat(True), tools, settings.apr_config(parallel=True))
    if method in ("react", "react-par"):
        _, factory = react_factory()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return factory(chat(method == "react-par"), tools)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _text(m: BaseMessage) -> str:
    content = m.content
    if isinstance(content, str):
        return content
    return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in content
                   if isinstance(b, str) or b.get("type") == "text")


def _counts(method: str, state: dict[str, Any], n_input: int) -> dict[str, Any]:
    trace = state.get("apr_trace") or {}
    summary = trace.get("summary") or (summarize_trace(trace) if trace.get("contexts") else None)
    if method in PLUGIN_METHODS and summary:
        return {"total_tokens": summary.get("total_tokens"), "critical_path_tokens": summary.get("critical_path_tokens"),
                "prompt_tokens": summary.get("prompt_tokens"), "llm_calls": summary.get("backend_calls"),
                "tool_calls": summary.get("tool_calls"), "branches": summary.get("branches", 0),
                "spawned": bool(summary.get("branches", 0)), "end": summary.get("end"),
                "extra": {"transcript": _root_text(state)}}
    new = state.get("messages", [])[n_input:]
    ais = [m for m in new if isinstance(m, AIMessage)]
    out_tokens = sum((m.usage_metadata or {}).get("output_tokens", 0) for m in ais)
    in_tokens = sum((m.usage_metadata or {}).get("input_tokens", 0) for m in ais)
    last = ais[-1] if ais else None
    return {"total_tokens": out_tokens, "critical_path_tokens": out_tokens, "prompt_tokens": in_tokens,
            "llm_calls": len(ais), "tool_calls": sum(isinstance(m, ToolMessage) for m in new),
            "end": (last.response_metadata.get("engine_finish_reason") if last else None),
            "extra": {"max_calls_per_turn": max((len(m.tool_calls) for m in ais), default=0),
                      "transcript": "\n".join(f"[{m.type}] {_text(m)}{_calls(m)}" for m in new)}}


def _calls(m: BaseMessage) -> str:
    calls = getattr(m, "tool_calls", None) or []
    return "".join(f" <call {c['name']}({c['args']})>" for c in calls)


def _root_text(state: dict[str, Any]) -> str:
    """The plugin's root context as the model wrote it (threads merged in), prompt left out."""
    ctx = state.get("apr") or {}
    text = state.get("apr_text") or ctx.get("text") or ""
    return text if isinstance(text, str) else ""


async def run_one(graph: Any, method: str, q: Question, settings: AgentSettings,
                  timeout_s: float | None = None) -> RunResult:
    """Answer ``q`` with ``graph`` under a timeout; never raises for a failed run (see ``error``).

    The graph's state is streamed (``stream_mode="values"``), so a run cut short by
    the timeout still reports the tokens and tool calls it had spent and its last message.
    """
    messages: list[BaseMessage] = [SystemMessage(settings.system)] if settings.system else []
    messages.append(HumanMessage(q.question))
    timeout = settings.timeout_s if timeout_s is None else timeout_s
    started = time.perf_counter()
    base = {"question_id": q.id, "method": method, "type": q.type, "parts": q.parts}
    last: dict[str, Any] = {}

    async def consume() -> None:
        async for state in graph.astream({"messages": messages}, config={"recursion_limit": settings.recursion_limit},
                                         stream_mode="values"):
            last.clear()
            last.update(state)

    try:
        await asyncio.wait_for(consume(), timeout=timeout)
    except TimeoutError:
        partial = _counts(method, last, len(messages)) if last else {}
        return RunResult(**base, correct=False, answer=_last_text(last), wall_s=time.perf_counter() - started,
                         timed_out=True, error=f"timed out after {timeout:.0f} s", **partial)
    except Exception as exc:  # noqa: BLE001  (a failed run is a wrong answer with its reason, not a crash)
        return RunResult(**base, correct=False, answer="", wall_s=time.perf_counter() - started,
                         error=f"{type(exc).__name__}: {str(exc)[:300]}")
    wall = time.perf_counter() - started
    answer = _last_text(last)
    return RunResult(**base, correct=grade(answer, q.grading), answer=answer, wall_s=wall,
                     **_counts(method, last, len(messages)))


def _last_text(state: dict[str, Any]) -> str:
    msgs = state.get("messages") or []
    return _text(msgs[-1]) if msgs and isinstance(msgs[-1], AIMessage) else ""


__all__ = ["EVAL_SYSTEM", "METHODS", "AgentSettings", "RunResult", "build_agent", "react_factory", "run_one"]
