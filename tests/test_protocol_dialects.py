"""Protocol unit tests for the three dialects: events, repairs, tags split across chunks."""

from __future__ import annotations

import pytest

from apr_agents.protocol import (
    BranchEnd,
    Outline,
    ParallelClose,
    ParallelOpen,
    Repair,
    Spawn,
    StreamParser,
    Text,
    ThreadClose,
    ThreadOpen,
    ToolCall,
    ToolResponse,
    get_dialect,
    parse_document,
    parse_events,
)

CANONICAL_BLOCK = (
    "Plan.\n<Parallel>\n<Outlines>\n<Outline>1: left</Outline>\n<Outline>2: right</Outline>\n</Outlines>\n"
    "<Thread>1: L</Thread>\n<Thread>2: R</Thread>\n</Parallel>\nDone."
)
MULTIVERSE_BLOCK = (
    "Plan.\n<Parallel>\n<Goal>\n<Outline>\n1: left\n</Outline>\n<Outline>\n2: right\n</Outline>\n</Goal>\n"
    "<Path>\n1: L\n</Path>\n<Path>\n2: R\n</Path>\n<Conclusion>\nboth\n</Conclusion>\n</Parallel>\nDone."
)
APR_BLOCK = 'Plan. spawn(["left", "right"])\njoin(["L", "R"])\nDone.'


def kinds(events: list[object]) -> list[str]:
    return [type(e).__name__ for e in events]


def structural(events: list[object]) -> list[object]:
    return [e for e in events if not isinstance(e, Text)]


def repairs(events: list[object]) -> list[str]:
    return [e.kind for e in events if isinstance(e, Repair)]


def spawn_of(events: list[object], depth: int = 1) -> Spawn:
    found = [e for e in events if isinstance(e, Spawn) and e.depth == depth]
    assert len(found) == 1, events
    return found[0]


# -- well-formed blocks ----------------------------------------------------------------------------

@pytest.mark.parametrize(("dialect", "text"), [("canonical", CANONICAL_BLOCK), ("multiverse", MULTIVERSE_BLOCK)])
def test_tag_dialect_block_events(dialect: str, text: str) -> None:
    events = parse_events(text, dialect)
    assert structural(events) == [
        ParallelOpen(1),
        Spawn((Outline("1", "left", "1"), Outline("2", "right", "2")), 1),
        ThreadOpen(1),
        ThreadClose("1", events[kinds(events).index("ThreadClose")].text, 1),
        ThreadOpen(1),
        ThreadClose("2", [e for e in events if isinstance(e, ThreadClose)][1].text, 1),
        ParallelClose(1, 2),
    ]
    closes = [e for e in events if isinstance(e, ThreadClose)]
    assert [c.text.strip() for c in closes] == ["1: L", "2: R"]
    assert not repairs(events)
    assert isinstance(events[0], Text) and events[0].text == "Plan.\n"
    assert events[-1] == Text("\nDone.", 0)
    doc = parse_document(text, dialect)
    assert doc.final_text == "Done."
    assert [len(b.outlines) for b in doc.all_blocks()] == [2] and [t.label for t in doc.blocks[0].threads] == ["1", "2"]


def test_multiverse_conclusion_is_text_inside_the_block() -> None:
    events = parse_events(MULTIVERSE_BLOCK, "multiverse")
    inside = "".join(e.text for e in events if isinstance(e, Text) and e.depth == 1)
    assert "<Conclusion>\nboth\n</Conclusion>" in inside


def test_apr_spawn_and_join_events() -> None:
    events = parse_events(APR_BLOCK, "apr")
    assert structural(events) == [
        ParallelOpen(1),
        Spawn((Outline("1", "left", "1"), Outline("2", "right", "2")), 1),
        ParallelClose(1, 2),
    ]
    assert events[0] == Text("Plan. ", 0)
    assert not repairs(events)
    # a join( with no open spawn is a branch's end (the child's own join)
    assert structural(parse_events(" worked join(", "apr")) == [BranchEnd(" worked ")]


