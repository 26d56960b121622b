"""Run one step's tool calls concurrently, bounded, rate-limited, each with a timeout.

Every failure becomes that call's response text (SPEC §4): the model reads the
error in its own context and the other calls and branches go on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.tools import BaseTool
from pydantic import ValidationError

from ..config import APRConfig
from ..protocol.dialects import neutralize
from ..protocol.parser import ToolCall
from .limits import Limiter

Emit = Callable[[dict[str, Any]], None]


def to_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    content = getattr(result, "content", None)  # ToolMessage / Command-like outputs
    if isinstance(content, str):
        return content
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... truncated {len(text) - limit} characters]"


async def _bounded(coro: Any, seconds: float) -> Any:
    """Await ``coro`` for at most ``seconds``. Unlike ``asyncio.wait_for``, a tool that swallows
    its cancellation is abandoned (cancelled, not awaited) instead of hanging the run; a cancelled
    run still cancels the tool."""
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved" noise
        raise TimeoutError
    if task.cancelled():  # the tool raised CancelledError itself: its failure, not the run's cancellation
        raise ToolCancelled("the tool's own task was cancelled")
    return task.result()


class ToolCancelled(Exception):
    """A tool raised ``CancelledError`` without the run being cancelled."""


async def run_tool_call(
    call: ToolCall,
    tools: Mapping[str, BaseTool],
    limiter: Limiter,
    config: APRConfig,
    *,
    deadline: float | None,
    emit: Emit,
    ctx_id: str,
) -> tuple[str, dict[str, Any]]:
    rec: dict[str, Any] = {"name": call.name, "args": call.arguments, "started": time.time(),
                           "duration_s": 0.0, "error": None}
    t0 = time.perf_counter()
    if call.error:
        rec["error"] = call.error
        return neutralize(f"error: {call.error}"), rec
    tool = tools.get(call.name)
    if tool is None:
        rec["error"] = "unknown_tool"
        rec["name"] = truncate(call.name, 100)
        known = ", ".join(sorted(tools)) or "none"
        return neutralize(f"error: unknown tool {truncate(call.name, 100)!r}; available tools: {known}"), rec
    emit({"apr": "tool_start", "ctx": ctx_id, "name": call.name, "args": call.arguments})
    timeout = config.tool_timeout_s

    async def slot_then_run() -> Any:
        nonlocal timeout
        async with limiter.tool():
            rec["started"] = time.time()
            if deadline is not None:  # read after the wait for a slot, not before
                timeout = max(0.0, min(timeout, deadline - time.time()))
            return await _bounded(tool.ainvoke(call.arguments), timeout)

    try:
        if deadline is None:
            result = await slot_then_run()
        else:  # the wait for a slot (concurrency, rate limit) counts against the deadline too
            timeout = max(0.0, deadline - time.time())
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                result = await slot_then_run()
        text = to_text(result)
    except TimeoutError:
        rec["error"] = "timeout"
        text = f"error: tool {call.name!r} did not finish within {timeout:.1f} s"
    except ValidationError as exc:
        rec["error"] = "invalid_arguments"
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        text = f"error: invalid arguments for {call.name!r}: {msgs}"
    except Exception as exc:  # noqa: BLE001 - a tool's failure is data for the model
        rec["error"] = type(exc).__name__
        text = f"error: tool {call.name!r} raised {type(exc).__name__}: {exc}"
    rec["duration_s"] = round(time.perf_counter() - t0, 6)
    emit({"apr": "tool_end", "ctx": ctx_id, "name": call.name, "duration_s": rec["duration_s"],
          "error": rec["error"]})
    return neutralize(truncate(text, config.max_tool_output_chars)), rec


async def run_tool_calls(
    calls: list[ToolCall],
    tools: Mapping[str, BaseTool],
    limiter: Limiter,
    config: APRConfig,
    *,
    deadline: float | None,
    emit: Emit,
    ctx_id: str,
) -> list[tuple[str, dict[str, Any]]]:
    """All calls at once; results come back in call order."""
    if len(calls) == 1:  # the common case: no task to schedule
        return [await run_tool_call(calls[0], tools, limiter, config, deadline=deadline, emit=emit,
                                    ctx_id=ctx_id)]
    return list(await asyncio.gather(*(
        run_tool_call(c, tools, limiter, config, deadline=deadline, emit=emit, ctx_id=ctx_id) for c in calls
    )))
