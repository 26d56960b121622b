"""BackendChatModel: a LangChain chat model with tool calling over any apr backend.

It lets the same model, on the same engine, drive LangChain and LangGraph agents
that expect a ``BaseChatModel`` (``create_agent``, ``create_react_agent``, the
tool-call mode ``create_chat_apr_agent``), so they can be compared with the
text-protocol agent on equal terms (``apr eval``).

Each call renders the conversation and the bound tools with ``backend.render``
(the model's own chat template where it has one), calls ``backend.complete``
with stops at the end of the assistant's turn, and parses Hermes-style
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks into
``AIMessage.tool_calls`` (malformed ones into ``invalid_tool_calls``). The text
outside the blocks is the message content. Token usage comes from the backend's
``Completion`` as ``usage_metadata``.

``parallel_tool_calls=False`` (a field, or ``bind_tools(..., parallel_tool_calls=False)``)
tells the model to make at most one tool call per turn, stops generation at the
first ``</tool_call>`` and keeps only the first call: a classic ReAct loop.

Example::

    from langchain.agents import create_agent
    from apr_agents.backends.chat_model import BackendChatModel

    model = BackendChatModel(backend=my_backend, max_tokens=512)
    agent = create_agent(model, tools=[...])
    state = await agent.ainvoke({"messages": [("user", "Population of France plus Japan?")]})

Async first: ``ainvoke`` awaits the backend directly; ``invoke`` runs the same
coroutine on a private event loop (in a worker thread when one is already running).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import re
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from ..protocol.parser import parse_tool_call
from .base import check_backend

T = TypeVar("T")

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

#: Where an assistant turn ends, in the chat formats the shipped backends render
#: (ChatML, Gemma, the few-shot ``<end>``), plus ``<tool_response>``: only the
#: runtime writes tool results, so a model that starts one is done with its turn.
DEFAULT_STOPS: tuple[str, ...] = ("<tool_response>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<end>")

#: The instruction passed to a backend whose ``render`` accepts ``instruction=``
#: (instead of the text protocol's, which teaches ``<Parallel>`` blocks).
CHAT_INSTRUCTION = (
    "You are a helpful assistant that answers with the help of tools. To call a tool, write "
    '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>; the result comes '
    "back in the next message. When you know the answer, write it without a tool call."
)
ONE_CALL_INSTRUCTION = "Make at most one tool call per reply, then wait for its result."


class BackendChatModel(BaseChatModel):
    """A ``BaseChatModel`` over an apr backend (``complete`` + ``render``), with Hermes tool calls."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Any = Field(description="any object with async complete(...) and render(messages, tools)")
    max_tokens: int = Field(512, ge=1, description="generated tokens per call")
    temperature: float = Field(0.0, ge=0.0)
    parallel_tool_calls: bool = Field(True, description="False: at most one tool call per turn (ReAct)")
    stop: tuple[str, ...] = Field(DEFAULT_STOPS, description="stop strings that end the assistant's turn")
    render_kwargs: dict[str, Any] | None = Field(
        None, description="extra keywords for backend.render; None passes instruction=CHAT_INSTRUCTION when "
                          "render accepts it")
    lenient_tool_calls: bool = Field(
        False, description="also read tool calls written without <tool_call> tags: a JSON object "
                           "{\"name\": <a bound tool>, \"arguments\": {...}} bare or in a code fence (small "
                           "models often write them so); off by default, like a server's Hermes parser")
    model_name: str = "apr-backend"

    def model_post_init(self, __context: Any) -> None:
        check_backend(self.backend)

    @property
    def _llm_type(self) -> str:
        return "apr-backend-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"backend": type(self.backend).__name__, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "parallel_tool_calls": self.parallel_tool_calls}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        schemas = [convert_to_openai_tool(t) for t in tools]
        extra: dict[str, Any] = {"tools": schemas, **kwargs}
        if tool_choice is not None:
            extra["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            extra["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**extra)

    # -- generation ------------------------------------------------------------------
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        tools: list[dict[str, Any]] = list(kwargs.get("tools") or [])
        parallel = kwargs.get("parallel_tool_calls")
        parallel = self.parallel_tool_calls if parallel is None else bool(parallel)
        msgs = list(messages)
        if tools and not parallel:
            msgs = _with_system_note(msgs, ONE_CALL_INSTRUCTION)
        prompt = self._render(msgs, tools)
        stops = list(dict.fromkeys([*self.stop, *(stop or [])]))
        if tools and not parallel:
            stops.append(TOOL_CALL_CLOSE)
        comp = await self.backend.complete(prompt, stop=stops, max_tokens=self.max_tokens,
                                           temperature=self.temperature)
        text = comp.text + (TOOL_CALL_CLOSE if comp.stop == TOOL_CALL_CLOSE else "")
        message = parse_hermes(text, known_tools={t["function"]["name"] for t in tools} if tools else None,
                               single=not parallel, lenient=self.lenient_tool_calls and bool(tools))
        finish = "tool_calls" if message.tool_calls else comp.finish_reason
        message = message.model_copy(update={
            "usage_metadata": {"input_tokens": comp.prompt_tokens, "output_tokens": comp.completion_tokens,
                               "total_tokens": comp.prompt_tokens + comp.completion_tokens},
            "response_metadata": {**message.response_metadata, "finish_reason": finish,
                                  "engine_finish_reason": comp.finish_reason, "model_name": self.model_name},
        })
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"token_usage": {"prompt_tokens": comp.prompt_tokens,
                                                      "completion_tokens": comp.completion_tokens}})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _run_sync(self._agenerate(messages, stop, None, **kwargs))

    def _render(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> str:
        kwargs = self.render_kwargs
        if kwargs is None:
            kwargs = {"instruction": CHAT_INSTRUCTION} if _accepts(self.backend.render, "instruction") else {}
        return self.backend.render(messages, tools, **kwargs)


def parse_hermes(text: str, *, known_tools: set[str] | None = None, single: bool = False,
                 lenient: bool = False) -> AIMessage:
    """An ``AIMessage`` from model text with Hermes ``<tool_call>`` blocks.

    Valid calls go to ``tool_calls`` and malformed ones (bad JSON, no name, a
    name not in ``known_tools``) to ``invalid_tool_calls``; an unclosed last block
    is parsed too (the model ran out of tokens or stopped there). ``single`` keeps
    only the first call; how many were dropped is in ``response_metadata``.
    ``lenient`` (with ``known_tools``): when the text has no ``<tool_call>`` block,
    JSON objects naming a known tool, bare or in a code fence (doubled braces
    ``{{...}}`` too), count as calls; ``response_metadata["lenient_tool_calls"]`` says so.
    """
    if lenient and known_tools and TOOL_CALL_OPEN not in text:
        found = _bare_calls(text, known_tools)
        if found:
            calls = [{"name": n, "args": a, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
                     for n, a, _, _ in found]
            content = text
            for _, _, start, end in reversed(found):
                content = content[:start] + content[end:]
            content = _FENCE_RE.sub("", content).strip()
            meta: dict[str, Any] = {"lenient_tool_calls": len(calls)}
            if single and len(calls) > 1:
                meta["dropped_tool_calls"] = len(calls) - 1
                calls = calls[:1]
            return AIMessage(content=content, tool_calls=calls, response_metadata=meta)
    calls: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    for m in _CALL_RE.finditer(text):
        body = m.group(1)
        if not body.strip():
            continue
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        tc = parse_tool_call(body)
        error = tc.error
        if error is None and known_tools is not None and tc.name not in known_tools:
            error = f"unknown tool {tc.name!r}; available: {sorted(known_tools)}"
        if error is None:
            calls.append({"name": tc.name, "args": tc.arguments, "id": call_id, "type": "tool_call"})
        else:
            invalid.append({"name": tc.name or None, "args": body.strip(), "id": call_id, "error": error,
                            "type": "invalid_tool_call"})
    content = _CALL_RE.sub("", text).strip()
    meta: dict[str, Any] = {}
    if single and len(calls) + len(invalid) > 1:
        meta["dropped_tool_calls"] = len(calls) + len(invalid) - 1
        if calls:
            calls, invalid = calls[:1], []
        else:
            invalid = invalid[:1]
    return AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid, response_metadata=meta)


_FENCE_RE = re.compile(r"```[a-zA-Z]*\s*```")


def _bare_calls(text: str, known_tools: set[str]) -> list[tuple[str, dict[str, Any], int, int]]:
    """``(name, arguments, start, end)`` of JSON tool calls written without tags."""
    decoder = json.JSONDecoder()
    out: list[tuple[str, dict[str, Any], int, int]] = []
    pos = 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            return out
        obj, end = None, start + 1
        for candidate, shift in ((text[start:], 0), (text[start:].replace("{{", "{").replace("}}", "}"), None)):
            try:
                obj, used = decoder.raw_decode(candidate)
            except ValueError:
                continue
            # The undoubled text is shorter: find where the object ends in the original.
            end = _matching_brace(text, start) if shift is None else start + used
            break
        args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if isinstance(obj, dict) and obj.get("name") in known_tools and isinstance(args, dict):
            out.append((obj["name"], args, start, end))
            pos = end
        else:
            pos = start + 1


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == "{"
        depth -= text[i] == "}"
        if depth == 0:
            return i + 1
    return len(text)


def _with_system_note(messages: list[BaseMessage], note: str) -> list[BaseMessage]:
    if messages and isinstance(messages[0], SystemMessage) and isinstance(messages[0].content, str):
        return [SystemMessage(f"{messages[0].content}\n\n{note}"), *messages[1:]]
    return [SystemMessage(note), *messages]


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code: here when no loop runs, else on a worker thread's loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


__all__ = ["CHAT_INSTRUCTION", "DEFAULT_STOPS", "ONE_CALL_INSTRUCTION", "BackendChatModel", "parse_hermes"]
