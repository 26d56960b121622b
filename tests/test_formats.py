"""Prompt formats, grammars and the model catalog (no model needed; llama.cpp only parses grammars)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from apr_agents.backends import models
from apr_agents.backends.base import BackendUnavailable
from apr_agents.backends.formats import (
    ASSISTANT_START,
    SANE_COUNT_SAY_RULES,
    SCALE_DIVISORS,
    ChatMLFormat,
    FewShotFormat,
    _first_step,
    _max_min_terms,
    _repeated_call,
    _thread_tool_calls,
    answer_figures,
    chatml_gbnf,
    chosen_item,
    gbnf_choice,
    grounded_result_options,
    joined_question,
    just_merged,
    numbers_in_context,
    numbers_in_last_tool_response,
    own_outline,
    tool_response_fields,
    tools_in_prompt,
)
from apr_agents.backends.grammars import JSON_RULES, _char_class, protocol_gbnf, schema_rule
from apr_agents.protocol.dialects import CANONICAL
from apr_tools import calculator, lookup

# A ChatML template in Qwen2.5's shape: tools in the system turn, tool results in a user turn.
QWEN_LIKE = (
    "{{- '<|im_start|>system\\n' + messages[0]['content'] }}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '\\n</tools>' }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- for m in messages[1:] %}{%- if m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [convert_to_openai_tool(t) for t in (calculator, lookup)]


def _options(gbnf: str) -> str:
    return gbnf.splitlines()[0]


def test_chatml_render_lists_tools_once_and_lets_the_template_wrap_tool_results() -> None:
    fmt = ChatMLFormat(QWEN_LIKE)
    msgs = [SystemMessage("Be brief."), HumanMessage("Population of France?"),
            AIMessage("", tool_calls=[{"name": "lookup", "args": {"topic": "France"}, "id": "1"}]),
            ToolMessage("France: 68.4", tool_call_id="1")]
    prompt = fmt.render(msgs, TOOLS)
    assert prompt.endswith(ASSISTANT_START)
    assert "Be brief." in prompt and "Never guess a fact" in prompt  # the dialect's instruction and the user's
    assert prompt.split("<|im_end|>", 1)[1].count("<tool_response>") == 1  # not wrapped twice
    assert [t["name"] for t in tools_in_prompt(prompt)] == ["calculator", "lookup"]
    assert "Custom." in fmt.render(msgs, TOOLS, instruction="Custom.")


def test_tool_results_in_their_own_turn_at_the_root_and_inline_in_a_thread() -> None:
    fmt = ChatMLFormat(QWEN_LIKE)
    root = fmt.tool_results(["68.4"], depth=0)
    assert root.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n68.4\n</tool_response>")
    assert root.endswith(ASSISTANT_START)
    assert fmt.tool_results(["68.4"], depth=1) == "\n<tool_response>68.4</tool_response>\n"
    assert FewShotFormat().tool_results(["a", "b"]) == "\n<tool_response>a</tool_response>\n<tool_response>b</tool_response>\n"
    assert fmt.answer("x" + root + "The answer is 108.5.<|im_end|>") == "The answer is 108.5."


def test_step_state_is_read_from_the_prompt() -> None:
    fmt = ChatMLFormat(QWEN_LIKE)
    start = fmt.render([HumanMessage("q")], TOOLS)
    assert _first_step(start)
    after_tool = start + "<tool_call>\n{}\n</tool_call>" + fmt.tool_results(["1"], depth=0)
    assert not _first_step(after_tool)
    merged = start + "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>1: x</Thread>\n</Parallel>\n"
    assert not _first_step(merged)
    branch = start + "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n<Thread>1:"
    assert _first_step(branch) and _thread_tool_calls(branch, CANONICAL) == 0
    called = branch + '<tool_call>\n{"name": "lookup"}\n</tool_call>\n<tool_response>r</tool_response>\n'
    assert _thread_tool_calls(called, CANONICAL) == 1 and not _first_step(called)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 1"}}\n</tool_call>'
    assert not _repeated_call(start + call) and _repeated_call(start + call + "r" + call)


def test_grammar_per_step() -> None:
    fmt = ChatMLFormat(QWEN_LIKE)
    start = fmt.render([HumanMessage("q")], TOOLS)
    stops = ["</tool_call>", "</Outlines>"]
    first = fmt.grammar(start, stops)
    assert first is not None
    # no answer from memory; the root first says how many items the question has: one item
    # is a tool call (no thread for it), N items a tool call or exactly N threads
    assert _options(first).startswith('root ::= "Items: " ( "1\\n" calls | "2\\n" ( calls | spawn2 ) | "3\\n" ( calls | spawn3 )')
    assert '"6\\n" ( calls | spawn6 ) )' in _options(first) and '"7\\n"' not in first
    spawn3 = next(line for line in first.splitlines() if line.startswith("spawn3 ::="))
    assert spawn3.count("<Outline>") == 3 and "?" not in spawn3  # exactly three outlines
    assert "Items: 2\n<Parallel>" in start and "With one item, call the tool right away" in start
    # how to finish: one calculator call, max()/min() for "which" questions (docs/eval.md)
    assert "finish from their results with one calculator call" in start
    assert "write max(...) or min(...) of the threads' numbers" in start
    # free text never writes a long count with a scale word after it ("35508984 million")
    assert SANE_COUNT_SAY_RULES[0] in first and SANE_COUNT_SAY_RULES[0] not in (
        ChatMLFormat(QWEN_LIKE, sane_counts=False).grammar(start, stops) or "")
    plain = ChatMLFormat(QWEN_LIKE, count_items=False)
    assert _options(plain.grammar(plain.render([HumanMessage("q")], TOOLS), stops) or "") == (
        'root ::= ( say "\\n" )? calls | ( say "\\n" )? spawn')
    later = fmt.grammar(start + "<tool_call>\n{}\n</tool_call>" + fmt.tool_results(["1"], depth=0), stops)
    assert _options(later or "") == 'root ::= ( say "\\n" )? calls | say'
    # grounded_answers (off by default): a line before a call is free; an answer leads with a figure
    held = ChatMLFormat(QWEN_LIKE, grounded_answers=True)
    assert _options(held.grammar(start + "<tool_call>\n{}\n</tool_call>" + fmt.tool_results(["1"]), stops)
                    or "") == 'root ::= ( say "\\n" )? calls | gsay'
    branch = start + "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n<Thread>1:"
    bstops = ["</tool_call>", "</Thread>"]
    # a thread first writes its own outline again, then its tool call
    assert _options(fmt.grammar(branch, bstops) or "") == 'root ::= " " "a" "\\n" calls'
    assert own_outline(branch.replace("<Thread>1:", "<Thread>2:"), CANONICAL) == "b"
    assert own_outline(branch + "x", CANONICAL) is None
    free = ChatMLFormat(QWEN_LIKE, restate_outline=False)
    assert _options(free.grammar(branch, bstops) or "") == "root ::= calls"
    done = branch + '<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results(["r"], depth=1)
    assert _options(fmt.grammar(done, bstops) or "") == 'root ::= "Result: " say ( "</Thread>" )'
    two = ChatMLFormat(QWEN_LIKE, thread_tool_calls=2)
    assert _options(two.grammar(done, bstops) or "") == 'root ::= "Result: " say ( "</Thread>" | "\\n" calls )'
    gbnf = chatml_gbnf(tools_in_prompt(start), branch=False, can_spawn=True, first_step=True)
    assert '"<Outline>6: "' in gbnf and '"<Outline>7: "' not in gbnf
    assert "[0-9a-z_+\\-*/%^(). ,]{1,200}" in gbnf  # the calculator's pattern reached the grammar



def test_right_after_the_merge_the_root_makes_its_finishing_call() -> None:
    """``call_after_merge`` (default on): the root's first step after its threads were merged is a
    tool call (the instruction's "finish from their results with one calculator call"), with no
    prose before it that could answer from memory; later steps, threads and the option off are as before."""
    fmt = ChatMLFormat(QWEN_LIKE)
    start = fmt.render([HumanMessage("Chad plus Peru, in people?")], TOOLS)
    merged = start + ("Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
                      "</Outlines>\n<Thread>1: a\nResult: 17723315</Thread>\n<Thread>2: b\nResult: 32971846</Thread>\n"
                      "</Parallel>\n")
    stops = ["</tool_call>", "<|im_end|>"]
    assert just_merged(merged, CANONICAL) and not just_merged(start, CANONICAL)
    assert _options(fmt.grammar(merged, stops) or "") == "root ::= calls"
    free = ChatMLFormat(QWEN_LIKE, call_after_merge=False)
    assert _options(free.grammar(merged, stops) or "") == 'root ::= ( say "\\n" )? calls | say'
    # two threads that made the same call: the root repeated nothing, and still makes its call
    call = '<tool_call>\n{"name": "lookup", "arguments": {"topic": "Chad"}}\n</tool_call>\n'
    twice = merged.replace("<Thread>1: a\n", f"<Thread>1: a\n{call}").replace("<Thread>2: b\n", f"<Thread>2: b\n{call}")
    assert _repeated_call(twice) and _options(fmt.grammar(twice, stops) or "") == "root ::= calls"
    assert _options(free.grammar(twice, stops) or "") == 'root ::= ( say "\\n" )? calls | say'
    later = merged + '<tool_call>\n{"name": "calculator"}\n</tool_call>' + fmt.tool_results(["50695161"])
    assert not just_merged(later, CANONICAL)
    assert _options(fmt.grammar(later, stops) or "") == 'root ::= ( say "\\n" )? calls | say'
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(fmt.grammar(merged, stops) or "", verbose=False)


def test_a_root_that_keeps_result_lines_for_threads_writes_none_itself() -> None:
    """``thread_only_result`` (off by default): the root's prose (an answer, a line before a call)
    cannot start with ``Result``, the word of a thread's own line; a thread's step is as before.
    (tests/integration/test_llamacpp_backend.py checks the rule with llama.cpp's sampler.)"""
    fmt = ChatMLFormat(QWEN_LIKE, thread_only_result=True)
    start = fmt.render([HumanMessage("How many people live in Brussels?")], TOOLS)
    looked = (start + 'Items: 1\n<tool_call>\n{"name": "lookup", "arguments": {"topic": "Brussels"}}\n</tool_call>'
              + fmt.tool_results(["Brussels: population 1019022"]))
    stops = ["</tool_call>", "<|im_end|>"]
    gbnf = fmt.grammar(looked, stops) or ""
    assert _options(gbnf) == 'root ::= ( rsay "\\n" )? calls | rsay'
    assert '"Resul" [^<>\\n{}`0-9, t] )' in gbnf.split("rsay ::= ", 1)[1].splitlines()[0]
    assert _options(ChatMLFormat(QWEN_LIKE).grammar(looked, stops) or "") == 'root ::= ( say "\\n" )? calls | say'
    branch = start + "Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>1:"
    done = branch + '<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results(["1019022"], depth=1)
    assert "rsay" not in (fmt.grammar(done, ["</tool_call>", "</Thread>"]) or "")
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)


def test_the_root_may_restate_the_question_after_the_merge() -> None:
    fmt = ChatMLFormat(QWEN_LIKE, restate_question=True)
    start = fmt.render([HumanMessage("Which is larger: Peru or Chile?")], TOOLS)
    merged = start + "Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>1: x</Thread>\n</Parallel>\n"
    assert joined_question(merged, CANONICAL) == "Which is larger: Peru or Chile?"
    stops = ["</tool_call>", "</Outlines>"]
    assert _options(fmt.grammar(merged, stops) or "") == (
        'root ::= "Question: " "Which is larger: Peru or Chile?" "\\n" ( calls )')
    # only the first step after the merge: after a tool result the root goes on as before
    later = merged + "Question: x\n<tool_call>\n{}\n</tool_call>" + fmt.tool_results(["1"], depth=0)
    assert joined_question(later, CANONICAL) is None
    assert _options(fmt.grammar(later, stops) or "") == 'root ::= ( say "\\n" )? calls | say'
    # off by default, and never inside a thread
    assert "Question: " not in (ChatMLFormat(QWEN_LIKE).grammar(merged, stops) or "")
    assert joined_question(start, CANONICAL) is None
    assert fmt.answer("Question: Which is larger: Peru or Chile?\nPeru is larger.<|im_end|>") == "Peru is larger."


def test_a_thread_may_answer_its_own_outline_by_name() -> None:
    fmt = ChatMLFormat(QWEN_LIKE, result_names_outline=True)
    start = fmt.render([HumanMessage("q")], TOOLS)
    branch = start + "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: look up b</Outline>\n</Outlines>\n<Thread>2:"
    done = branch + ' look up b\n<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results(["r"], depth=1)
    assert own_outline(done, CANONICAL) is None and own_outline(done, CANONICAL, opening=False) == "look up b"
    bstops = ["</tool_call>", "</Thread>"]
    assert _options(fmt.grammar(done, bstops) or "") == 'root ::= "Result: " "look up b" " = " say ( "</Thread>" )'
    assert _options(fmt.grammar(branch, bstops) or "") == 'root ::= " " "look up b" "\\n" calls'  # unchanged
    assert _options(ChatMLFormat(QWEN_LIKE).grammar(done, bstops) or "") == 'root ::= "Result: " say ( "</Thread>" )'

def test_a_thread_may_be_held_to_a_figure_its_tool_gave() -> None:
    fmt = ChatMLFormat(QWEN_LIKE, grounded_results=True)
    start = fmt.render([HumanMessage("q")], TOOLS)
    branch = start + "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n<Thread>2:"
    response = "Nepal: population 28087871; area 147181 km2; latitude -27.5; code 977 (again 977)"
    done = branch + ' b\n<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results([response], depth=1)
    assert numbers_in_last_tool_response(done) == ["28087871", "147181", "-27.5", "977"]  # not km2's 2
    bstops = ["</tool_call>", "</Thread>"]
    # the outline "b" names no field of the response: any of its numbers
    assert _options(fmt.grammar(done, bstops) or "") == (
        'root ::= "Result: " ( "28087871" | "147181" | "-27.5" | "977" ) ( "\\n" | [ .;] say )? ( "</Thread>" )')
    # a response without numbers, the thread's first step and the root are as before
    words = branch + ' b\n<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results(["Kathmandu"], depth=1)
    assert _options(fmt.grammar(words, bstops) or "") == 'root ::= "Result: " say ( "</Thread>" )'
    off = ChatMLFormat(QWEN_LIKE, grounded_results=False)
    assert _options(fmt.grammar(branch, bstops) or "") == _options(off.grammar(branch, bstops) or "")
    assert _options(off.grammar(done, bstops) or "") == 'root ::= "Result: " say ( "</Thread>" )'
    assert ChatMLFormat(QWEN_LIKE).grammar(done, bstops) == fmt.grammar(done, bstops)  # on by default
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(fmt.grammar(done, bstops) or "", verbose=False)


def test_a_thread_copies_the_fields_its_outline_names() -> None:
    facts = ("Belgium: population 11422068; area 30510 km2; capital Brussels; continent Europe; "
             "neighbours Germany, France")
    assert tool_response_fields(facts)[:3] == [("population", "11422068"), ("area", "30510 km2"),
                                               ("capital", "Brussels")]
    assert tool_response_fields("distance from Brussels to Dodoma: 7016.4 km") == [("distance", "7016.4 km")]
    assert tool_response_fields('{"population": 5, "capital": "Oslo", "tags": [1]}') == [
        ("population", "5"), ("capital", "Oslo")]
    assert tool_response_fields("unknown country 'Manama'. Did you mean: Panama, Myanmar?") == []
    assert tool_response_fields("Kuwait: population: 4.1 million; capital: Kuwait City; land area: 17820") == [
        ("population", "4.1 million"), ("capital", "Kuwait City"), ("land area", "17820")]
    kb = "France: capital: Paris; population_millions: 68.4; area_km2: 551695"  # apr_tools.lookup's layout
    assert grounded_result_options(f"<tool_response>{kb}</tool_response>", "population of France") == ("68.4",)
    done = f"<tool_response>{facts}</tool_response>\n"
    assert grounded_result_options(done, "look up the capital city of Belgium") == ("Brussels",)
    assert grounded_result_options(done, "look up the land area of Belgium") == ("30510 km2",)
    assert grounded_result_options(done, "look up Belgium's population and area") == (
        "population 11422068; area 30510 km2",)
    assert grounded_result_options(done, "look up Belgium") == ("11422068", "30510")  # no field named
    # in a real branch prompt: the outline of the thread being continued decides
    fmt = ChatMLFormat(QWEN_LIKE, grounded_results=True)
    branch = fmt.render([HumanMessage("q")], TOOLS) + (
        "<Parallel>\n<Outlines>\n<Outline>1: look up the capital of Peru</Outline>\n"
        "<Outline>2: look up the capital of Belgium</Outline>\n</Outlines>\n<Thread>2: look up the capital of Belgium")
    done = branch + '\n<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results([facts], depth=1)
    gbnf = fmt.grammar(done, ["</tool_call>", "</Thread>"]) or ""
    # one copy and no tool call left: the grammar forces the whole step (an engine skips it)
    assert _options(gbnf) == 'root ::= "Result: " "Brussels" "\\n" "</Thread>"'
    # a thread that may still call a tool chooses between ending and calling again
    more = ChatMLFormat(QWEN_LIKE, thread_tool_calls=2).grammar(done, ["</tool_call>", "</Thread>"]) or ""
    assert _options(more).startswith('root ::= "Result: " ( "Brussels" ) ( "\\n" | [ .;] say )? ( "</Thread>" | "\\n" calls )')
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)


