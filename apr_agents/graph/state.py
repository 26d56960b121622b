"""Graph state: LangGraph's ``messages`` plus the APR keys, each with its reducer.

Two schemas, so that what a caller may write is exactly what it should:

- ``APRInput`` (the root graph's public input): ``messages`` only. Any other key a
  caller sends (``apr``, ``apr_spawn_input``, ...) is ignored by LangGraph's input
  mapping, so no limit, deadline, depth or run id can be chosen from outside.
- ``APROutput``: ``messages``, ``apr_trace`` and ``apr`` (the finished context).

Resets use LangGraph's ``Overwrite`` (a node returns ``{"apr_trace": Overwrite({...})}``).
The classes are ``typing_extensions.TypedDict`` so that pydantic (and so
``graph.get_input_jsonschema()``, LangGraph Studio and the server) can read them on
Python < 3.12.

Usage::

    from apr_agents.graph.state import APRInput
    graph.get_input_jsonschema()["properties"].keys()  # {"messages"}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from langchain_core.messages import AnyMessage
from langgraph.channels import DeltaChannel
from langgraph.graph.message import add_messages
from langgraph.types import Overwrite
from typing_extensions import TypedDict

from ..runtime.trace import merge_traces


def collect_results(left: list[dict[str, Any]] | None, right: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Branch results pile up while a spawn runs; the merge node resets them with ``Overwrite([])``."""
    return [*(left or []), *(right or [])]


def append_text(text: str, pieces: Sequence[str]) -> str:
    """``apr_text``'s reducer: each write is what a step appended to the context text."""
    return text + "".join(pieces)


def append_items(items: list[Any], batches: Sequence[Sequence[Any]]) -> list[Any]:
    """``apr_msgs``'s reducer: each write is the messages a step appended (a tuple)."""
    return [*items, *(item for batch in batches for item in batch)]


def last_value(value: Any, writes: Sequence[Any]) -> Any:
    """``apr_prompt``'s reducer: written once when a context starts (normally as ``Overwrite``)."""
    return writes[-1] if writes else value


def fold_traces(trace: dict[str, Any], deltas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``apr_trace``'s reducer: each write is what a step added (``merge_traces`` appends a
    context's ``tool_calls`` and ``spawns``), so the fold is the same in one batch or many."""
    for delta in deltas:
        trace = merge_traces(trace, delta)
    return trace


#: Everything that grows with a run's steps is kept out of ``apr`` (whose whole value a checkpoint
#: stores at every step) in LangGraph ``DeltaChannel``s: a checkpoint stores what each step
#: appended, plus a full snapshot every ``SNAPSHOT_EVERY`` updates, which bounds the replay on
#: load. So storage grows linearly with the steps (docs/checkpointing.md, "Storage bounds").
SNAPSHOT_EVERY = 256
TextChannel = Annotated[str, DeltaChannel(append_text, snapshot_frequency=SNAPSHOT_EVERY)]
MessagesChannel = Annotated[list[dict[str, Any]], DeltaChannel(append_items, snapshot_frequency=SNAPSHOT_EVERY)]
PromptChannel = Annotated[str, DeltaChannel(last_value, snapshot_frequency=SNAPSHOT_EVERY)]
TraceChannel = Annotated[dict[str, Any], DeltaChannel(fold_traces, snapshot_frequency=SNAPSHOT_EVERY)]


class APRState(TypedDict, total=False):
    """Compatible with ``MessagesState``: a user graph needs only ``messages``."""

    messages: Annotated[list[AnyMessage], add_messages]
    apr_trace: TraceChannel
    apr: dict[str, Any]  # the context this graph invocation runs (root or one branch), small fields only
    apr_text: TextChannel  # text mode: that context's text (checkpointed as deltas)
    apr_prompt: PromptChannel  # text mode: the prompt the context continues (stored once per context)
    apr_msgs: MessagesChannel  # tool-call mode: that context's messages (checkpointed as deltas)
    apr_spawn_input: dict[str, Any] | None  # a branch's first step only: the child spec its parent planned
    apr_branch_results: Annotated[list[dict[str, Any]], collect_results]


class APRInput(TypedDict, total=False):
    """The public input: the conversation, nothing else."""

    messages: Annotated[list[AnyMessage], add_messages]


class APROutput(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    apr_trace: TraceChannel
    apr: dict[str, Any]
    apr_text: TextChannel
    apr_msgs: MessagesChannel


def _fold(meta: Any, typ: Any) -> Callable[[Any, Any], Any]:
    """How one write folds into a plain dict's value, from a channel's annotation metadata:
    a ``DeltaChannel`` folds a sequence of writes, a binary reducer one write at a time;
    a missing value starts as the annotated type's empty value (as LangGraph's channels do)."""
    empty = get_origin(typ) or typ
    if isinstance(meta, DeltaChannel):
        fold_many = meta.reducer
        return lambda old, new: fold_many(empty() if old is None else old, [new])
    return lambda old, new: meta(empty() if old is None else old, new)


def _reducers(schema: type) -> dict[str, Callable[[Any, Any], Any]]:
    """Each reducer channel of ``schema`` (``Annotated[type, reducer]``) by key."""
    out = {}
    for key, hint in get_type_hints(schema, include_extras=True).items():
        if get_origin(hint) is Annotated:
            typ, meta = get_args(hint)[:2]
            if isinstance(meta, DeltaChannel) or callable(meta):
                out[key] = _fold(meta, typ)
    return out


#: each channel's reducer as one update folds into a plain dict (a branch's state in
#: ``core.BranchRunner``), derived from ``APRState``'s own annotations so a branch folds
#: every channel exactly as the graph does; a key not here is a last-value channel
REDUCERS: dict[str, Callable[[Any, Any], Any]] = _reducers(APRState)


def apply_update(state: dict[str, Any], update: dict[str, Any]) -> None:
    """A node's update folded into ``state`` the way ``APRState``'s channels fold it."""
    for key, value in update.items():
        if isinstance(value, Overwrite):
            state[key] = value.value
        elif (reducer := REDUCERS.get(key)) is not None:
            state[key] = reducer(state.get(key), value)
        else:
            state[key] = value
