"""What a model may see of the conversation: every message with its protocol markers made inert.

A user's question, a tool's output or an assistant message read back from a checkpoint can
contain ``<Parallel>``, ``</Thread>`` or ``<tool_call>``; sent as they are, they would fork,
close a thread or call a tool (SPEC §2.7). Both modes pass the conversation through
``neutralized_message`` before rendering it.

Usage::

    from apr_agents.graph.inputs import neutralized_message

    safe = [neutralized_message(m) for m in state["messages"]]
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, SystemMessage

from ..protocol.dialects import neutralize


def _neutral(value: Any) -> Any:
    """Protocol markers made inert in every string of a JSON-like value (dict keys included)."""
    if isinstance(value, str):
        return neutralize(value)
    if isinstance(value, dict):
        return {_neutral(k) if isinstance(k, str) else k: _neutral(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_neutral(v) for v in value]
    return value


def neutralized_message(m: BaseMessage) -> BaseMessage:
    """A message whose data cannot steer the protocol (SPEC §2.7).

    User, assistant and tool messages: string content, every text of list-of-blocks content
    (what LangGraph Studio and chat UIs send) and an assistant message's tool-call names and
    arguments. System messages are the deployer's own instructions and pass unchanged.
    """
    if isinstance(m, SystemMessage):
        return m
    update: dict[str, Any] = {"content": _neutral(m.content)}
    if isinstance(m, AIMessage):
        update["tool_calls"] = [{**c, "name": neutralize(c["name"]), "args": _neutral(c["args"])}
                                for c in m.tool_calls]
        update["invalid_tool_calls"] = [_neutral(dict(c)) for c in m.invalid_tool_calls]
    return m.model_copy(update=update)
