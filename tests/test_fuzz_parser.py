"""Property-based fuzzing of the protocol parser (and, smaller, of the whole runtime).

Generated protocol documents in all three dialects, then mutated (truncated, tags deleted,
duplicated, swapped or inserted, labels replaced by huge numbers or unicode), parsed with every
dialect: the incremental parser must give the same events whatever the chunking, never raise,
never loop, and keep its structural invariants. Sizes: ``HYPOTHESIS_PROFILE=ci`` (default) or
``nightly`` (>= 10,000 examples per property), registered in tests/conftest.py.
"""

from __future__ import annotations

import itertools
import json
import time

from hypothesis import given, note, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage

from apr_agents import APRConfig, create_apr_agent
from apr_agents.protocol import (
    DIALECTS,
    ParallelClose,
    ParallelOpen,
    Repair,
    Spawn,
    StreamParser,
    Text,
    ThreadClose,
    ThreadOpen,
    neutralize,
    parse_document,
)
from apr_agents.testing import ScriptedBackend

ALL_MARKERS = sorted({m for d in DIALECTS.values() for m in d.markers} | {"<Conclusion>", "</Conclusion>"})
PARTIAL_MARKERS = sorted({m[:k] for m in ALL_MARKERS for k in (1, 2, len(m) // 2, len(m) - 1) if 0 < k < len(m)})
WEIRD = [
    "é", "Ω", "🙂", "\u0000", "\u202e", "\u200b", "e\u0301", "\r\n", "\t", "１:", "٣:", "&lt;Parallel&gt;",
    "<PARALLEL>", "< Parallel>", "<Parallel >", "<<", ">>", "</", "<", ">", "[", "]", "(", ")", "\\", '"',
]
NUMBERS = ["1", "2", "10", "007", "1.2", "1.2.3", "-1", "0", "99999999999999999999", "1e309", "NaN"]
JSON_BITS = ['{"name": "calc", "arguments": {"expr": "1+1"}}', '{"name": ', '{}', "[1, 2", '"a", "b"',
             '{"x": [[[[[[[[[[1]]]]]]]]]]}', "null"]
WORDS = ["plan", "answer", "Let's think in parallel.", " ", "\n", "x" * 50]
FRAGMENT = st.sampled_from(ALL_MARKERS + PARTIAL_MARKERS + WEIRD + NUMBERS + JSON_BITS + WORDS)


@st.composite
def label(draw: st.DrawFn, i: int) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from(NUMBERS))  # mis-numbered, duplicated, huge
    if kind == 1:
        return ""  # missing number
    return str(i)


@st.composite
def body(draw: st.DrawFn, dialect: str, depth: int) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        choice = draw(st.integers(0, 9))
        if choice <= 4:
            parts.append(draw(st.text(max_size=20)) if choice == 0 else draw(st.sampled_from(WORDS)))
        elif choice <= 6:
            parts.append(f"<tool_call>{draw(st.sampled_from(JSON_BITS))}</tool_call>")
        elif choice == 7:
            parts.append(f"<tool_response>{draw(st.sampled_from(WORDS + ALL_MARKERS))}</tool_response>")
        elif depth < 3:
            parts.append(draw(block(dialect, depth + 1)))
    return "".join(parts)


@st.composite
def block(draw: st.DrawFn, dialect: str, depth: int = 0) -> str:
    n = draw(st.integers(0, 4))
    labels = [draw(label(i)) for i in range(1, n + 1)]
    bodies = [draw(body(dialect, depth)) for _ in range(n)]
    if dialect == "apr":
        return (f"spawn({json.dumps(['task ' + lbl for lbl in labels])})\n" + draw(body(dialect, depth))
                + f"join({json.dumps(bodies)})\n")
    if dialect == "multiverse":
        outs = "".join(f"<Outline>\n{lbl}: step {lbl}\n</Outline>\n" for lbl in labels)
        paths = "".join(f"<Path>\n{lbl}: {b}\n</Path>\n" for lbl, b in zip(labels, bodies, strict=True))
        return f"<Parallel>\n<Goal>\n{outs}</Goal>\n{paths}<Conclusion>\nok\n</Conclusion>\n</Parallel>\n"
    outs = "".join(f"<Outline>{lbl}: step {lbl}</Outline>\n" for lbl in labels)
    threads = "".join(f"<Thread>{lbl}: {b}</Thread>\n" for lbl, b in zip(labels, bodies, strict=True))
    return f"<Parallel>\n<Outlines>\n{outs}</Outlines>\n{threads}</Parallel>\n"


@st.composite
def document(draw: st.DrawFn) -> str:
    dialect = draw(st.sampled_from(sorted(DIALECTS)))
    parts = [draw(body(dialect, 0))]
    for _ in range(draw(st.integers(0, 3))):
        parts.append(draw(block(dialect)))
        parts.append(draw(body(dialect, 0)))
    return "".join(parts)


def _marker_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in ALL_MARKERS:
        start = text.find(m)
        while start >= 0:
            spans.append((start, start + len(m)))
            start = text.find(m, start + 1)
    return sorted(spans)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(document())
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.integers(0, 6))
        spans = _marker_spans(text)
        pos = draw(st.integers(0, len(text)))
        if op == 0:  # truncate
            text = text[:pos]
        elif op == 1 and spans:  # delete a tag
            a, b = draw(st.sampled_from(spans))
            text = text[:a] + text[b:]
        elif op == 2 and spans:  # duplicate a tag
            a, b = draw(st.sampled_from(spans))
            text = text[:b] + text[a:b] + text[b:]
        elif op == 3 and len(spans) >= 2:  # swap two tags
            (a1, b1), (a2, b2) = sorted(draw(st.lists(st.sampled_from(spans), min_size=2, max_size=2, unique=True)))
            if b1 <= a2:
                text = text[:a1] + text[a2:b2] + text[b1:a2] + text[a1:b1] + text[b2:]
        elif op == 4:  # insert a fragment (tags, partial tags, unicode, huge numbers)
            text = text[:pos] + draw(FRAGMENT) + text[pos:]
        elif op == 5:  # repeat a region: duplicated blocks
            end = draw(st.integers(pos, len(text)))
            text = text[:end] + text[pos:end] + text[end:]
        else:  # relabel: a huge or unicode number where a label was
            text = text.replace("1:", draw(st.sampled_from(["99999999999999999999:", "١:", "1.1.1.1.1.1:", ":"])), 1)
    return text


@st.composite
def chunked(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(st.one_of(mutated(), st.lists(FRAGMENT, max_size=40).map("".join)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=12))))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


