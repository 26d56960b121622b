"""The demo task: a multi-part question whose parts are independent, plus slow-API tools.

``demo_script`` is the FAKE scripted answer used by ``apr run --backend scripted``
and the tests; ``apr demo`` asks the real embedded model instead.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool

DEMO_QUESTION = (
    "For France, Japan and Kenya, look up the population and the area, then compute the "
    "population density (people per km2) of each. Which of the three is the most densely populated?"
)
DEMO_COUNTRIES = ("France", "Japan", "Kenya")

#: What ``apr demo`` asks the embedded 270M base model: close to its few-shot
#: example, so a model that small still writes a well-formed spawn, tool calls and a merge.
EMBEDDED_DEMO_QUESTION = "What is the population of France plus the population of Canada, in millions?"


def with_latency(tool: BaseTool, seconds: float) -> BaseTool:
    """The same tool, answering only after ``seconds``: a stand-in for a remote API's latency."""
    if seconds <= 0:
        return tool

    async def slow(**kwargs: Any) -> Any:
        await asyncio.sleep(seconds)
        return await tool.ainvoke(kwargs)

    return StructuredTool.from_function(coroutine=slow, name=tool.name, args_schema=tool.args_schema,
                                        description=f"{tool.description}")


def demo_script() -> dict[str, str]:
    """What a well-behaved parallel-reasoning model would write for DEMO_QUESTION (FAKE)."""
    from apr_tools.lookup import knowledge_base

    kb = knowledge_base()
    outlines = "".join(f"<Outline>{i}: density of {c}</Outline>\n" for i, c in enumerate(DEMO_COUNTRIES, 1))
    densities = {}
    script: dict[str, str] = {}
    for i, c in enumerate(DEMO_COUNTRIES, 1):
        facts = kb[c.lower()]
        pop = float(facts["population_millions"]) * 1_000_000
        area = facts["area_km2"]
        densities[c] = pop / float(area)
        lookup = json.dumps({"name": "lookup", "arguments": {"topic": c}})
        calc = json.dumps({"name": "calculator", "arguments": {"expression": f"{pop:.0f} / {area}"}})
        script[str(i)] = (f" I need {c}'s population and area.\n<tool_call>{lookup}</tool_call>"
                          f" Now the density.\n<tool_call>{calc}</tool_call>"
                          f" {c}: {densities[c]:.0f} people per km2.</Thread>")
    best = max(densities, key=lambda k: densities[k])
    script[""] = (f"The three countries are independent, so I will work on them in parallel.\n<Parallel>\n"
                  f"<Outlines>\n{outlines}</Outlines>\n"
                  f"{best} is the most densely populated: "
                  + ", ".join(f"{c} {d:.0f}/km2" for c, d in densities.items()) + ".")
    return script
