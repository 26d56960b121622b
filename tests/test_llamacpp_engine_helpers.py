"""Pure helpers of the batched llama.cpp engine and the engines bench (no model, no llama.cpp needed).

The engine itself is tested with the real model in tests/integration/test_llamacpp_batched.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from apr_agents.backends.base import Completion
from apr_agents.backends.llamacpp_helpers import (
    PrefixStates,
    common_prefix,
    find_first,
    grammar_source,
    holdback,
    physical_cores,
)


def test_holdback_keeps_what_could_still_become_a_stop() -> None:
    assert holdback("abc </Out", ["</Outlines>"]) == 5
    assert holdback("abc <", ["</Outlines>", "<end>"]) == 1
    assert holdback("abc", ["</Outlines>"]) == 0
    assert holdback("x</Outlines", ["</Outlines>"]) == len("</Outlines")


def test_find_first_takes_the_earliest_then_the_longest() -> None:
    assert find_first("a<end> b</Thread>", ["</Thread>", "<end>"], 0) == (1, "<end>")
    assert find_first("ab</tool_call>", ["</tool", "</tool_call>"], 0) == (2, "</tool_call>")
    assert find_first("abc", ["x"], 0) is None
    assert find_first("<end>abc<end>", ["<end>"], 1) == (8, "<end>")


def test_prefix_states_find_the_longest_shared_prefix_and_evict_the_oldest() -> None:
    states = PrefixStates(capacity_bytes=100)
    assert states.best([1, 2, 3]) is None
    states.put([1, 2, 3, 4], b"a" * 40)
    states.put([7, 8, 9], b"b" * 40)
    assert states.best([1, 2, 3, 9]) == ((1, 2, 3, 4), b"a" * 40, 3)
    assert states.best([7, 8]) == ((7, 8, 9), b"b" * 40, 2)
    assert states.best([5]) is None  # nothing shared is no match
    assert states.covers([1, 2]) and not states.covers([1, 2, 5])
    # a newer state that extends an older one replaces it
    states.put([1, 2, 3, 4, 5], b"c" * 40)
    assert len(states) == 2 and states.size_bytes == 80
    # past the budget the least recently used goes: [7, 8, 9] was used after [1..5] was put
    states.best([7])
    states.put([4, 4], b"d" * 40)
    assert len(states) == 2 and states.best([1, 2]) is None and states.best([7])[0] == (7, 8, 9)
    states.put([6], b"e" * 101)  # larger than the whole budget: not kept
    assert states.best([6]) is None and states.size_bytes <= 100
    states.discard([7, 8, 9])  # a state the engine refused to load
    assert states.best([7]) is None and len(states) == 1 and states.size_bytes == 40
    states.discard([7, 8, 9])  # forgetting twice is harmless
    states.put([1], b"f")
    states.clear()
    assert len(states) == 0 and states.size_bytes == 0


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7, 8], [7, 8]) == 2


def test_grammar_source_accepts_gbnf_text_and_llamagrammar_like_objects() -> None:
    assert grammar_source(None) is None
    assert grammar_source('root ::= "a"') == ('root ::= "a"', "root")

    class G:  # what llama_cpp.LlamaGrammar keeps: the GBNF text and the root rule
        _grammar = 'root ::= "b"'
        _root = "root"

    assert grammar_source(G()) == ('root ::= "b"', "root")
    with pytest.raises(TypeError):
        grammar_source(42)


def test_engines_bench_reports_plugin_over_raw_and_reevaluated_prefix() -> None:
    from apr_cli.bench.engines import bench_engine, reevaluated_per_branch

    class FakeEngine:
        """FAKE engine: each call 'decodes' max_tokens tokens after a short sleep; calls overlap freely."""

        def render(self, messages: list, tools: list) -> str:
            return "prompt: " + " ".join(str(m.content) for m in messages) + "\n"

        async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                           temperature: float = 0.0) -> Completion:
            await asyncio.sleep(0.02)
            return Completion(text=" x" * max_tokens, finish_reason="length", prompt_tokens=10,
                              completion_tokens=max_tokens, cached_prompt_tokens=9)

    rows = asyncio.run(bench_engine(FakeEngine(), [2, 4], tokens=3, reps=1))
    for r in rows:
        assert r["raw_phase_s"] > 0 and r["raw_sequential_phase_s"] > r["raw_phase_s"]
        assert 0.5 < r["plugin_over_raw"] < 5  # both overlap K sleeps
        assert r["shared_prefix_tokens"] is None and r["reevaluated_per_fork_warm"] is None  # no tokenizer
    comps = [Completion(text="", prompt_tokens=600, cached_prompt_tokens=c) for c in (599, 550, 0)]
    assert reevaluated_per_branch(560, comps) == [0, 10, 560]


def _decoded(stops=(), end_stops=(), budget=100, emit=None):
    from apr_agents.backends.llamacpp_helpers import DecodedText

    pieces = {1: b"Hel", 2: b"lo <", 3: b"/T", 4: b"hread> x", 5: b"\xc3", 6: b"\xa9", 0: b""}
    return DecodedText(list(stops), list(end_stops), budget, emit, is_end=lambda t: t == 0,
                       piece=lambda t: pieces[t])


def test_decoded_text_cuts_at_a_stop_and_streams_only_safe_text() -> None:
    seen: list[str] = []
    out = _decoded(stops=["</Thread>"], emit=seen.append)
    assert out.take(1) and out.take(2) and out.take(3)
    assert "".join(seen) == "Hello "  # "<" and "</T" could still start the stop
    assert not out.take(4)
    assert (out.finish, out.hit, out.n_out) == ("stop", "</Thread>", 4)
    assert out.close() == "Hello " and "".join(seen) == "Hello "


def test_decoded_text_end_token_budget_and_utf8() -> None:
    out = _decoded(end_stops=["</T"])
    assert out.take(1) and out.take(2) and not out.take(3)
    assert (out.finish, out.hit, out.close()) == ("eos", None, "Hello ")  # an end stop is no hit
    out = _decoded(budget=2)
    assert out.take(5) and not out.take(6)  # a character split over two tokens
    assert (out.finish, out.close(), out.n_out) == ("length", "é", 2)
    out = _decoded()
    assert not out.take(0) and out.finish == "eos" and out.n_out == 0
    seen: list[str] = []
    out = _decoded(emit=seen.append)
    out.take(1)
    assert out.close(emit=False) == "Hel" and seen == ["Hel"]  # a cancelled call streams no more


def test_decoded_text_takes_forced_text_with_its_token_count() -> None:
    out = _decoded(stops=["</Thread>"], budget=10)
    assert out.take(1) and out.take_text("lo world", 3)
    assert (out.text, out.n_out) == ("Hello world", 4)
    assert not out.take_text("!</Thread>", 4)  # a stop inside forced text ends the call there
    assert (out.finish, out.hit, out.close(), out.n_out) == ("stop", "</Thread>", "Hello world!", 8)
    out = _decoded(budget=3)
    assert out.take(1) and not out.take_text("lo", 2) and out.finish == "length"


def test_physical_cores_counts_each_core_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    n = physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    # two hyper-threads of core 0 and one of core 1 (the sibling lists llama.cpp reads too)
    siblings = {0: "0,2", 1: "1", 2: "0,2"}
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        parts = self.parts
        if "topology" in parts:
            return siblings[int(parts[-3].removeprefix("cpu"))] + "\n"
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(Path, "read_text", read_text)
    assert physical_cores() == 2