def test_long_counts_may_be_held_to_the_conversations_numbers() -> None:
    start = ChatMLFormat(QWEN_LIKE).render([HumanMessage("Chad plus Peru, in people?")], TOOLS)
    merged = start + ("Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
                      "</Outlines>\n<Thread>1: a\nResult: 17723315</Thread>\n<Thread>2: b\nResult: 32971846</Thread>\n"
                      "</Parallel>\n")
    stops = ["</tool_call>", "<|im_end|>"]
    on = ChatMLFormat(QWEN_LIKE).grammar(merged, stops) or ""  # on by default
    assert 'slong ::= "17723315" | "17,723,315" | "32971846" | "32,971,846" | "1000000" | "1,000,000"' in on
    # no comma right after a short number; a fraction is part of its number
    assert "snumseg ::= sshort sfrac? [^<>{}`0-9,] | slong sfrac? safter\n" in on
    assert "sshort ::= [0-9]{1,6}\n" in on and 'sfrac ::= "." [0-9]{1,20}' in on
    off = ChatMLFormat(QWEN_LIKE, grounded_counts=False).grammar(merged, stops) or ""  # any long count
    assert "slong ::= [0-9]{7,16}" in off and "17,723,315" not in off
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(on, verbose=False)


def test_arithmetic_may_be_held_to_the_conversations_numbers() -> None:
    fmt = ChatMLFormat(QWEN_LIKE, grounded_arguments={"calculator": "expression"})
    start = fmt.render([HumanMessage("France plus Canada, in millions?")], TOOLS)
    assert "at most 6 outlines" in start  # the instruction and tools come first: not the conversation's
    merged = start + ("Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
                      "</Outlines>\n<Thread>1: a\nResult: 68.4</Thread>\n<Thread>2: b\nResult: 40.1</Thread>\n"
                      "</Parallel>\n")
    assert numbers_in_context(merged) == ["68.4", "40.1", "1000000", "1000", "100", "10", "2", "1", "0"]
    gbnf = fmt.grammar(merged, ["</tool_call>", "<|im_end|>"]) or ""
    assert 'gnum ::= "68.4" | "40.1" | "1000000" | ' in gbnf and '": " gexpr' in gbnf and "gdiv" not in gbnf
    # scale_divisors (off by default): a unit scale the conversation does not hold only divides
    # ("/ 1000000" for "in millions"); one the conversation holds is a figure like any other
    scaled = ChatMLFormat(QWEN_LIKE, scale_divisors=SCALE_DIVISORS)
    divided = scaled.grammar(merged, ["</tool_call>", "<|im_end|>"]) or ""
    assert 'gnum ::= "68.4" | "40.1" | "100" | "10" | "2" | "1" | "0"\n' in divided
    assert 'gdiv ::= "1000000" | "1000"\n' in divided and '| " "? "/" " "? gdiv )' in divided
    held = merged.replace("Result: 40.1", "Result: 1000")
    assert 'gnum ::= "68.4" | "1000" | "100" | ' in (scaled.grammar(held, ["</tool_call>", "<|im_end|>"]) or "")
    assert ChatMLFormat(QWEN_LIKE).grammar(merged, ["</tool_call>", "<|im_end|>"]) == gbnf  # on by default
    off = ChatMLFormat(QWEN_LIKE, grounded_arguments={}).grammar(merged, ["</tool_call>", "<|im_end|>"]) or ""
    assert "gexpr" not in off and "calculator" in off
    # a thread that has looked nothing up has no figure to compute with: it cannot call the calculator
    opened = start + "Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>1:"
    assert numbers_in_context(opened) == []
    first = fmt.grammar(opened, ["</tool_call>", "</Thread>"]) or ""
    assert '\\"name\\": \\"lookup\\"' in first and "calculator" not in first
    # a "calculator" without that argument is neither held nor kept out of reach
    other = [{"name": "calculator", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}]
    assert "calculator" in chatml_gbnf(other, branch=True, can_spawn=False, first_step=True,
                                       grounded={"calculator": "expression"}, context_numbers=())
    llama_cpp = pytest.importorskip("llama_cpp")
    grammar = llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)
    assert grammar is not None


