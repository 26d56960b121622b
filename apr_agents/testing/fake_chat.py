"""FakeCostChatModel: a FAKE LangChain chat model with tool calling, for the baselines of the benchmarks.

It is no model. A ``policy(messages)`` function decides each reply (text and
tool calls) from the conversation it is sent. What makes it fit for a latency
benchmark is its cost: it renders the conversation into a prompt the way a chat
template would (tool calls in the Hermes ``<tool_call>`` format the plugin's
text protocol uses, tool results as ``<tool_response>``), then has the very
same ``MeteredScriptedBackend`` the plugin runs on generate that reply. So the
baselines pay exactly the plugin's cost model: per-call latency, prefill per
uncached prompt token (exact prefix cache), and a decode delay per generated
token, streamed token by token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, PrivateAttr

from ..backends.base import Completion
from .costmodel import CostModel, MeteredScriptedBackend
from .scripted import ASSISTANT, Rule

Policy = Callable[[list[BaseMessage]], tuple[str, list[dict[str, Any]]]]


def tool_call_text(name: str, args: dict[str, Any]) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def render_chat(messages: Sequence[BaseMessage], tools: list[dict[str, Any]]) -> str:
    """The same layout as ``ScriptedBackend.render``, plus assistant tool calls and tool results."""
    parts = []
    if tools:
        names = ", ".join(t.get("function", t).get("name", "?") for t in tools)
        parts.append(f"### Tools\n{names}\n")
    for m in messages:
        if isinstance(m, AIMessage):
            calls = "".join("\n" + tool_call_text(c["name"], c["args"]) for c in m.tool_calls)
            parts.append(f"{ASSISTANT}{m.content}{calls}\n")
        elif isinstance(m, ToolMessage):
            parts.append(f"### Tool\n<tool_response>{m.content}</tool_response>\n")
        else:
            role = {SystemMessage: "System", HumanMessage: "User"}.get(type(m), m.type)
            parts.append(f"### {role}\n{m.content}\n")
    parts.append(ASSISTANT)
    return "".join(parts)


class FakeCostChatModel(BaseChatModel):
    """FAKE chat model (benchmarks only): ``policy`` writes the replies, the cost model times them."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    policy: Callable[..., Any]
    cost: CostModel = CostModel()

    _engine: MeteredScriptedBackend = PrivateAttr()
    _replies: dict[int, str] = PrivateAttr(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        self._engine = MeteredScriptedBackend([Rule(self._reply_for)], self.cost)

    @property
    def engine(self) -> MeteredScriptedBackend:
        return self._engine

    @property
    def _llm_type(self) -> str:
        return "fake-cost-chat"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    # the engine asks which text to write for a prompt: the reply the policy chose for it
    def _reply_for(self, prompt: str) -> str:
        return self._replies.get(hash(prompt), "")

    def _plan(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
        content, calls = self.policy(list(messages))
        calls = [{"name": c["name"], "args": c["args"], "id": c.get("id") or f"call_{uuid.uuid4().hex[:10]}",
                  "type": "tool_call"} for c in calls]
        prompt = render_chat(messages, kwargs.get("tools") or [])
        self._replies[hash(prompt)] = content + "".join("\n" + tool_call_text(c["name"], c["args"]) for c in calls)
        return prompt, content, calls

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        prompt, content, calls = self._plan(messages, kwargs)
        final: Completion | None = None
        sent = 0
        async for item in self._engine.stream(prompt, stop=[], max_tokens=1_000_000):
            if isinstance(item, Completion):
                final = item
                break
            take = item[: max(0, len(content) - sent)]  # content streams; tool-call text stays inside
            sent += len(item)
            if take:
                yield ChatGenerationChunk(message=AIMessageChunk(content=take))
        assert final is not None
        self._replies.pop(hash(prompt), None)
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="",
            tool_call_chunks=[{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i,
                               "type": "tool_call_chunk"} for i, c in enumerate(calls)],
            usage_metadata={"input_tokens": final.prompt_tokens, "output_tokens": final.completion_tokens,
                            "total_tokens": final.prompt_tokens + final.completion_tokens},
            response_metadata={"finish_reason": "tool_calls" if calls else "stop"},
        ))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        prompt, content, calls = self._plan(messages, kwargs)
        comp = await self._engine.complete(prompt, stop=[], max_tokens=1_000_000)
        self._replies.pop(hash(prompt), None)
        msg = AIMessage(content=content, tool_calls=calls,
                        usage_metadata={"input_tokens": comp.prompt_tokens, "output_tokens": comp.completion_tokens,
                                        "total_tokens": comp.prompt_tokens + comp.completion_tokens},
                        response_metadata={"finish_reason": "tool_calls" if calls else "stop"})
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("FakeCostChatModel is async only (use ainvoke / astream)")