def test_apr_spawn_arguments_of_any_json_type() -> None:
    spawn = spawn_of(parse_events('spawn([{"task": 1}, 2, "three"])', "apr"))
    assert [o.text for o in spawn.outlines] == ['{"task": 1}', "2", "three"]
    assert [o.label for o in spawn.outlines] == ["1", "2", "3"]


@pytest.mark.parametrize("dialect", ["canonical", "multiverse"])
def test_nested_blocks_carry_their_depth(dialect: str) -> None:
    d = get_dialect(dialect)
    inner = (f"{d.parallel_open}{d.outlines_open}{d.outline_open}1: in{d.outline_close}{d.spawn_marker}"
             f"{d.thread_open}1: deep{d.thread_close}{d.parallel_close}")
    text = (f"{d.parallel_open}{d.outlines_open}{d.outline_open}1: out{d.outline_close}{d.spawn_marker}"
            f"{d.thread_open}1: {inner} back{d.thread_close}{d.parallel_close}after")
    events = parse_events(text, dialect)
    assert [e.depth for e in events if isinstance(e, ParallelOpen)] == [1, 2]
    assert [e.depth for e in events if isinstance(e, ParallelClose)] == [2, 1]
    assert spawn_of(events, 2).outlines[0].text == "in"
    outer = next(e for e in events if isinstance(e, ThreadClose) and e.depth == 1)
    assert outer.text.endswith(" back") and inner in outer.text
    doc = parse_document(text, dialect)
    assert len(doc.all_blocks()) == 2 and doc.final_text == "after"
    assert doc.blocks[0].threads[0].blocks[0].threads[0].label == "1"


def test_tool_calls_and_responses() -> None:
    text = ('a <tool_call>{"name": "calc", "arguments": {"x": 1}}</tool_call>'
            '<tool_response>2 <Parallel></Thread> spawn([</tool_response> b')
    for dialect in ("canonical", "multiverse", "apr"):
        events = parse_events(text, dialect)
        assert structural(events) == [
            ToolCall("calc", {"x": 1}, '{"name": "calc", "arguments": {"x": 1}}'),
            ToolResponse("2 <Parallel></Thread> spawn(["),  # markers inside a response are inert
        ], dialect


@pytest.mark.parametrize(("body", "name", "args", "error"), [
    ('{"name": "f", "arguments": {"a": 1}}', "f", {"a": 1}, None),
    ('{"name": "f", "parameters": {"a": 1}}', "f", {"a": 1}, None),
    ('{"name": "f", "arguments": "{\\"a\\": 2}"}', "f", {"a": 2}, None),
    ('{"name": "f"}', "f", {}, None),
    ("{bad json", "", {}, "not valid JSON"),
    ("[1, 2]", "", {}, "JSON object"),
    ('{"arguments": {}}', "", {}, "no 'name'"),
    ('{"name": "f", "arguments": [1]}', "f", {}, "must be a JSON object"),
    ('{"name": "f", "arguments": "nope"}', "f", {}, "not JSON"),
    ("[" * 100_000, "", {}, "not valid JSON"),  # recursion bomb: an error, not a crash
])
def test_tool_call_parsing_never_raises(body: str, name: str, args: dict, error: str | None) -> None:
    (call,) = [e for e in parse_events(f"<tool_call>{body}</tool_call>") if isinstance(e, ToolCall)]
    assert (call.name, call.arguments) == (name, args)
    if error is None:
        assert call.error is None
    else:
        assert call.error is not None and error in call.error


# -- repairs: malformed, unclosed, duplicated, mis-numbered ------------------------------------------

@pytest.mark.parametrize("dialect", ["canonical", "multiverse"])
def test_duplicate_and_missing_outline_numbers_are_renumbered(dialect: str) -> None:
    d = get_dialect(dialect)
    outs = "".join(f"{d.outline_open}{t}{d.outline_close}" for t in ["1: a", "1: b", "c", "2: d"])
    events = parse_events(f"{d.parallel_open}{d.outlines_open}{outs}{d.spawn_marker}", dialect)
    spawn = spawn_of(events)
    assert [(o.label, o.text, o.written_label) for o in spawn.outlines] == [
        ("1", "a", "1"), ("2", "b", "1"), ("3", "c", None), ("4", "d", "2"),  # renumbered by position
    ]
    assert repairs(events) == ["duplicate_outline_number", "missing_outline_number", "duplicate_outline_number",
                               "unclosed_parallel"]