def test_an_answer_leads_with_a_figure_the_conversation_holds() -> None:
    """``grounded_answers``: the figures an answer may lead with, as a trie-shaped rule; the root's
    answer after a tool result uses them, a thread's ``Result:`` and a first step do not."""
    figures = answer_figures(["109224559", "-79.0177", "2"], decimals=2)
    assert figures[:2] == ["109224559", "109,224,559"]  # copied, grouped
    # in thousands and millions, rounded or cut; not in billions (under 1)
    assert {"109225", "109,224.56", "109224.5", "109", "109.2", "109.22", "0.11"} - set(figures) == {"0.11"}
    assert {"79.0177", "79", "79.0", "79.02", "79.01", "2"} <= set(figures) and "-79.0177" not in figures
    assert answer_figures(["x", "2.5"]) == ["2.5", "3", "2"]  # not a number: skipped
    assert gbnf_choice(["79", "79.0", "79.02", "80", "1,000"]) == '( "79" ( ".0" ( "2" )? )? | "80" | "1,000" )'
    assert gbnf_choice(["105"]) == '"105"' and gbnf_choice([]) == '""'
    fmt = ChatMLFormat(QWEN_LIKE, grounded_answers=True)
    start = fmt.render([HumanMessage("Population density of Hungary?")], TOOLS)
    looked = start + "Items: 1\n<tool_call>\n{}\n</tool_call>" + fmt.tool_results(["population 9768785; area 93030"])
    gbnf = fmt.grammar(looked, ["</tool_call>", "<|im_end|>"]) or ""
    assert _options(gbnf) == 'root ::= ( say "\\n" )? calls | gsay'
    shorts = next(line for line in gbnf.splitlines() if line.startswith("gshort ::= "))
    # 93030, 93,030, 93.03 (thousands); 9.8 and 9.77 (millions)
    assert '"3" ( "030" | ",030" | ".0" ( "3" ( "0" )? )? )?' in shorts and '"." ( "8" | "7" ( "7" | ' in shorts
    assert 'glong ::= ( "9" ( "768785" | ",768,785" ) | "1" ( "000000" | ",000,000" ) )' in gbnf
    assert "gsay" not in (fmt.grammar(start, ["</tool_call>", "</Outlines>"]) or "")  # a first step
    branch = start + "Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>1:"
    done = branch + '<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results(["9768785"], depth=1)
    assert "gsay" not in (fmt.grammar(done, ["</tool_call>", "</Thread>"]) or "")  # a thread's Result:
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)


