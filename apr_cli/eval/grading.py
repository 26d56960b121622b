"""Automatic grading of free-text answers against a grading spec.

- ``number``: some number in the answer is within ``rel_tol`` (default 2 %) of
  ``value``. ``value`` is in units of ``scale`` (1e6 for "in millions"): a number
  followed by a multiplier word (thousand, million, billion, k, M, bn) is
  converted ("66.9 million" and "66,900,000" both match 66.9 at scale 1e6), and
  a bare number is read both as written and as a count divided by ``scale``. A
  number with a multiplier word is read only as written: "66,900,000 million"
  claims 66.9 trillion and does not match.
- ``numbers``: every value must be matched that way.
- ``name``: the answer or an alias appears as a whole word, case- and accent-insensitively.
- ``choice``: the option the answer picks is the right one. The pick is read
  from the last sentence that names any option: the only option named there, or
  the one followed by a superlative ("largest", "most", "farthest", ...), or
  else the first one named. A sentence that ends with a colon is a heading
  ("3. **Peru**:" in a walk-through cut off before its conclusion), not a pick.

Example::

    grade("Together about 121.5 million people.", {"kind": "number", "value": 121.46, "scale": 1e6})  # True
    grade("Brazil is the largest.", {"kind": "choice", "answer": "Brazil", "options": ["Peru", "Brazil"]})
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

_MULT = {"thousand": 1e3, "k": 1e3, "million": 1e6, "millions": 1e6, "mn": 1e6, "m": 1e6,
         "billion": 1e9, "billions": 1e9, "bn": 1e9}
_NUM_RE = re.compile(
    r"(?<![\w.])(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:\s*(thousand|millions?|billions?|mn|bn|k|m)\b)?",
    re.IGNORECASE)
_SUPERLATIVE = re.compile(r"\b(largest|biggest|most|highest|greatest|farthest|furthest|densest|longest)\b",
                          re.IGNORECASE)
_SENTENCE_RE = re.compile(r"(?<=[.!?\n])\s+")
KINDS = ("number", "numbers", "name", "choice")


def fold(text: str) -> str:
    """Lower case, accents and a leading 'the' removed, whitespace collapsed."""
    s = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    s = " ".join(s.lower().split())
    return s[4:] if s.startswith("the ") else s


def numbers_in(text: str) -> list[tuple[float, float]]:
    """``(number, multiplier)`` for each number written in ``text`` (1.0 when none follows)."""
    out = []
    for m in _NUM_RE.finditer(text):
        try:
            value = float(m.group(1).replace(",", ""))
        except ValueError:
            continue
        mult = _MULT.get((m.group(2) or "").lower(), 1.0)
        out.append((value, mult))
    return out


def _close(x: float, target: float, rel_tol: float) -> bool:
    if not math.isfinite(x):
        return False
    if target == 0:
        return abs(x) <= rel_tol
    return abs(x - target) <= rel_tol * abs(target)


def number_found(text: str, value: float, *, rel_tol: float = 0.02, scale: float = 1.0) -> bool:
    for n, mult in numbers_in(text):
        candidates = {n * mult / scale} if mult != 1.0 else {n, n / scale}
        if any(_close(c, value, rel_tol) for c in candidates):
            return True
    return False


def _mentions(text: str, name: str) -> list[int]:
    pat = re.compile(r"(?<!\w)" + re.escape(fold(name)) + r"(?!\w)")
    return [m.start() for m in pat.finditer(text)]


def name_found(text: str, names: list[str]) -> bool:
    folded = fold(text)
    return any(n and _mentions(folded, n) for n in names)


def picked_option(text: str, options: list[str]) -> str | None:
    """The option an answer picks (see the module doc), or None when it names none."""
    sentences = [fold(s) for s in _SENTENCE_RE.split(text) if s.strip()]
    for sentence in reversed(sentences):
        if sentence.rstrip(" *_#").endswith(":"):  # a heading that labels what follows
            continue
        hits = sorted((pos, opt) for opt in options for pos in _mentions(sentence, opt))
        named = {opt for _, opt in hits}
        if not named:
            continue
        if len(named) == 1:
            return hits[0][1]
        # Text between mentions: what follows an option up to the next one (and what precedes it).
        bounds = [(pos, pos + len(fold(opt)), opt) for pos, opt in hits]
        for i, (_, end, opt) in enumerate(bounds):
            nxt = bounds[i + 1][0] if i + 1 < len(bounds) else len(sentence)
            if _SUPERLATIVE.search(sentence[end:min(nxt, end + 40)]):
                return opt
        for i, (start, _, opt) in enumerate(bounds):
            prev = bounds[i - 1][1] if i else 0
            if _SUPERLATIVE.search(sentence[max(prev, start - 40):start]):
                return opt
        return hits[0][1]
    return None


def check_spec(spec: Any, *, where: str = "grading") -> None:
    """Raise ValueError when a grading spec is malformed (for user question files)."""
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ValueError(f"{where}: 'grading' must be an object with 'kind' one of {KINDS}")
    kind = spec["kind"]
    if kind == "number" and not isinstance(spec.get("value"), int | float):
        raise ValueError(f"{where}: a number spec needs a numeric 'value'")
    if kind == "numbers" and not (isinstance(spec.get("values"), list) and spec["values"]
                                  and all(isinstance(v, int | float) for v in spec["values"])):
        raise ValueError(f"{where}: a numbers spec needs a non-empty list 'values'")
    if kind in ("name", "choice") and not isinstance(spec.get("answer"), str):
        raise ValueError(f"{where}: a {kind} spec needs a string 'answer'")
    if kind == "choice" and not (isinstance(spec.get("options"), list) and spec["answer"] in spec["options"]):
        raise ValueError(f"{where}: a choice spec needs 'options' that include the answer")


def grade(answer: str | None, spec: dict[str, Any]) -> bool:
    """True when ``answer`` is right by ``spec`` (see the module doc)."""
    if not answer:
        return False
    kind = spec["kind"]
    tol = float(spec.get("rel_tol", 0.02))
    scale = float(spec.get("scale", 1.0))
    if kind == "number":
        return number_found(answer, float(spec["value"]), rel_tol=tol, scale=scale)
    if kind == "numbers":
        return all(number_found(answer, float(v), rel_tol=tol, scale=scale) for v in spec["values"])
    if kind == "name":
        return name_found(answer, [spec["answer"], *spec.get("aliases", [])])
    if kind == "choice":
        pick = picked_option(answer, list(spec["options"]))
        return pick is not None and fold(pick) == fold(spec["answer"])
    raise ValueError(f"unknown grading kind {kind!r}")


__all__ = ["KINDS", "check_spec", "fold", "grade", "name_found", "number_found", "numbers_in", "picked_option"]