def test_mis_numbered_outlines_keep_their_written_labels_and_order() -> None:
    text = "<Parallel><Outlines><Outline>7: a</Outline><Outline>3: b</Outline><Outline>1.2: c</Outline></Outlines>"
    spawn = spawn_of(parse_events(text))
    assert [o.label for o in spawn.outlines] == ["7", "3", "1.2"]
    assert [o.text for o in spawn.outlines] == ["a", "b", "c"]


def test_huge_and_odd_labels_are_bounded() -> None:
    text = ("<Parallel><Outlines><Outline>" + "9" * 5000 + ": big</Outline><Outline>١: arabic digit</Outline>"
            "<Outline>: empty</Outline></Outlines>")
    spawn = spawn_of(parse_events(text))
    assert len(spawn.outlines) == 3
    assert all(len(o.label) <= 20 for o in spawn.outlines)  # labels are at most 9 digits per part
    assert len({o.label for o in spawn.outlines}) == 3


@pytest.mark.parametrize("dialect", ["canonical", "multiverse"])
def test_unclosed_outline_thread_and_block(dialect: str) -> None:
    d = get_dialect(dialect)
    text = (f"{d.parallel_open}{d.outlines_open}{d.outline_open}1: a{d.outline_open}2: b{d.spawn_marker}"
            f"{d.thread_open}1: x{d.thread_open}2: y")
    events = parse_events(text, dialect)
    assert [o.text for o in spawn_of(events).outlines] == ["a", "b"]
    closes = [e for e in events if isinstance(e, ThreadClose)]
    assert [(c.label, c.truncated) for c in closes] == [("1", True), ("2", True)]
    assert repairs(events) == ["unclosed_outline", "unclosed_outline", "unclosed_thread", "unclosed_parallel"]
    assert events[-1] == ParallelClose(1, 2)


@pytest.mark.parametrize("dialect", ["canonical", "multiverse"])
def test_threads_without_spawn_marker_spawn_by_repair(dialect: str) -> None:
    d = get_dialect(dialect)
    text = (f"{d.parallel_open}{d.outlines_open}{d.outline_open}1: a{d.outline_close}"
            f"{d.thread_open}1: x{d.thread_close}{d.parallel_close}")
    events = parse_events(text, dialect)
    assert repairs(events) == ["missing_spawn_marker"]
    assert [o.text for o in spawn_of(events).outlines] == ["a"]
    assert events[-1] == ParallelClose(1, 1)


@pytest.mark.parametrize("dialect", ["canonical", "multiverse"])
def test_block_closed_with_a_thread_open(dialect: str) -> None:
    d = get_dialect(dialect)
    text = f"{d.parallel_open}{d.outlines_open}{d.outline_open}1: a{d.outline_close}{d.spawn_marker}" \
           f"{d.thread_open}1: cut{d.parallel_close}tail"
    events = parse_events(text, dialect)
    assert repairs(events) == ["unclosed_thread"]
    (close,) = [e for e in events if isinstance(e, ThreadClose)]
    assert close.truncated and close.text == "1: cut"
    assert events[-1] == Text("tail", 0)


@pytest.mark.parametrize("dialect", ["canonical", "multiverse"])
def test_stray_and_repeated_tags(dialect: str) -> None:
    d = get_dialect(dialect)
    text = (f"{d.outline_open}1: x{d.outline_close} {d.thread_open}1: y{d.thread_close} {d.spawn_marker}"
            f"{d.parallel_close}"
            f"{d.parallel_open}{d.outlines_open}{d.outline_open}1: a{d.outline_close}{d.spawn_marker}{d.spawn_marker}"
            f"{d.outline_open}2: late{d.outline_close}{d.thread_open}1: t{d.thread_close}{d.thread_close}"
            f"{d.parallel_close}{d.parallel_close}")
    events = parse_events(text, dialect)
    # the stray thread close at depth 0 ends the enclosing branch (when this text is a branch's)
    assert sum(isinstance(e, BranchEnd) for e in events) == 1
    assert repairs(events) == [
        "stray_outline", "stray_close", "stray_thread", "stray_spawn_marker", "stray_close",
        "stray_spawn_marker", "stray_outline", "stray_close", "stray_close", "stray_close",
    ]
    assert [o.text for o in spawn_of(events).outlines] == ["a"]  # the late outline is not a branch
    assert [e for e in events if isinstance(e, ParallelClose)] == [ParallelClose(1, 1)]