def test_the_answer_names_the_item_a_calculation_picked() -> None:
    fmt = ChatMLFormat(QWEN_LIKE, grounded_choice=True)
    start = fmt.render([HumanMessage("Which is farther from Oslo: Lima or Rome?")], TOOLS)

    def thread(n: int, city: str, result: str) -> str:
        call = json.dumps({"name": "lookup", "arguments": {"city_a": "Oslo", "city_b": city}})
        return (f"<Thread>{n}: distance to {city}\n<tool_call>\n{call}\n</tool_call>\n"
                f"<tool_response>x</tool_response>\nResult: {result}\n</Thread>\n")

    head = start + "Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
    calc = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "max(10980.1, 2007.5)"}}\n</tool_call>'
    merged = head + thread(1, "Lima", "10980.1 km") + thread(2, "Rome", "2007.5 km") + "</Parallel>\n" + calc
    stops = ["</tool_call>", "<|im_end|>"]
    picked = merged + fmt.tool_results(["10980.1"])
    assert chosen_item(picked, CANONICAL) == "Lima"  # city_b differs between the threads; city_a does not
    assert _options(fmt.grammar(picked, stops) or "").startswith('root ::= "Lima" ( [ .,;] say )?')
    # a sum picks no thread; neither does a figure two threads share; nor a default format
    assert chosen_item(merged + fmt.tool_results(["12987.6"]), CANONICAL) is None
    assert chosen_item(picked.replace("2007.5 km", "10980.1 km"), CANONICAL) is None
    assert "Lima" not in (ChatMLFormat(QWEN_LIKE, grounded_choice=False).grammar(picked, stops) or "").splitlines()[0]
    # a merge that leaves the tool calls out (thread_conclusions): the words of the threads'
    # outlines that differ between them name the item
    from apr_agents.graph.merge import thread_conclusions

    def body(n: int, city: str, result: str) -> str:
        return thread(n, city, result).split(":", 1)[1].removesuffix("</Thread>\n")

    folded = thread_conclusions([{"label": "1", "text": body(1, "Lima", "10980.1 km")},
                                 {"label": "2", "text": body(2, "Rome", "2007.5 km")}], CANONICAL)
    assert folded.startswith("<Thread>1: distance to Lima\nResult: 10980.1 km</Thread>") and "tool_call" not in folded
    bare = head + folded + calc + fmt.tool_results(["10980.1"])
    assert chosen_item(bare, CANONICAL) == "Lima"
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(fmt.grammar(picked, stops) or "", verbose=False)


