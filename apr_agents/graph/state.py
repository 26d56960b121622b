"""Graph state: LangGraph's ``messages`` plus the APR keys, each with its reducer."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages

from ..runtime.trace import RESET, merge_traces


def collect_results(left: list[dict[str, Any]] | None, right: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Branch results pile up while a spawn runs; the merge node resets them."""
    if right and right[0].get(RESET):
        return []
    return [*(left or []), *(right or [])]


class APRState(TypedDict, total=False):
    """Compatible with ``MessagesState``: a user graph needs only ``messages``."""

    messages: Annotated[list[AnyMessage], add_messages]
    apr_trace: Annotated[dict[str, Any], merge_traces]
    apr: dict[str, Any]  # the context this graph invocation runs (root or one branch)
    apr_spawn_input: dict[str, Any] | None  # set only when a parent starts this graph as a branch
    apr_branch_results: Annotated[list[dict[str, Any]], collect_results]


class APRInput(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    apr_spawn_input: dict[str, Any] | None


class APROutput(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    apr_trace: Annotated[dict[str, Any], merge_traces]
    apr: dict[str, Any]