def run_parser(dialect: str, chunks: list[str]) -> tuple[list[object], StreamParser]:
    p = StreamParser(dialect)
    events: list[object] = []
    for c in chunks:
        events.extend(p.feed(c))
    events.extend(p.close())
    return events, p


def check_invariants(text: str, events: list[object], parser: StreamParser) -> None:
    assert parser.raw == text  # every character consumed exactly once
    assert parser.feed("more <Parallel>") == [] and parser.close() == []  # closed stays closed
    depth = 0
    labels_ok = True
    for ev in events:
        if isinstance(ev, ParallelOpen):
            depth += 1
            assert ev.depth == depth
        elif isinstance(ev, ParallelClose):
            assert ev.depth == depth
            depth -= 1
        elif isinstance(ev, Spawn):
            labels = [o.label for o in ev.outlines]
            labels_ok &= len(labels) == len(set(labels))
        elif isinstance(ev, Text):
            assert ev.text
    assert depth == 0  # close() closes every block
    assert labels_ok  # outline labels are unique within a spawn (repaired when not)
    opens = sum(isinstance(e, ThreadOpen) for e in events)
    closes = sum(isinstance(e, ThreadClose) for e in events)
    assert opens == closes
    assert sum(isinstance(e, Spawn) for e in events) <= sum(isinstance(e, ParallelOpen) for e in events)
    # bounded output: a handful of events per marker, never an explosion
    assert len(events) <= 8 * (len(_marker_spans(text)) + 2)


@given(chunked())
def test_parser_events_do_not_depend_on_chunking(case: tuple[str, list[str]]) -> None:
    text, chunks = case
    note(f"text={text!r}")
    for dialect in DIALECTS:
        t0 = time.perf_counter()
        whole, p_whole = run_parser(dialect, [text])
        pieces, p_pieces = run_parser(dialect, chunks)
        assert pieces == whole, dialect
        if len(text) <= 2000:
            chars, _ = run_parser(dialect, list(text))
            assert chars == whole, dialect
        check_invariants(text, whole, p_whole)
        check_invariants(text, pieces, p_pieces)
        doc = parse_document(text, dialect)
        assert isinstance(doc.final_text, str)
        assert time.perf_counter() - t0 < 10  # never loops; real cost is milliseconds


@given(st.one_of(mutated(), st.lists(FRAGMENT, max_size=60).map("".join), st.text(max_size=200)))
def test_neutralized_data_never_parses_as_structure(text: str) -> None:
    """SPEC §2.7 as a property: after neutralize(), no dialect sees a block, a thread end or a tool call."""
    safe = neutralize(text)
    for dialect in DIALECTS:
        events, _ = run_parser(dialect, [safe])
        for ev in events:
            assert isinstance(ev, Text) or (isinstance(ev, Repair) and ev.kind == "stray_spawn_marker"), (dialect, ev)


