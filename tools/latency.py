"""A tool that only waits: stands in for a slow web API so demos show real overlap."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool, tool


@tool
async def sleep_then_echo(seconds: float, text: str) -> str:
    """Wait `seconds` (at most 30), then return `text`. Simulates a slow external API."""
    if not 0 <= seconds <= 30:
        raise ValueError("seconds must be between 0 and 30")
    await asyncio.sleep(seconds)
    return text


def with_latency(tool: BaseTool, seconds: float) -> BaseTool:
    """The same tool, answering only after ``seconds``: a stand-in for a remote API's latency."""
    if seconds <= 0:
        return tool

    async def slow(**kwargs: Any) -> Any:
        await asyncio.sleep(seconds)
        return await tool.ainvoke(kwargs)

    return StructuredTool.from_function(coroutine=slow, name=tool.name, args_schema=tool.args_schema,
                                        description=f"{tool.description}")
