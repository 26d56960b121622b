"""A tool that only waits: stands in for a slow web API so demos show real overlap."""

from __future__ import annotations

import asyncio

from langchain_core.tools import tool


@tool
async def sleep_then_echo(seconds: float, text: str) -> str:
    """Wait `seconds` (at most 30), then return `text`. Simulates a slow external API."""
    if not 0 <= seconds <= 30:
        raise ValueError("seconds must be between 0 and 30")
    await asyncio.sleep(seconds)
    return text