def test_duplicated_whole_block_gives_two_spawns() -> None:
    events = parse_events(MULTIVERSE_BLOCK + "\n" + MULTIVERSE_BLOCK, "multiverse")
    assert [len(e.outlines) for e in events if isinstance(e, Spawn)] == [2, 2]
    assert not repairs(events)
    assert len(parse_document(MULTIVERSE_BLOCK * 2, "multiverse").blocks) == 2


def test_apr_repairs() -> None:
    unclosed = parse_events('spawn(["a", "b"', "apr")
    assert repairs(unclosed) == ["unclosed_spawn", "missing_spawn_marker", "unclosed_parallel"]
    assert spawn_of(unclosed).outlines == ()
    bad = parse_events("spawn([a, 'b', ])", "apr")
    assert repairs(bad)[0] == "bad_spawn_arguments"
    assert [o.text for o in spawn_of(bad).outlines] == ["a", "'b'"]
    assert repairs(parse_events("x ]) y", "apr")) == ["stray_spawn_marker"]


def test_unclosed_tool_call_and_response() -> None:
    assert repairs(parse_events('<tool_call>{"name": "f"')) == ["unclosed_tool_call"]
    events = parse_events("<tool_response>half")
    assert structural(events) == [ToolResponse("half"), Repair("unclosed_tool_response", "")]
    assert repairs(parse_events("x</tool_call></tool_response>")) == ["stray_close", "stray_close"]


def test_too_many_outlines_are_capped_once() -> None:
    text = "<Parallel><Outlines>" + "".join(f"<Outline>{i}: t</Outline>" for i in range(1, 51)) + "</Outlines>"
    p = StreamParser("canonical", max_outlines=5)
    events = p.feed(text) + p.close()
    assert len(spawn_of(events).outlines) == 5
    assert repairs(events).count("too_many_outlines") == 1


# -- chunking: tags split across chunk boundaries --------------------------------------------------

@pytest.mark.parametrize(("dialect", "text"), [
    ("canonical", CANONICAL_BLOCK + '<tool_call>{"name": "f", "arguments": {}}</tool_call>'),
    ("multiverse", MULTIVERSE_BLOCK),
    ("apr", APR_BLOCK + ' spawn(["x"]) join(["y"])'),
])
def test_every_chunking_gives_the_same_events(dialect: str, text: str) -> None:
    whole = parse_events(text, dialect)
    for size in (1, 2, 3, 5, 7, 11, 64):
        assert parse_events(text, dialect, chunk=size) == whole, size
    # every single split point, including inside every tag
    for cut in range(len(text) + 1):
        p = StreamParser(dialect)
        assert p.feed(text[:cut]) + p.feed(text[cut:]) + p.close() == whole, cut


def test_split_marker_is_held_back_until_complete() -> None:
    p = StreamParser("canonical")
    assert p.feed("abc </Thr") == []  # text is emitted whole at the next marker; "</Thr" may be one
    assert p.feed("ead>") == [Text("abc ", 0), BranchEnd("abc ")]
    q = StreamParser("canonical")
    assert q.feed("a <Para") == []
    assert q.feed("graph>") == []  # not a tag after all: the text comes with the next marker or close
    assert q.close() == [Text("a <Paragraph>", 0)]


def test_a_thread_close_inside_a_thread_closes_only_that_thread() -> None:
    p = StreamParser("multiverse")
    p.feed("<Parallel><Goal><Outline>1: a</Outline></Goal><Path>\n1: part")
    assert p.depth == 1 and [lbl for lbl, _ in p.open_threads()] == ["1"]
    events = p.feed(" more</Path>\n")
    assert [type(e).__name__ for e in events] == ["Text", "ThreadClose"]
    assert p.depth == 1 and p.open_threads() == []
