"""ScriptedChatModel: a FAKE LangChain chat model with tool calling, for unit tests only.

It is no model. A ``respond(messages, tool_names)`` function you write decides
each reply from the conversation it is sent, the way a real chat model only
sees its input: so the same fake serves the root and every branch at once, and
concurrency in a test is real (``latency_s`` simulates a slow model).
``bind_tools`` works like a real model's: it binds the tool schemas as call
keywords, and ``respond`` gets the names of the tools bound for that call.

langchain-core's own fake chat models have no ``bind_tools``; this one exists so
the tool-call mode (``apr_agents.graph.chat``) can be tested without a server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import PrivateAttr

Respond = Callable[[list[BaseMessage], list[str]], "AIMessage | str"]


def tool_call(name: str, args: dict[str, Any] | None = None, *, id: str | None = None) -> dict[str, Any]:
    """A well-formed tool call as ``AIMessage.tool_calls`` holds it."""
    return {"name": name, "args": dict(args or {}), "id": id or f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}


def bad_tool_call(name: str, raw_args: str, *, id: str | None = None) -> dict[str, Any]:
    """A tool call whose arguments are not valid JSON (``AIMessage.invalid_tool_calls``)."""
    return {"name": name, "args": raw_args, "id": id or f"call_{uuid.uuid4().hex[:12]}",
            "error": "arguments are not valid JSON", "type": "invalid_tool_call"}


def calls(*tool_calls: dict[str, Any], content: str = "") -> AIMessage:
    """An assistant message making these tool calls (valid and invalid ones may mix)."""
    good = [c for c in tool_calls if c.get("type") != "invalid_tool_call"]
    bad = [c for c in tool_calls if c.get("type") == "invalid_tool_call"]
    return AIMessage(content=content, tool_calls=good, invalid_tool_calls=bad)


def _words(text: str) -> int:
    return len(text.split())


class ScriptedChatModel(BaseChatModel):
    """FAKE chat model (tests only): ``respond(messages, tool_names)`` writes every reply."""

    respond: Callable[..., Any]
    latency_s: float = 0.0
    fail_first: int = 0  # the first N calls raise ConnectionError (to test retries and resume)
    report_usage: bool = True  # False: replies carry no usage_metadata, like some servers

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _calls: int = PrivateAttr(default=0)
    _log: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted-chat-fake"

    @property
    def calls(self) -> int:
        return self._calls

    @property
    def log(self) -> list[dict[str, Any]]:
        """One entry per call: the bound tool names, tool_choice and the conversation length."""
        with self._lock:
            return list(self._log)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        schemas = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=schemas, tool_choice=tool_choice, **kwargs)

    def _reply(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        names = [t["function"]["name"] for t in kwargs.get("tools") or []]
        with self._lock:
            self._calls += 1
            n = self._calls
            self._log.append({"tools": names, "tool_choice": kwargs.get("tool_choice"),
                              "messages": len(messages), "last": messages[-1].type if messages else None})
        if n <= self.fail_first:
            raise ConnectionError(f"scripted failure {n} of {self.fail_first}")
        out = self.respond(list(messages), names)
        msg = AIMessage(content=out) if isinstance(out, str) else out
        if not isinstance(msg, AIMessage):
            raise TypeError(f"respond() must return an AIMessage or str, not {type(msg).__name__}")
        fixed = [{**c, "id": c.get("id") or f"call_{uuid.uuid4().hex[:12]}"} for c in msg.tool_calls]
        update: dict[str, Any] = {"tool_calls": fixed}
        if msg.usage_metadata is None and self.report_usage:
            prompt = sum(_words(str(m.content)) for m in messages)
            completion = _words(str(msg.content)) + sum(
                _words(json.dumps(c["args"])) + 1 for c in [*fixed, *msg.invalid_tool_calls])
            update["usage_metadata"] = {"input_tokens": prompt, "output_tokens": completion,
                                        "total_tokens": prompt + completion}
        if "finish_reason" not in msg.response_metadata:
            update["response_metadata"] = {**msg.response_metadata,
                                           "finish_reason": "tool_calls" if fixed else "stop"}
        return msg.model_copy(update=update)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_s:
            time.sleep(self.latency_s)
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages, kwargs))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages, kwargs))])