def test_the_answer_names_the_item_whose_ratio_a_calculation_picked() -> None:
    fmt = ChatMLFormat(QWEN_LIKE)
    start = fmt.render([HumanMessage("Which is the most densely populated: Niger, Gabon, North Macedonia?")], TOOLS)
    facts = {"Niger": (22442948, 1267000), "Gabon": (2119275, 267667), "North Macedonia": (2082958, 25333)}

    def thread(n: int, country: str) -> str:
        call = json.dumps({"name": "lookup", "arguments": {"country": country}})
        pop, area = facts[country]
        return (f"<Thread>{n}: look up {country}'s population and area\n<tool_call>\n{call}\n</tool_call>\n"
                f"<tool_response>{country}: population {pop}; area {area} km2</tool_response>\n"
                f"Result: population {pop}; area {area} km2\n</Thread>\n")

    merged = start + "Items: 3\n<Parallel>\n" + "".join(thread(i + 1, c) for i, c in enumerate(facts)) + "</Parallel>\n"

    def calc(expression: str, result: str) -> str:
        call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        return merged + f"<tool_call>\n{call}\n</tool_call>" + fmt.tool_results([result])

    ratios = "max(22442948 / 1267000, 2119275 / 267667, 2082958 / 25333)"
    assert chosen_item(calc(ratios, "82.22310819879209"), CANONICAL) == "North Macedonia"
    assert chosen_item(calc(ratios, "82.22"), CANONICAL) == "North Macedonia"  # a calculator that rounds
    assert chosen_item(calc(ratios.replace("max", "min"), "7.917580"), CANONICAL) == "Gabon"
    stops = ["</tool_call>", "<|im_end|>"]
    assert _options(fmt.grammar(calc(ratios, "82.22"), stops) or "").startswith('root ::= "North Macedonia"')
    # a term that mixes two threads' numbers, a value no term gives, or no max()/min(): no item
    assert chosen_item(calc("max(22442948 / 25333, 2119275 / 267667)", "885.92"), CANONICAL) is None
    assert chosen_item(calc(ratios, "50.5"), CANONICAL) is None
    assert chosen_item(calc("22442948 / 1267000 + 1", "18.71"), CANONICAL) is None
    # max(...) - min(...) is no one call: its "terms" are not read; a parenthesised term is one term
    assert _max_min_terms("max(2082958, 25333) - min(2082958, 25333)") == []
    assert _max_min_terms(" max(1 / 2, (3 / 4), 5) ") == ["1 / 2", "3 / 4", "5"]
    assert chosen_item(calc("max(2082958 / 25333, 1) - min(1, 1)", "82.22"), CANONICAL) is None
    # the merge without tool calls (thread_conclusions) keeps the Result: lines, and so the numbers
    from apr_agents.graph.merge import thread_conclusions

    folded = thread_conclusions([{"label": str(i + 1), "text": thread(i + 1, c).split(":", 1)[1].removesuffix("</Thread>\n")}
                                 for i, c in enumerate(facts)], CANONICAL)
    bare = calc(ratios, "82.22").replace(merged, start + "Items: 3\n<Parallel>\n" + folded + "</Parallel>\n")
    assert "tool_response>North" not in bare
    assert chosen_item(bare, CANONICAL) == "North Macedonia's"  # the outline's own words, as it wrote them


