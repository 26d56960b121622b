"""The few-shot prompt for base models and the chat-template render (no engine needed)."""

from __future__ import annotations

import json

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from apr_agents.backends.prompting import (
    ANSWER_END,
    EXAMPLES,
    FEWSHOT_END_STOPS,
    TURN_MODEL,
    TURN_USER,
    render_chat_template,
    render_fewshot,
    tool_signature,
)
from apr_agents.protocol.dialects import CANONICAL
from apr_agents.protocol.parser import Repair, Spawn, StreamParser, ToolCall

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression such as '(3 + 4) * 2'.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
ECHO = {"type": "function", "function": {
    "name": "sleep_then_echo", "description": "Wait, then echo.",
    "parameters": {"type": "object", "properties": {"seconds": {"type": "number"}, "text": {"type": "string"},
                                                    "loud": {"type": "boolean"}},
                   "required": ["seconds", "text"]}}}


def test_prompt_ends_where_the_model_writes_and_lists_tools():
    p = render_fewshot([SystemMessage("Be brief."), HumanMessage("What is 2 + 2?")], [CALC, ECHO])
    assert p.endswith(f"{TURN_USER}What is 2 + 2?<end_of_turn>\n{TURN_MODEL}")
    assert "- calculator(expression: string): Evaluate an arithmetic expression" in p
    assert "- sleep_then_echo(seconds: number, text: string, loud: boolean?): Wait, then echo." in p
    assert "Be brief." in p.split(TURN_USER)[0]  # the system message joins the instruction
    assert p.count(TURN_MODEL) == 3  # two examples + the open turn


def test_the_examples_are_well_formed_protocol():
    events = list(StreamParser(CANONICAL).feed(EXAMPLES))
    spawns = [e for e in events if isinstance(e, Spawn)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(spawns) == 1 and [o.label for o in spawns[0].outlines] == ["1", "2"]
    assert len(calls) == 4
    assert not [e for e in events if isinstance(e, Repair)]
    for block in EXAMPLES.split("<tool_call>")[1:]:
        body = json.loads(block.split("</tool_call>")[0])
        assert set(body) == {"name", "arguments"}
    # every example answer ends with the marker the backends treat as end of sequence
    assert EXAMPLES.count(ANSWER_END) == 2 and ANSWER_END in FEWSHOT_END_STOPS


def test_history_with_tool_calls_leaves_the_turn_open_after_results():
    msgs = [
        HumanMessage("What is 12 * 7?"),
        AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "12 * 7"}, "id": "c1"}]),
        ToolMessage("84", tool_call_id="c1"),
    ]
    p = render_fewshot(msgs, [CALC], examples="")
    tail = p.split(f"{TURN_USER}What is 12 * 7?<end_of_turn>\n", 1)[1]
    assert tail == (f'{TURN_MODEL}<tool_call>{{"name": "calculator", "arguments": {{"expression": "12 * 7"}}}}'
                    "</tool_call>\n<tool_response>84</tool_response>\n")
    # a finished exchange is closed, and the next question opens a new model turn
    p2 = render_fewshot([*msgs, AIMessage("84."), HumanMessage("And 6 * 7?")], [CALC], examples="")
    assert f"<tool_response>84</tool_response>\n{ANSWER_END}\n{TURN_MODEL}84.{ANSWER_END}\n" in p2
    assert p2.endswith(f"{TURN_USER}And 6 * 7?<end_of_turn>\n{TURN_MODEL}")


def test_tool_signature_of_a_bare_schema():
    assert tool_signature({"name": "ping", "parameters": {}}) == "- ping()"


def test_chat_template_render_puts_the_protocol_in_a_system_turn():
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    p = render_chat_template(template, [SystemMessage("Be brief."), HumanMessage("Hi")], [CALC])
    assert p.startswith("<|system|>An assistant answers questions.")
    assert "- calculator(expression: string)" in p and "Be brief." in p
    assert p.endswith("<|user|>Hi\n<|assistant|>")
