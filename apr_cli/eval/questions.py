"""Multi-part questions generated from real data, with ground truth and a grading spec.

In the spirit of LLMCompiler's ParallelQA: each question has 2 to 6 independent
parts (facts to look up, distances to measure) and a final step that combines
them (a sum, a comparison, a density), plus single-part controls where fanning
out is wasted. Ground truth is computed from the GeoNames data the tools read
(``apr_cli.eval.data``), so a perfect agent with these tools gets every answer.

``generate(seed)`` is deterministic: the same seed gives the same questions, in
the same order. ``load_jsonl``/``save_jsonl`` read and write a set as JSON lines
(one ``Question`` per line; a user's file needs only ``question`` and ``grading``).

Example::

    qs = generate(seed=0)            # 70 questions
    qs[0].question, qs[0].grading    # text and how it is graded
    stratified(qs, 12)               # a small subset covering every type

Grading specs (see ``apr_cli.eval.grading``)::

    {"kind": "number", "value": 123.4, "rel_tol": 0.02, "scale": 1e6}   # "123.4 million"
    {"kind": "numbers", "values": [1.0, 2.0], "rel_tol": 0.02}        # every value must appear
    {"kind": "name", "answer": "Paris", "aliases": []}                # case-insensitive
    {"kind": "choice", "answer": "Brazil", "options": ["Brazil", "Peru"]}  # the one the answer picks
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .data import City, Country, UnknownName, World

REL_TOL = 0.02


class Question(BaseModel):
    """One question, its grading spec, and what a perfect agent would call."""

    model_config = ConfigDict(extra="allow")

    id: str
    question: str
    grading: dict[str, Any]
    type: str = "custom"
    parts: int = Field(1, ge=1, description="independent sub-tasks in the question")
    answer: str = Field("", description="a reference answer in words")
    #: independent tool calls a perfect agent makes ({"tool", "args"}), then dependent ones
    plan: list[dict[str, Any]] = Field(default_factory=list)
    followup: list[dict[str, Any]] = Field(default_factory=list)


def _step(tool: str, **args: Any) -> dict[str, Any]:
    return {"tool": tool, "args": args}


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def ascii_fold(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def country_pool(world: World, *, min_population: int = 1_000_000) -> list[Country]:
    """Countries usable in questions: populous, with an area and a capital the city data resolves to itself."""
    out = []
    for c in sorted(world.countries.values(), key=lambda x: x.iso):
        if c.population < min_population or c.area_km2 <= 0 or not c.capital:
            continue
        if any(ch in c.name for ch in ",()"):
            continue
        cap = world.capital_city(c)
        try:
            resolved = world.city(c.capital)
        except UnknownName:
            continue
        if cap is None or resolved.geonameid != cap.geonameid:
            continue
        out.append(c)
    return out


def _distinct_top(values: Sequence[float], margin: float = 0.05) -> bool:
    """The largest value beats the runner-up by ``margin``: no near-ties in comparison questions."""
    top = sorted(values, reverse=True)
    return len(top) < 2 or top[0] >= top[1] * (1 + margin)


class _Gen:
    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        self.pool = country_pool(world)
        self.caps = {c.iso: world.capital_city(c) for c in self.pool}

    def countries(self, n: int, key: Callable[[Country], float] | None = None) -> list[Country]:
        for _ in range(200):
            picked = self.rng.sample(self.pool, n)
            if key is None or _distinct_top([key(c) for c in picked]):
                return picked
        raise RuntimeError("could not draw distinct countries")

    def cap(self, c: Country) -> City:
        city = self.caps[c.iso]
        assert city is not None
        return city

    # -- multi-part types -------------------------------------------------------------
    def population_sum(self, n: int) -> Question:
        cs = self.countries(n)
        total = sum(c.population for c in cs) / 1e6
        names = [c.name for c in cs]
        return Question(
            id="", type="population_sum", parts=n,
            question=f"What is the combined population of {_join(names)}? Give the answer in millions.",
            grading={"kind": "number", "value": round(total, 4), "rel_tol": REL_TOL, "scale": 1e6},
            answer=f"{_fmt(total, 2)} million", plan=[_step("country_facts", country=x) for x in names])

    def area_sum(self, n: int) -> Question:
        cs = self.countries(n)
        total = sum(c.area_km2 for c in cs)
        names = [c.name for c in cs]
        return Question(
            id="", type="area_sum", parts=n,
            question=f"What is the total land area of {_join(names)} together, in square kilometres?",
            grading={"kind": "number", "value": total, "rel_tol": REL_TOL, "scale": 1},
            answer=f"{_fmt(total, 0)} km2", plan=[_step("country_facts", country=x) for x in names])

    def largest(self, n: int, attr: str) -> Question:
        def key(c: Country) -> float:
            return float(getattr(c, attr))

        cs = self.countries(n, key)
        best = max(cs, key=key)
        names = [c.name for c in cs]
        what = "has the most inhabitants" if attr == "population" else "has the largest area"
        return Question(
            id="", type=f"largest_{'population' if attr == 'population' else 'area'}", parts=n,
            question=f"Which of these countries {what}: {', '.join(names)}?",
            grading={"kind": "choice", "answer": best.name, "options": names},
            answer=best.name, plan=[_step("country_facts", country=x) for x in names])

    def density_compare(self, n: int) -> Question:
        def density(c: Country) -> float:
            return c.population / c.area_km2

        cs = self.countries(n, density)
        best = max(cs, key=density)
        names = [c.name for c in cs]
        return Question(
            id="", type="density_compare", parts=n,
            question=f"Which of these countries is the most densely populated (people per square kilometre): "
                     f"{', '.join(names)}?",
            grading={"kind": "choice", "answer": best.name, "options": names},
            answer=f"{best.name} ({density(best):.1f} people per km2)",
            plan=[_step("country_facts", country=x) for x in names])

    def farthest_capital(self, n: int) -> Question:
        for _ in range(200):
            origin, *others = self.countries(n + 1)
            o = self.cap(origin)
            dists = [self.world.distance_km(o, self.cap(c)) for c in others]
            if _distinct_top(dists):
                break
        best = others[max(range(n), key=lambda i: dists[i])]
        names = [self.cap(c).name for c in others]
        return Question(
            id="", type="farthest_city", parts=n,
            question=f"Which of these cities is farthest from {o.name} (great-circle distance): {', '.join(names)}?",
            grading={"kind": "choice", "answer": self.cap(best).name, "options": names},
            answer=self.cap(best).name,
            plan=[_step("distance_km", city_a=o.name, city_b=x) for x in names])

    def route_length(self, legs: int) -> Question:
        cs = self.countries(legs + 1)
        cities = [self.cap(c) for c in cs]
        total = sum(self.world.distance_km(a, b) for a, b in pairwise(cities))
        names = [c.name for c in cities]
        return Question(
            id="", type="route_length", parts=legs,
            question=f"A plane flies {' -> '.join(names)}, in a straight line (great circle) between each pair "
                     "of consecutive cities. How many kilometres does it fly in total?",
            grading={"kind": "number", "value": round(total, 3), "rel_tol": REL_TOL, "scale": 1},
            answer=f"{_fmt(total, 0)} km",
            plan=[_step("distance_km", city_a=a, city_b=b) for a, b in pairwise(names)])

    def capital_distance(self) -> Question:
        a, b = self.countries(2)
        d = self.world.distance_km(self.cap(a), self.cap(b))
        return Question(
            id="", type="capital_distance", parts=2,
            question=f"How far apart are the capital cities of {a.name} and {b.name}, in kilometres "
                     "(great-circle distance)?",
            grading={"kind": "number", "value": round(d, 3), "rel_tol": REL_TOL, "scale": 1},
            answer=f"{_fmt(d, 0)} km ({self.cap(a).name} to {self.cap(b).name})",
            plan=[_step("country_facts", country=a.name), _step("country_facts", country=b.name)],
            followup=[_step("distance_km", city_a=self.cap(a).name, city_b=self.cap(b).name)])

    def population_diff(self) -> Question:
        a, b = sorted(self.countries(2, lambda c: c.population), key=lambda c: -c.population)
        diff = (a.population - b.population) / 1e6
        return Question(
            id="", type="population_diff", parts=2,
            question=f"How many more people live in {a.name} than in {b.name}? Give the answer in millions.",
            grading={"kind": "number", "value": round(diff, 4), "rel_tol": REL_TOL, "scale": 1e6},
            answer=f"{_fmt(diff, 2)} million", plan=[_step("country_facts", country=a.name),
                                                    _step("country_facts", country=b.name)])

    # -- single-part controls ------------------------------------------------------------
    def population(self) -> Question:
        (c,) = self.countries(1)
        return Question(
            id="", type="single_population", parts=1,
            question=f"What is the population of {c.name}, in millions?",
            grading={"kind": "number", "value": round(c.population / 1e6, 4), "rel_tol": REL_TOL, "scale": 1e6},
            answer=f"{c.population / 1e6:.2f} million", plan=[_step("country_facts", country=c.name)])

    def density(self) -> Question:
        (c,) = self.countries(1)
        d = c.population / c.area_km2
        return Question(
            id="", type="single_density", parts=1,
            question=f"What is the population density of {c.name}, in people per square kilometre?",
            grading={"kind": "number", "value": round(d, 4), "rel_tol": REL_TOL, "scale": 1},
            answer=f"{d:.1f} people per km2", plan=[_step("country_facts", country=c.name)])

    def capital(self) -> Question:
        (c,) = self.countries(1)
        folded = ascii_fold(c.capital)
        return Question(
            id="", type="single_capital", parts=1, question=f"What is the capital of {c.name}?",
            grading={"kind": "name", "answer": c.capital, "aliases": [folded] if folded != c.capital else []},
            answer=c.capital, plan=[_step("country_facts", country=c.name)])

    def city_population(self) -> Question:
        city = self.cap(self.countries(1)[0])
        return Question(
            id="", type="single_city_population", parts=1,
            question=f"How many people live in the city of {city.name}?",
            grading={"kind": "number", "value": city.population, "rel_tol": REL_TOL, "scale": 1},
            answer=f"{city.population:,}", plan=[_step("city_facts", city=city.name)])


#: (generator, argument) pairs in the order questions are generated: 70 in all.
def _recipe(g: _Gen) -> list[Callable[[], Question]]:
    r: list[Callable[[], Question]] = []
    r += [lambda n=n: g.population_sum(n) for n in (2, 3, 4, 5, 6) for _ in range(2)]
    r += [lambda n=n: g.area_sum(n) for n in (2, 3, 4) for _ in range(2)]
    r += [lambda n=n: g.largest(n, "population") for n in (2, 3, 3, 4, 4, 5, 6)]
    r += [lambda n=n: g.largest(n, "area_km2") for n in (2, 3, 3, 4, 4, 5, 6)]
    r += [lambda n=n: g.density_compare(n) for n in (2, 3, 4) for _ in range(2)]
    r += [lambda n=n: g.farthest_capital(n) for n in (3, 4, 5) for _ in range(2)]
    r += [lambda n=n: g.route_length(n) for n in (2, 3, 4) for _ in range(2)]
    r += [g.capital_distance] * 4 + [g.population_diff] * 4
    r += [g.population] * 4 + [g.density] * 4 + [g.capital] * 4 + [g.city_population] * 2
    return r


def generate(seed: int = 0, world: World | None = None) -> list[Question]:
    """The benchmark's questions (deterministic for a seed), with ids ``q000``, ``q001``, ..."""
    g = _Gen(world or World.load(), random.Random(seed))
    out = []
    for i, make in enumerate(_recipe(g)):
        q = make()
        out.append(q.model_copy(update={"id": f"q{i:03d}"}))
    return out


