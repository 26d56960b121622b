"""Shared bounds: backend and tool concurrency, tool rate, per-run thread budgets.

Every bound belongs to one compiled graph (its ``Limiter`` and ``ThreadBudget``) and holds
across all the runs, threads and event loops that use that graph; two graphs built by two
``create_apr_agent`` calls have separate bounds. The tool rate (asyncio-throttle) is per
graph too but its clock is per event loop's timing calls; it is exact within one loop.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict, deque

from asyncio_throttle import Throttler

from ..config import APRConfig


class GraphSemaphore:
    """A counting semaphore for coroutines on any event loop, in any thread.

    ``asyncio.Semaphore`` binds to one loop, so a graph driven from several threads (each
    with ``asyncio.run``) would get one bound per loop. This one holds across all of them:
    a waiter parks on a future of its own loop and is woken thread-safely. FIFO.
    """

    def __init__(self, value: int) -> None:
        self._value = value
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._value > 0 and not self._waiters:
                self._value -= 1
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, fut))
                    granted = False
                except ValueError:  # already handed a slot (the grant may still be on its way)
                    granted = True
            if granted and fut.done() and not fut.cancelled():
                self.release()  # the slot reached us as we were cancelled: pass it on
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                if loop.is_closed():
                    continue
                try:
                    loop.call_soon_threadsafe(self._grant, fut)
                except RuntimeError:  # the loop closed meanwhile
                    continue
                return
            self._value += 1

    def _grant(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():  # its waiter left before the slot arrived: pass it on
            self.release()
        else:
            fut.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Limiter:
    """One per agent, so the bounds hold per compiled graph: across every run, event loop and
    thread that uses it (``graph.ainvoke`` from several threads, ``graph.invoke``, a server)."""

    def __init__(self, config: APRConfig) -> None:
        self.config = config
        self._llm = GraphSemaphore(config.llm_concurrency)
        self._tool = GraphSemaphore(config.tool_concurrency)
        rate = config.tool_rate_per_s
        if rate is None:
            self.throttler: Throttler | None = None
        else:
            burst = max(1, math.floor(rate))
            self.throttler = Throttler(rate_limit=burst, period=burst / rate)

    def llm(self) -> GraphSemaphore:
        """``async with limiter.llm():`` around each backend call."""
        return self._llm

    def tool(self) -> _ToolSlot:
        """``async with limiter.tool():`` around each tool call: a slot, then the rate limit."""
        return _ToolSlot(self._tool, self.throttler)


class _ToolSlot:
    """A tool-concurrency slot plus the rate limit (a class, not a generator: it runs per call)."""

    __slots__ = ("sem", "throttler")

    def __init__(self, sem: GraphSemaphore, throttler: Throttler | None) -> None:
        self.sem, self.throttler = sem, throttler

    async def __aenter__(self) -> None:
        await self.sem.acquire()
        if self.throttler is not None:
            try:
                await self.throttler.acquire()
            except BaseException:
                self.sem.release()
                raise

    async def __aexit__(self, *exc: object) -> None:
        self.sem.release()


class ThreadBudget:
    """Branches started per run, shared by all concurrent branches of that run.

    Keyed by run id; after a restart the count is rebuilt from the trace the
    checkpoint holds (``seed``), so a resumed run cannot exceed its budget.
    """

    def __init__(self, max_runs: int = 4096) -> None:
        self._used: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max_runs = max_runs

    def reserve(self, run_id: str, want: int, limit: int, *, seed: int = 0) -> int:
        with self._lock:
            used = max(self._used.get(run_id, 0), seed)
            got = max(0, min(want, limit - used))
            self._used[run_id] = used + got
            self._used.move_to_end(run_id)
            while len(self._used) > self._max_runs:
                self._used.popitem(last=False)
            return got

    def used(self, run_id: str) -> int:
        with self._lock:
            return self._used.get(run_id, 0)

    def release_run(self, run_id: str) -> None:
        with self._lock:
            self._used.pop(run_id, None)
