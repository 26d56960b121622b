"""GBNF grammars for grammar-constrained decoding (llama.cpp): JSON values, tool
arguments that follow a tool's JSON schema, and the canonical protocol.

``schema_rule`` turns a tool's ``parameters`` schema into GBNF rules, so a small
model cannot write arguments that echo the schema (``{"properties": ...}``), drop a
required argument or put a number where a string belongs. ``protocol_gbnf`` is
the protocol grammar of the few-shot format (base models).

Example::

    rules = list(JSON_RULES)
    name = schema_rule({"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"]}, "t0", rules)
    gbnf = "\\n".join([f"root ::= {name}", *rules])
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..protocol.dialects import CANONICAL, APRDialect, Dialect

#: Generic JSON values with bounded strings and numbers (a small model can loop on digits forever).
JSON_RULES: tuple[str, ...] = (
    r'value ::= string | number | object | array | "true" | "false" | "null"',
    r'object ::= "{" ( string ": " value ( ", " string ": " value )* )? "}"',
    r'array ::= "[" ( value ( ", " value )* )? "]"',
    r'string ::= "\"" char{0,200} "\""',
    r'char ::= [^"\\\x00-\x1f] | "\\" ["\\/bfnrt]',
    r'number ::= "-"? [0-9]{1,15} ( "." [0-9]{1,12} )? ( [eE] [-+]? [0-9]{1,3} )?',
    r'integer ::= "-"? [0-9]{1,15}',
    r'boolean ::= "true" | "false"',
)

_SIMPLE = {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean",
           "null": '"null"'}


def _literal(value: Any) -> str:
    """A GBNF literal matching ``json.dumps(value)`` exactly."""
    text = json.dumps(value, ensure_ascii=False)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_CLASS_RE = re.compile(r'\^?\[(?:[^\]\\"]|\\[-\\/^.*+()])+\][+*]\$?')


def _char_class(pattern: str) -> str | None:
    """A GBNF character class for a ``pattern`` of the form ``^[...]+$``; None for anything else."""
    if not _CLASS_RE.fullmatch(pattern):
        return None
    body = pattern[pattern.index("[") + 1: pattern.rindex("]")]
    if body.startswith("^"):
        return None  # a negated class may admit quotes or control characters: keep generic strings
    return f"[{body}]"


def schema_rule(schema: Any, name: str, rules: list[str], depth: int = 0) -> str:
    """The name of a rule (added to ``rules``) that matches JSON valid for ``schema``.

    Handles ``type`` object/array/string/number/integer/boolean/null, ``enum``,
    ``const``, ``anyOf``/``oneOf``, nested objects; anything else falls back to
    any JSON value. Object properties come in schema order: required ones always,
    optional ones each optionally.
    """
    if not isinstance(schema, dict) or depth > 6:
        return "value"
    if isinstance(schema.get("$gbnf"), str):  # a rule the caller wrote (e.g. grounded arithmetic)
        return schema["$gbnf"]
    if "const" in schema:
        rules.append(f"{name} ::= {_literal(schema['const'])}")
        return name
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        rules.append(f"{name} ::= " + " | ".join(_literal(v) for v in schema["enum"]))
        return name
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            alts = [schema_rule(o, f"{name}-{i}", rules, depth + 1) for i, o in enumerate(options)]
            rules.append(f"{name} ::= " + " | ".join(alts))
            return name
    typ = schema.get("type")
    if isinstance(typ, list):
        alts = [schema_rule({**schema, "type": t}, f"{name}-{i}", rules, depth + 1) for i, t in enumerate(typ)]
        rules.append(f"{name} ::= " + " | ".join(alts))
        return name
    if typ == "string" and isinstance(schema.get("pattern"), str):
        chars = _char_class(schema["pattern"])
        if chars is not None:
            rules.append(f'{name} ::= "\\"" {chars}{{1,200}} "\\""')
            return name
    if typ in _SIMPLE:
        return _SIMPLE[typ]
    if typ == "array":
        item = schema_rule(schema.get("items", {}), f"{name}-item", rules, depth + 1)
        rules.append(f'{name} ::= "[" ( {item} ( ", " {item} )* )? "]"')
        return name
    if typ == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            return "object"
        required = [p for p in (schema.get("required") or []) if p in props]
        ordered = required + [p for p in props if p not in required]
        parts: list[str] = []
        for i, prop in enumerate(ordered):
            value = schema_rule(props[prop], f"{name}-p{i}", rules, depth + 1)
            key = _literal(prop)
            if prop in required:
                sep = '", " ' if parts else ""
                parts.append(f'{sep}{key} ": " {value}')
            else:
                sep = '", " ' if parts else ""
                parts.append(f'( {sep}{key} ": " {value} )?')
        rules.append(f'{name} ::= "{{" ' + " ".join(parts) + ' "}"')
        return name
    return "value"


def spawn_rules(max_outlines: int, *, sep: str, otext: str | None, dialect: Dialect = CANONICAL,
                min_outlines: int = 2, name: str = "spawn") -> list[str]:
    """``name`` (default ``spawn``): the dialect's spawn block up to its spawn point with
    ``min_outlines``..``max_outlines`` outlines (2.. by default), each outline's text matching the
    ``otext`` rule, defined here as ``otext`` (``None``: an ``otext`` rule defined by another call
    is reused). Tag dialects number their
    outlines (``<Outline>1:{sep}...``); APR writes ``spawn(["...", "..."])``, each task a JSON string."""
    need = max(1, min(min_outlines, max_outlines))
    if isinstance(dialect, APRDialect):
        items = ['"\\"" otext "\\""'] * max_outlines
        required = ' ", " '.join(items[:need])
        optional = ""
        for item in reversed(items[need:]):
            optional = f'( ", " {item} {optional})? '
        rules = [f'{name} ::= {gbnf_literal(dialect.parallel_open)} {required} {optional}'
                 f"{gbnf_literal(dialect.spawn_marker)}"]
    else:
        outlines = [f"{gbnf_literal(f'{dialect.outline_open}{i}:{sep}')} otext "
                    f"{gbnf_literal(dialect.outline_close + chr(10))}" for i in range(1, max_outlines + 1)]
        optional = ""
        for o in reversed(outlines[need:]):
            optional = f"( {o} {optional})? "
        head = gbnf_literal(f"{dialect.parallel_open}\n{dialect.outlines_open}\n")
        rules = [f"{name} ::= {head} {' '.join(outlines[:need])} {optional}{gbnf_literal(dialect.spawn_marker)}"]
    return rules + ([f"otext ::= {otext}"] if otext is not None else [])


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def protocol_gbnf(*, branch: bool, can_spawn: bool, max_outlines: int = 4) -> str:
    """A GBNF grammar for one context's continuation in the canonical dialect (few-shot format).

    Allowed: plain text without ``<``; Hermes tool calls whose body is
    ``{"name": "...", "arguments": {JSON object}}``; when ``can_spawn``, a spawn
    block ``<Parallel>\\n<Outlines>\\n`` with outlines numbered 1, 2, ... (at least 2,
    at most ``max_outlines``) up to ``</Outlines>``; in a branch, ``</Thread>``.
    Generation stops at those closing tags (stop strings), so the grammar never
    has to describe what follows them. ``<tool_response>`` cannot be written:
    only the runtime writes tool results.
    """
    rules = [
        r'text ::= [^<]',  # one character: "text text" stays unambiguous for the grammar engine
        r'call ::= "<tool_call>{\"name\": \"" name "\", \"arguments\": " object "}</tool_call>"',
        r'name ::= [a-zA-Z_] [a-zA-Z0-9_.-]*',
        *JSON_RULES,
    ]
    items = ["text", "call"]
    if can_spawn:
        items.append("spawn")
        rules += spawn_rules(max_outlines, sep="", otext=r"[^<\n]{1,80}")
    if branch:
        items.append("close")
        rules.append(r'close ::= "</Thread>"')
    else:
        items.append("end")  # the few-shot end-of-answer marker (FEWSHOT_END_STOPS)
        rules.append(r'end ::= "<end>"')
    return "\n".join([f"root ::= ( {' | '.join(items)} )*", *rules]) + "\n"


__all__ = ["JSON_RULES", "gbnf_literal", "protocol_gbnf", "schema_rule", "spawn_rules"]