def _by_type(questions: Sequence[Question]) -> dict[str, list[Question]]:
    by_type: dict[str, list[Question]] = {}
    for q in questions:
        by_type.setdefault(q.type, []).append(q)
    return by_type


def _round_robin(queues: list[list[Question]], n: int) -> list[Question]:
    """Up to ``n`` questions, taken from the end of each non-empty queue in turn."""
    out: list[Question] = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop())
    return out


def stratified(questions: Sequence[Question], n: int, seed: int = 0) -> list[Question]:
    """About ``n`` questions covering every type (round-robin over types, shuffled within a type)."""
    rng = random.Random(seed)
    by_type = _by_type(questions)
    for qs in by_type.values():
        rng.shuffle(qs)
    out = _round_robin([by_type[t] for t in sorted(by_type)], n)
    order = {q.id: i for i, q in enumerate(questions)}
    return sorted(out, key=lambda q: order[q.id])


def interleaved(questions: Sequence[Question]) -> list[Question]:
    """The same questions, round-robin over types (each type keeps its order).

    The order a whole-set run takes: a run cut short by ``--deadline`` still covers
    every type and every number of parts in about equal shares.
    """
    return _round_robin([qs[::-1] for qs in _by_type(questions).values()], len(questions))


def load_jsonl(path: str | Path) -> list[Question]:
    """Questions from a JSON-lines file; each line needs ``question`` and ``grading`` at least."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(obj, dict) or "question" not in obj or "grading" not in obj:
            raise ValueError(f"{path}:{n}: each line needs 'question' and 'grading'")
        from .grading import check_spec

        check_spec(obj["grading"], where=f"{path}:{n}")
        obj.setdefault("id", f"u{n:03d}")
        out.append(Question.model_validate(obj))
    return out


def save_jsonl(questions: Iterable[Question], path: str | Path) -> None:
    Path(path).write_text("".join(q.model_dump_json() + "\n" for q in questions), encoding="utf-8")


__all__ = ["Question", "ascii_fold", "country_pool", "generate", "interleaved", "load_jsonl", "save_jsonl", "stratified"]
