"""The sync facade's event loop: one background loop that every sync node call runs on.

``graph.invoke`` runs LangGraph's nodes in worker threads. If each node ran its
coroutine on a loop of its own, the agent's asyncio semaphores (one set per
loop) would bound calls within a node only, so ``llm_concurrency`` and
``tool_concurrency`` would not hold across branches. Running every node's
coroutine on one shared loop makes the sync facade enforce the same limits as
``ainvoke``. The caller's context variables (LangGraph's config and stream
writer) go with the coroutine, so streaming works from sync nodes too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
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
