"""Shared bounds: backend and tool concurrency, tool rate, per-run thread budgets."""

from __future__ import annotations

import asyncio
import math
import threading
import weakref
from collections import OrderedDict

from asyncio_throttle import Throttler

from ..config import APRConfig


class Limiter:
    """One per agent. Semaphores are per event loop (asyncio primitives bind to one); the sync
    facade runs every node on one shared loop (``sync_loop``), so the bounds hold there too."""

    def __init__(self, config: APRConfig) -> None:
        self.config = config
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[asyncio.Semaphore, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )
        rate = config.tool_rate_per_s
        if rate is None:
            self.throttler: Throttler | None = None
        else:
            burst = max(1, math.floor(rate))
            self.throttler = Throttler(rate_limit=burst, period=burst / rate)

    def _sems(self) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        sems = self._per_loop.get(loop)
        if sems is None:
            sems = (asyncio.Semaphore(self.config.llm_concurrency), asyncio.Semaphore(self.config.tool_concurrency))
            self._per_loop[loop] = sems
        return sems

    def llm(self) -> asyncio.Semaphore:
        """``async with limiter.llm():`` around each backend call."""
        return self._sems()[0]

    def tool(self) -> _ToolSlot:
        """``async with limiter.tool():`` around each tool call: a slot, then the rate limit."""
        return _ToolSlot(self._sems()[1], self.throttler)


class _ToolSlot:
    """A tool-concurrency slot plus the rate limit (a class, not a generator: it runs per call)."""

    __slots__ = ("sem", "throttler")

    def __init__(self, sem: asyncio.Semaphore, throttler: Throttler | None) -> None:
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
