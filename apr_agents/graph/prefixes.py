"""A spawn's shared prefix, stored once: the branches' specs and checkpoints hold its key.

Every branch of a spawn continues its parent's prefix (text mode: the parent's prompt and
text up to the spawn point; tool-call mode: the parent's messages). In memory the children
share one object. In a checkpointed run each branch's ``Send``, its branch-graph input and its
checkpoints would each serialise that prefix again (about 9 copies per branch). With a
LangGraph store (``create_apr_agent(..., store=...)``; ``run_with_checkpoint`` opens one beside
its checkpointer; a LangGraph server always passes its own) the prefix is written once per
spawn under ``(PREFIX_NS, run_id)`` and the specs carry its 32-character key. The finished
root deletes its run's prefixes. A branch resumed in another process reads the prefix back
from the store. Without a store, ``share`` returns ``None`` and the specs carry the prefix.

Usage (what both agent modes do)::

    prefixes = SharedPrefixes()
    ref = await prefixes.share(run_id, prefix)        # in the node that plans the spawn
    prefix = await prefixes.get(run_id, ref, where)   # in each branch's steps
    await prefixes.forget(run_id)                     # when the root finishes
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

from langgraph.config import get_store
from langgraph.store.base import BaseStore

from .core import APRBackendError

#: characters of prefixes kept in memory (LRU over all runs of a graph); a miss reads the store
PREFIX_CACHE_CHARS = 64 * 2**20
#: the store namespace ``(PREFIX_NS, run_id)`` that holds each spawn's prefix once
PREFIX_NS = "apr_prefix"


class PrefixMissing(APRBackendError, LookupError):
    """A branch's prefix key is in no cache and not in the graph's store (the run cannot go on)."""


def graph_store() -> BaseStore | None:
    """The running graph's LangGraph store (``compile(store=...)``, or the server's), if any."""
    try:
        return get_store()
    except (RuntimeError, LookupError, KeyError, AttributeError):  # not inside a graph run
        return None


def _dumps(value: str | list[Any]) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


class SharedPrefixes:
    """The prefixes of one graph's spawns: an LRU in memory in front of the graph's store."""

    def __init__(self, max_chars: int = PREFIX_CACHE_CHARS) -> None:
        self.max_chars = max_chars
        self._cache: OrderedDict[str, tuple[str | list[Any], int]] = OrderedDict()
        self._chars = 0

    async def share(self, run: str, prefix: str | list[Any]) -> str | None:
        """Write ``prefix`` once to the store and return its key; ``None`` without a store."""
        store = graph_store()
        if store is None:
            return None
        text = _dumps(prefix)
        ref = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        await store.aput((PREFIX_NS, run), ref, {"prefix": prefix})
        self._remember(ref, prefix, len(text))
        return ref

    async def get(self, run: str, ref: str, where: str) -> Any:
        """The prefix behind ``ref``: from memory, else from the store (a resumed run)."""
        hit = self._cache.get(ref)
        if hit is not None:
            self._cache.move_to_end(ref)
            return hit[0]
        store = graph_store()
        item = await store.aget((PREFIX_NS, run), ref) if store is not None else None
        if item is None:
            raise PrefixMissing(f"the prompt prefix of {where} is not in the graph's store (namespace "
                                f"{(PREFIX_NS, run)}, key {ref}): resume the run with the store it was "
                                "started with")
        prefix = item.value["prefix"]
        self._remember(ref, prefix, len(_dumps(prefix)))
        return prefix

    async def forget(self, run: str) -> None:
        """The run is over: drop its prefixes (a crashed run's stay until it is resumed)."""
        store = graph_store()
        if store is None:
            return
        ns = (PREFIX_NS, run)
        while items := await store.asearch(ns, limit=100):
            for item in items:
                await store.adelete(ns, item.key)
                old = self._cache.pop(item.key, None)
                self._chars -= old[1] if old else 0

    def _remember(self, ref: str, prefix: str | list[Any], chars: int) -> None:
        if ref in self._cache:
            self._cache.move_to_end(ref)
            return
        self._cache[ref] = (prefix, chars)
        self._chars += chars
        while self._chars > self.max_chars and len(self._cache) > 1:
            _, (_, size) = self._cache.popitem(last=False)
            self._chars -= size