def test_schema_rules() -> None:
    rules = list(JSON_RULES)
    name = schema_rule({"type": "object", "properties": {
        "unit": {"enum": ["km", "mi"]}, "n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": "string"}}, "required": ["unit", "n"]}, "t", rules)
    text = "\n".join(rules)
    assert name == "t"
    assert 't-p0 ::= "\\"km\\"" | "\\"mi\\""' in text
    assert '"\\"unit\\"" ": " t-p0 ", " "\\"n\\"" ": " integer' in text  # required first, in order
    assert '( ", " "\\"note\\"" ": " string )?' in text  # optional ones optional
    assert _char_class(r"^[a-z]+$") == "[a-z]" and _char_class(r"^[^a-z]+$") is None
    assert _char_class(r"^(a|b)$") is None


def test_grammars_parse_in_llama_cpp() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    fmt = ChatMLFormat(QWEN_LIKE)
    start = fmt.render([HumanMessage("q")], TOOLS)
    for stops in (["</tool_call>", "</Outlines>"], ["</tool_call>", "</Thread>"], ["<|im_end|>"]):
        llama_cpp.LlamaGrammar.from_string(fmt.grammar(start, stops), verbose=False)
    for branch in (False, True):
        llama_cpp.LlamaGrammar.from_string(protocol_gbnf(branch=branch, can_spawn=True), verbose=False)
    # the restated question (quotes, a colon) and the outline-named result
    fmt = ChatMLFormat(QWEN_LIKE, restate_question=True, result_names_outline=True)
    start = fmt.render([HumanMessage('Which is larger: "Peru" or Chile?')], TOOLS)
    spawn = start + "Items: 2\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: look up b</Outline>\n</Outlines>\n"
    done = spawn + '<Thread>2: look up b\n<tool_call>\n{"name": "lookup"}\n</tool_call>' + fmt.tool_results(["r"], depth=1)
    merged = spawn + "<Thread>1: x</Thread>\n<Thread>2: y</Thread>\n</Parallel>\n"
    for prompt, stops in ((done, ["</tool_call>", "</Thread>"]), (merged, ["</tool_call>", "<|im_end|>"])):
        gbnf = fmt.grammar(prompt, stops) or ""
        assert "look up b" in gbnf or "Peru" in gbnf
        llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)


