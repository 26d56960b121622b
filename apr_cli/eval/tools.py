"""The eval's tools: look like remote APIs, answer from the GeoNames data, wait a set latency.

- ``country_facts(country)``: population, area, capital, continent, currency, neighbours.
- ``city_facts(city)``: population, country, coordinates (``"City, Country"`` disambiguates).
- ``distance_km(city_a, city_b)``: great-circle distance between two cities.
- ``calculator(expression)``: arithmetic (``apr_tools.evaluate``, no ``eval``).

Unknown names and bad expressions come back as a clear error message in the
tool's result (``ToolException`` with ``handle_tool_error``), so every agent
under test sees the same text and can recover. ``eval_tools(latency_s=1.0)``
wraps each in ``apr_tools.with_latency`` to simulate a remote call.

``load_tools("module:attr")`` loads a user's own tools: ``attr`` may be a list of
tools or a function returning one (called with ``latency_s`` when it accepts it).

Example::

    tools = eval_tools(latency_s=1.0)
    await tools[0].ainvoke({"country": "France"})
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from langchain_core.tools import BaseTool, ToolException, tool
from pydantic import Field

from apr_tools import evaluate, with_latency
from apr_tools.calculator import EXPRESSION_PATTERN

from .data import CONTINENTS, UnknownName, World


def _world() -> World:
    return World.load()


def _number(x: float) -> str:
    """A figure as a real API prints it: 3287590, 0.44; never 3.28759e+06 (which a small model misreads)."""
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0").rstrip(".")


@tool
def country_facts(country: str) -> str:
    """Facts about a country: population, area in km2, capital, continent, currency and neighbouring countries."""
    w = _world()
    try:
        c = w.country(country)
    except UnknownName as exc:
        raise ToolException(str(exc)) from None
    neighbours = ", ".join(w.countries[n].name for n in c.neighbours if n in w.countries) or "none"
    return (f"{c.name}: population {c.population}; area {_number(c.area_km2)} km2; capital {c.capital}; "
            f"continent {c.continent}; currency {c.currency}; neighbours {neighbours}")


@tool
def city_facts(city: str) -> str:
    """Facts about a city: population, country, latitude and longitude. Use 'City, Country' if the name is ambiguous."""
    w = _world()
    try:
        c = w.city(city)
    except UnknownName as exc:
        raise ToolException(str(exc)) from None
    country = w.countries.get(c.country_iso)
    cname = country.name if country else c.country_iso
    capital = f"; capital of {cname}" if country and w.capital_city(country) == c else ""
    return (f"{c.name} ({cname}): population {c.population}; latitude {c.latitude}; "
            f"longitude {c.longitude}{capital}")


@tool
def distance_km(city_a: str, city_b: str) -> str:
    """Great-circle distance in kilometres between two cities (names as in city_facts)."""
    w = _world()
    try:
        a, b = w.city(city_a), w.city(city_b)
    except UnknownName as exc:
        raise ToolException(str(exc)) from None
    return f"distance from {a.name} to {b.name}: {w.distance_km(a, b):.1f} km"


@tool
def calculator(expression: Annotated[str, Field(pattern=EXPRESSION_PATTERN, max_length=500)]) -> str:
    """Evaluate an arithmetic expression with numbers, + - * / ** and parentheses."""
    try:
        value = evaluate(expression)
    except (ValueError, ArithmeticError, TypeError) as exc:
        raise ToolException(f"cannot evaluate {expression!r}: {exc}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


for _t in (country_facts, city_facts, distance_km, calculator):
    _t.handle_tool_error = True

BASE_TOOLS: tuple[BaseTool, ...] = (country_facts, city_facts, distance_km, calculator)


def eval_tools(latency_s: float = 1.0) -> list[BaseTool]:
    """The four eval tools, each answering after ``latency_s`` seconds (a simulated remote API)."""
    return [with_latency(t, latency_s) for t in BASE_TOOLS]


def load_tools(spec: str, latency_s: float = 0.0) -> list[BaseTool]:
    """User tools from ``"package.module:attr"``: a tool, a list or dict of tools, or a function returning one."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--tools wants 'module:attr', got {spec!r}")
    obj: Any = getattr(importlib.import_module(module_name), attr)
    if callable(obj) and not isinstance(obj, BaseTool):
        obj = obj(latency_s=latency_s) if "latency_s" in inspect.signature(obj).parameters else obj()
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    items = list(obj) if isinstance(obj, Iterable) and not isinstance(obj, BaseTool | str) else [obj]
    bad = [type(t).__name__ for t in items if not isinstance(t, BaseTool)]
    if bad or not items:
        raise TypeError(f"{spec} must give LangChain tools (BaseTool); got {bad or 'nothing'}")
    return items


__all__ = ["BASE_TOOLS", "CONTINENTS", "calculator", "city_facts", "country_facts", "distance_km", "eval_tools",
           "load_tools"]