def independent_block_counts(text: str, dialect: str) -> list[tuple[int, int]]:
    """(outlines, threads) per block, counted with a plain scan and a stack (no parser code).

    The whole-text conventions: an outline counts while its block has not spawned (spawn marker
    or first thread); while an outline is open (until its close, the next outline or the spawn
    marker, or a thread open) every other tag is its text; a thread belongs to the innermost open block; tool calls
    and responses hide every tag inside them; tags outside any block are stray.
    """
    d = DIALECTS[dialect]
    tags = sorted({d.parallel_open, d.parallel_close, d.outline_open, d.outline_close, d.spawn_marker,
                   d.thread_open, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"},
                  key=len, reverse=True)
    blocks: list[list[int]] = []
    stack: list[list[int]] = []  # [outlines, threads, spawned, outline open]
    mode, i = None, 0
    while i < len(text):
        tag = next((t for t in tags if text.startswith(t, i)), None)
        others = [m for m in ALL_MARKERS if text.startswith(m, i) and m not in tags]
        if tag is None:
            i += len(max(others, key=len)) if others else 1  # a marker of no interest is skipped whole
            continue
        if others and len(max(others, key=len)) > len(tag):
            i += len(max(others, key=len))
            continue
        i += len(tag)
        if mode is not None:
            if tag == f"</{mode}>":
                mode = None
            continue
        top = stack[-1] if stack else None
        if top is not None and top[3]:  # inside an outline: only these end it
            if tag in (d.outline_close, d.outline_open, d.spawn_marker, d.thread_open):
                top[3] = 0
            else:
                continue
        if tag in ("<tool_call>", "<tool_response>"):
            mode = tag[1:-1]
        elif tag == d.parallel_open:
            stack.append([0, 0, 0, 0])
            blocks.append(stack[-1])
        elif top is None:
            continue
        elif tag == d.parallel_close:
            stack.pop()
        elif tag == d.outline_open and not top[2]:
            top[0] += 1
            top[3] = 1
        elif tag == d.spawn_marker:
            top[2] = 1
        elif tag == d.thread_open:
            top[1] += 1
            top[2] = 1
    return [(o, t) for o, t, _, _ in blocks]


@given(st.one_of(mutated(), st.lists(FRAGMENT, max_size=60).map("".join)))
def test_document_block_counts_match_an_independent_count(text: str) -> None:
    for dialect in ("canonical", "multiverse"):
        doc = parse_document(text, dialect)
        got = sorted((len(b.outlines), len(b.threads)) for b in doc.all_blocks())
        assert got == sorted(independent_block_counts(text, dialect)), dialect


HUGE = [
    "<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{i}: t</Outline>" for i in range(3000)) + "</Outlines>",
    "<Parallel><Outlines><Outline>1: a</Outline></Outlines><Thread>1: " * 300,
    "</Thread>" * 3000 + "</Parallel>" * 3000 + "<tool_call>" * 3000,
    'spawn([' + ", ".join(['"x"'] * 3000) + "])",
    "<Outline>" + "9" * 10_000 + ": x</Outline>",
]


def test_parser_on_huge_inputs_is_bounded() -> None:
    for text in HUGE:
        for dialect in DIALECTS:
            t0 = time.perf_counter()
            whole, p = run_parser(dialect, [text])
            pieces, _ = run_parser(dialect, [text[i:i + 7] for i in range(0, len(text), 7)])
            assert pieces == whole
            check_invariants(text, whole, p)
            assert time.perf_counter() - t0 < 20


# -- the runtime on fuzzed model output: finishes, within its limits, trace serialisable ------------

@settings(max_examples=max(10, settings.default.max_examples // 10))
@given(root=mutated(), branch=mutated(), dialect=st.sampled_from(sorted(DIALECTS)))
async def test_runtime_survives_fuzzed_model_output(root: str, branch: str, dialect: str) -> None:
    note(f"root={root!r}\nbranch={branch!r}")
    backend = ScriptedBackend({"": root, "*": branch}, dialect=dialect)
    cfg = APRConfig(dialect=dialect, max_threads=3, max_total_threads=6, max_depth=2, max_tokens=400,
                    max_steps=12, thread_timeout_s=5, run_timeout_s=10, backend_attempts=1)
    t0 = time.perf_counter()
    state = await create_apr_agent(backend, [], cfg).ainvoke({"messages": [HumanMessage("q")]})
    assert time.perf_counter() - t0 < 15
    assert isinstance(state["messages"][-1], AIMessage)
    trace = state["apr_trace"]
    json.dumps(trace)
    summary = trace["summary"]
    assert summary["branches"] <= 6 and summary["max_depth"] <= 2
    assert all(c["end"] is not None for c in trace["contexts"].values())