def test_catalog_assembles_parts_and_checks_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = [b"GGUF" + bytes(range(200)), b"tail" * 50]
    for i, chunk in enumerate(data, 1):
        pkg = tmp_path / "site" / f"fake_model_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    good = models.ModelSpec(name="fake", title="Fake", file_name="fake.gguf", size=sum(map(len, data)),
                            sha256=hashlib.sha256(b"".join(data)).hexdigest(), extra="fake", prompt_style="chatml",
                            parts=("fake_model_part1", "fake_model_part2"))
    monkeypatch.setitem(models.CATALOG, "fake", good)
    assert models.is_installed(good)
    path = models.model_path("fake", tmp_path / "cache")
    assert path.read_bytes() == b"".join(data) and models.spec_for_path(path) is good
    assert models.model_path("fake", tmp_path / "cache") == path  # verified by its stamp, not re-assembled
    bad = models.ModelSpec(**{**good.__dict__, "name": "bad", "file_name": "bad.gguf", "sha256": "0" * 64})
    monkeypatch.setitem(models.CATALOG, "bad", bad)
    with pytest.raises(BackendUnavailable, match="SHA-256"):
        models.model_path("bad", tmp_path / "cache")
    assert not (tmp_path / "cache" / "bad.gguf").exists()  # no half-written file left
    missing = models.ModelSpec(**{**good.__dict__, "name": "gone", "file_name": "gone.gguf", "parts": ("no_such_part_pkg",)})
    monkeypatch.setitem(models.CATALOG, "gone", missing)
    with pytest.raises(BackendUnavailable, match=r"apr-agents\[fake\]"):
        models.model_path("gone", tmp_path / "cache")
    with pytest.raises(BackendUnavailable, match="unknown model"):
        models.model_path("no-such-model")
    for name in ("fake_model_part1", "fake_model_part2"):
        sys.modules.pop(name, None)
    assert json.dumps(sorted(models.CATALOG))  # the catalog stays serialisable


