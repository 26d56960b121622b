"""A branch folds node updates into a plain dict (``apply_update``) exactly as the graph's channels do."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, get_origin, get_type_hints

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.types import Overwrite

from apr_agents.graph.state import REDUCERS, APRState, apply_update

UPDATES: list[dict[str, Any]] = [
    {"messages": [HumanMessage("q", id="h1")], "apr_text": "ab", "apr_prompt": Overwrite("p0"),
     "apr_msgs": ({"role": "user", "content": "q"},), "apr_trace": {"contexts": {"0": {"tool_calls": [{"name": "a"}]}}},
     "apr_branch_results": [{"i": 1}], "apr": {"depth": 0}},
    {"messages": [AIMessage("a", id="a1")], "apr_text": "cd", "apr_msgs": ({"role": "assistant", "content": "a"},),
     "apr_trace": {"contexts": {"0": {"tool_calls": [{"name": "b"}]}}}, "apr_branch_results": [{"i": 2}], "apr": {"depth": 1}},
    {"apr_branch_results": Overwrite([]), "apr_text": "e"},
]


def test_every_reducer_channel_of_the_state_is_folded() -> None:
    hints = get_type_hints(APRState, include_extras=True)
    annotated = {k for k, h in hints.items() if get_origin(h) is Annotated}
    assert annotated == {"messages", "apr_trace", "apr_text", "apr_prompt", "apr_msgs", "apr_branch_results"}
    assert annotated == set(REDUCERS)


def test_apply_update_matches_the_graphs_own_channels() -> None:
    builder = StateGraph(APRState)
    names = [f"n{i}" for i in range(len(UPDATES))]
    for name, update in zip(names, UPDATES, strict=True):
        builder.add_node(name, lambda _state, u=update: u)
    builder.add_edge(START, names[0])
    for a, b in pairwise(names):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    from_graph = builder.compile().invoke({})

    folded: dict[str, Any] = {}
    for update in UPDATES:
        apply_update(folded, update)
    assert folded == from_graph
    assert folded["apr_text"] == "abcde" and folded["apr_branch_results"] == []
    assert [c["name"] for c in folded["apr_trace"]["contexts"]["0"]["tool_calls"]] == ["a", "b"]
