"""Scripted (FAKE) model replies for tests, examples and load runs.

Each function returns a script for ``ScriptedBackend``: what a well-behaved
parallel-reasoning model would write for one known task, so tests can check the
runtime without a real model. Nothing here is a model.

- ``arith_script`` / ``arith_question``: ``Compute a*b + c*d.`` through two branches
  that each call ``calculator`` (the served load test, ``APR_SCRIPT=arith``).
- ``demo_script`` / ``DEMO_QUESTION``: population densities of three countries,
  one branch each (``apr run --backend scripted``, the examples).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

DEMO_QUESTION = (
    "For France, Japan and Kenya, look up the population and the area, then compute the "
    "population density (people per km2) of each. Which of the three is the most densely populated?"
)
DEMO_COUNTRIES = ("France", "Japan", "Kenya")


_QUESTION_RE = re.compile(r"Compute (\d+)\*(\d+) \+ (\d+)\*(\d+)\.")
_OUTLINE_RE = re.compile(r"<Outline>(\d+): compute (\d+\*\d+)</Outline>")
_RESPONSE_RE = re.compile(r"<tool_response>(-?\d+(?:\.\d+)?)</tool_response>")


def arith_question(i: int, seed: int = 0) -> tuple[str, int]:
    """Question ``i`` and its correct answer."""
    rng = random.Random(seed * 1_000_003 + i)
    a, b, c, d = (rng.randint(2, 99) for _ in range(4))
    return f"Compute {a}*{b} + {c}*{d}.", a * b + c * d


def _root_reply(prompt: str) -> str:
    found = _QUESTION_RE.findall(prompt)
    if not found:
        return "I can only compute questions of the form 'Compute a*b + c*d.'"
    a, b, c, d = found[-1]
    head = ("Two independent products.\n<Parallel>\n<Outlines>\n"
            f"<Outline>1: compute {a}*{b}</Outline>\n<Outline>2: compute {c}*{d}</Outline>\n</Outlines>\n")
    tail = prompt.split("</Outlines>\n", 1)[-1] if "</Outlines>\n" in prompt else ""
    results = _RESPONSE_RE.findall(tail)
    total = sum(float(r) for r in results)
    answer = f"{int(total)}" if len(results) == 2 and total == int(total) else "unknown"
    return head + f"Answer: {answer}"


def _branch_reply(label: str) -> Any:
    def reply(prompt: str) -> str:
        expr = dict(_OUTLINE_RE.findall(prompt)).get(label, "0*0")
        call = json.dumps({"name": "calculator", "arguments": {"expression": expr}})
        return f" {expr}: <tool_call>{call}</tool_call> that is the product.</Thread>"

    return reply


def arith_script() -> dict[str, Any]:
    """FAKE model for the load test (``APR_SCRIPT=arith``): answers ``Compute a*b + c*d.`` via two branches."""
    return {"": _root_reply, "1": _branch_reply("1"), "2": _branch_reply("2")}


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


__all__ = ["DEMO_COUNTRIES", "DEMO_QUESTION", "arith_question", "arith_script", "demo_script"]