# -- dialects own their prompting (issue 10) ------------------------------------------------
@pytest.mark.parametrize("name", ["canonical", "multiverse", "apr"])
def test_each_dialect_is_taught_and_constrained_in_its_own_words(name: str) -> None:
    from apr_agents.protocol.dialects import DIALECTS

    dialect = DIALECTS[name]
    fmt = ChatMLFormat(QWEN_LIKE, dialect=dialect)
    prompt = fmt.render([HumanMessage("Population of France and Canada?")], TOOLS)
    others = [d for d in DIALECTS.values() if d.spawn_marker != dialect.spawn_marker]
    assert dialect.example(["look up the first item", "look up the second item"]) in prompt
    assert f"ends with {dialect.thread_close}" in prompt
    assert not any(d.spawn_marker in prompt for d in others)  # no other dialect's spawn point is taught
    root = fmt.grammar(prompt, dialect.stops(branch=False, can_spawn=True))  # first step: call or spawn
    branch = chatml_gbnf(TOOLS, branch=True, can_spawn=False, first_step=False, dialect=dialect)  # after a result
    assert root is not None
    assert json.dumps(dialect.spawn_marker) in root and json.dumps(dialect.thread_close) in branch
    llama_cpp = pytest.importorskip("llama_cpp")
    for gbnf in (root, branch):  # well-formed GBNF for llama.cpp
        llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)


@pytest.mark.parametrize("name", ["canonical", "multiverse", "apr"])
async def test_each_dialect_runs_end_to_end_through_the_chat_template_render_path(name: str) -> None:
    """A spawn written in the dialect the backend's prompt teaches is parsed, run and merged;
    an agent that would parse another dialect is refused at construction."""
    from apr_agents import APRConfig, Completion, create_apr_agent
    from apr_agents.protocol.dialects import DIALECTS

    dialect = DIALECTS[name]
    fmt = ChatMLFormat(QWEN_LIKE, dialect=dialect)
    spawn, close = dialect.example(["France", "Canada"]), dialect.thread_close
    facts = {"1": " France has 68.4 million.", "2": " Canada has 40.1 million."}

    class TemplateBackend:  # a FAKE model over the real backends' render path (ChatMLFormat)
        prompt_dialect = dialect

        def __init__(self) -> None:
            self.prompts: list[str] = []

        def render(self, messages: list, tools: list) -> str:
            return fmt.render(messages, tools)

        async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                           temperature: float = 0.0) -> Completion:
            self.prompts.append(prompt)
            for label, fact in facts.items():
                if prompt.endswith(dialect.branch_suffix(label)):
                    return Completion(text=fact, stop=close, finish_reason="stop")
            if prompt.endswith(ASSISTANT_START):
                return Completion(text="Splitting.\n" + spawn[: -len(dialect.spawn_marker)],
                                  stop=dialect.spawn_marker, finish_reason="stop")
            end = "" if dialect.merge_closes_parallel or not dialect.parallel_close else (
                f"<Conclusion>both found</Conclusion>\n{dialect.parallel_close}\n")  # Multiverse closes it itself
            return Completion(text=end + "Both found: 108.5 million.", stop=None, finish_reason="stop")

    backend = TemplateBackend()
    state = await create_apr_agent(backend, [], APRConfig(dialect=name)).ainvoke(
        {"messages": [HumanMessage("Population of France plus Canada?")]})
    assert state["messages"][-1].content == "Both found: 108.5 million."
    assert state["apr_trace"]["summary"]["branches"] == 2
    merged = backend.prompts[-1]  # the root's last prompt holds both threads, merged in this dialect
    assert dialect.merge_text(list(facts.items())) in merged
    other = next(d for d in DIALECTS if d != name)
    with pytest.raises(ValueError, match=f"prompts the model in the {name!r} dialect"):
        create_apr_agent(backend, [], APRConfig(dialect=other))
