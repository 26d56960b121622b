"""The sync facade's event loop: one background loop that every sync node call runs on.

``graph.invoke`` runs LangGraph's nodes in worker threads. If each node ran its
coroutine on a loop of its own, the agent's asyncio semaphores (one set per
loop) would bound calls within a node only, so ``llm_concurrency`` and
``tool_concurrency`` would not hold across branches. Running every node's
coroutine on one shared loop makes the sync facade enforce the same limits as
``ainvoke``. The caller's context variables (LangGraph's config and stream
writer) go with the coroutine, so streaming works from sync nodes too.

A sync run is stoppable like an async one: ``cancel_scope()`` (entered by the
graph's ``stream``, which ``invoke`` uses) collects every coroutine that
``run_sync`` starts for the run, in any worker thread (LangGraph copies the
context into them), and ``scope.cancel()`` cancels them all at once. Closing
``graph.stream()`` early therefore stops the branches, their tools and model
calls promptly, instead of waiting for each to finish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()


class CancelScope:
    """The coroutines one sync run started on the shared loop (and those of nested runs)."""

    def __init__(self, parent: CancelScope | None) -> None:
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._children: set[CancelScope] = set()
        self.cancelled = False
        self.parent = parent
        if parent is not None:
            with parent._lock:
                parent._children.add(self)
                self.cancelled = parent.cancelled  # a run started inside an abandoned one

    def add(self, task: asyncio.Task[Any]) -> None:
        with self._lock:
            cancel = self.cancelled
            if not cancel:
                self._tasks.add(task)
        if cancel:
            task.cancel()  # called on the loop's thread
        else:
            task.add_done_callback(self._discard)

    def _discard(self, task: asyncio.Task[Any]) -> None:
        with self._lock:
            self._tasks.discard(task)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            tasks, children = list(self._tasks), list(self._children)
        loop = _loop
        if loop is not None and not loop.is_closed():
            for task in tasks:
                loop.call_soon_threadsafe(task.cancel)
        for child in children:
            child.cancel()

    def close(self) -> None:
        if self.parent is not None:
            with self.parent._lock:
                self.parent._children.discard(self)


_scope: contextvars.ContextVar[CancelScope | None] = contextvars.ContextVar("apr_sync_scope", default=None)


@contextmanager
def cancel_scope() -> Iterator[CancelScope]:
    """A scope for one sync run; nested runs (a subgraph's ``invoke``) get a child scope."""
    scope = CancelScope(_scope.get())
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        try:
            _scope.reset(token)
        except ValueError:  # closed from another context (a generator finalised elsewhere)
            pass
        scope.close()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _shared_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="apr-agents-sync-loop", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and wait for it, from any thread but the loop's own.

    Called from the loop's own thread (a sync ``invoke`` made by a coroutine running
    there, e.g. an agent used synchronously inside an async tool), blocking would
    deadlock, so that case gets a private loop in a new thread instead.
    """
    loop = _shared_loop()
    if threading.current_thread() is _thread:
        return _run_in_new_thread(coro)
    scope = _scope.get()
    if scope is not None and scope.cancelled:  # the run was abandoned: start nothing new
        coro.close()
        raise asyncio.CancelledError()
    ctx = contextvars.copy_context()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def start() -> None:
        task = ctx.run(loop.create_task, coro)  # the task runs in a copy of the caller's context

        def finish(t: asyncio.Task[T]) -> None:
            if t.cancelled():
                done.cancel()
            elif (exc := t.exception()) is not None:
                done.set_exception(exc)
            else:
                done.set_result(t.result())

        task.add_done_callback(finish)
        tasks.append(task)
        if scope is not None:
            scope.add(task)

    tasks: list[asyncio.Task[T]] = []
    loop.call_soon_threadsafe(start)
    try:
        return done.result()
    except concurrent.futures.CancelledError:
        raise asyncio.CancelledError() from None
    except BaseException:  # KeyboardInterrupt in the waiting thread: stop the work too
        for task in tasks:
            loop.call_soon_threadsafe(task.cancel)
        raise


def _run_in_new_thread(coro: Coroutine[Any, Any, T]) -> T:
    box: dict[str, Any] = {}
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            box["value"] = ctx.run(asyncio.run, coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
