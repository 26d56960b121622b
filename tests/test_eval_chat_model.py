"""BackendChatModel: a LangChain chat model over any apr backend, tested with the FAKE ScriptedBackend."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from apr_agents.backends.base import Completion
from apr_agents.backends.chat_model import CHAT_INSTRUCTION, BackendChatModel, parse_hermes
from apr_agents.testing import ScriptedBackend
from apr_tools import calculator


def call(name: str, **args: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def test_parse_hermes_calls_and_content() -> None:
    text = f"Let me look.\n{call('calculator', expression='2+2')}\n{call('lookup', topic='France')}"
    msg = parse_hermes(text)
    assert msg.content == "Let me look."
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [
        ("calculator", {"expression": "2+2"}), ("lookup", {"topic": "France"})]
    assert all(c["id"].startswith("call_") for c in msg.tool_calls)
    assert len({c["id"] for c in msg.tool_calls}) == 2


def test_parse_hermes_bad_calls_are_invalid_not_lost() -> None:
    text = "<tool_call>{not json}</tool_call>" + call("nope", x=1) + call("calculator", expression="1")
    msg = parse_hermes(text, known_tools={"calculator"})
    assert [c["name"] for c in msg.tool_calls] == ["calculator"]
    errors = [c["error"] for c in msg.invalid_tool_calls]
    assert len(errors) == 2
    assert "not valid JSON" in errors[0]
    assert "unknown tool 'nope'" in errors[1]


def test_parse_hermes_unclosed_call_and_string_arguments() -> None:
    msg = parse_hermes('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"3*3\\"}"}')
    assert msg.tool_calls[0]["args"] == {"expression": "3*3"}
    assert msg.content == ""


def test_parse_hermes_single_keeps_the_first_call() -> None:
    msg = parse_hermes(call("a", x=1) + call("b", x=2), single=True)
    assert [c["name"] for c in msg.tool_calls] == ["a"]
    assert msg.response_metadata["dropped_tool_calls"] == 1


async def test_bound_tools_reach_the_prompt_and_calls_come_back() -> None:
    backend = ScriptedBackend({"": "I will compute. " + call("calculator", expression="6*7")})
    model = BackendChatModel(backend=backend).bind_tools([calculator])
    msg = await model.ainvoke([HumanMessage("What is 6*7?")])
    assert isinstance(msg, AIMessage)
    assert msg.tool_calls[0]["name"] == "calculator"
    assert msg.tool_calls[0]["args"] == {"expression": "6*7"}
    assert msg.content == "I will compute."
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert msg.usage_metadata is not None and msg.usage_metadata["output_tokens"] > 0
    assert "### Tools\ncalculator" in backend.prompts[-1]
    assert "What is 6*7?" in backend.prompts[-1]


async def test_tool_results_are_rendered_and_answer_has_no_calls() -> None:
    def reply(prompt: str) -> str:
        return "It is 42." if "### Tool\n42" in prompt else call("calculator", expression="6*7")

    backend = ScriptedBackend(reply)
    model = BackendChatModel(backend=backend).bind_tools([calculator])
    first = await model.ainvoke([HumanMessage("6*7?")])
    history: list[BaseMessage] = [HumanMessage("6*7?"), first,
                                  ToolMessage("42", tool_call_id=first.tool_calls[0]["id"])]
    second = await model.ainvoke(history)
    assert second.tool_calls == []
    assert second.content == "It is 42."
    assert second.response_metadata["finish_reason"] == "eos"


async def test_one_call_per_turn_stops_at_the_first_call() -> None:
    backend = ScriptedBackend({"": call("calculator", expression="1+1") + call("calculator", expression="2+2")})
    model = BackendChatModel(backend=backend, parallel_tool_calls=False).bind_tools([calculator])
    msg = await model.ainvoke([HumanMessage("two sums")])
    assert [c["args"]["expression"] for c in msg.tool_calls] == ["1+1"]
    assert "at most one tool call" in backend.prompts[-1]
    # The same model bound with parallel_tool_calls=True gets both.
    both = await BackendChatModel(backend=backend).bind_tools([calculator], parallel_tool_calls=True).ainvoke(
        [HumanMessage("two sums")])
    assert len(both.tool_calls) == 2


async def test_sync_invoke_inside_and_outside_a_loop() -> None:
    backend = ScriptedBackend({"": "plain answer"})
    model = BackendChatModel(backend=backend)
    assert model.invoke([HumanMessage("hi")]).content == "plain answer"  # a loop is running: worker thread


def test_sync_invoke_without_a_loop() -> None:
    model = BackendChatModel(backend=ScriptedBackend({"": "plain answer"}))
    assert model.invoke("hi").content == "plain answer"


def test_instruction_goes_to_a_render_that_accepts_it() -> None:
    seen: dict[str, Any] = {}

    class Backend:  # FAKE: records what render gets
        def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]], *, instruction: str = "") -> str:
            seen["instruction"] = instruction
            return "prompt"

        async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                           temperature: float = 0.0) -> Completion:
            seen["stop"] = stop
            return Completion(text="ok", finish_reason="eos", prompt_tokens=1, completion_tokens=1)

    assert BackendChatModel(backend=Backend()).invoke("hi").content == "ok"
    assert seen["instruction"] == CHAT_INSTRUCTION
    assert "<tool_response>" in seen["stop"] and "<|im_end|>" in seen["stop"]


def test_rejects_an_object_that_is_no_backend() -> None:
    with pytest.raises((TypeError, ValueError), match="not an apr_agents backend"):
        BackendChatModel(backend=object())


@pytest.mark.engine
def test_llamacpp_render_takes_the_chat_instruction() -> None:
    """The chat adapter's instruction replaces the text protocol's in a real backend's prompt (Gemma 270M)."""
    pytest.importorskip("llama_cpp")
    from apr_agents.backends import BackendUnavailable
    from apr_agents.backends.llamacpp import LlamaCppBackend
    from apr_agents.backends.prompting import INSTRUCTION

    try:
        backend = LlamaCppBackend(n_ctx=1024)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    with backend:
        msgs = [HumanMessage("hi")]
        assert INSTRUCTION in backend.render(msgs, [])
        prompt = backend.render(msgs, [], instruction=CHAT_INSTRUCTION)
        assert CHAT_INSTRUCTION in prompt and INSTRUCTION not in prompt


# Two replies Qwen2.5-Coder-1.5B wrote in chat mode (apr eval smoke run): no <tool_call> tags.
FENCED = ('I\'ll use:\n```json\n{\n  "name": "country_facts",\n  "arguments": {\n    "country": "Equatorial Guinea"\n'
          '  }\n}\n```')
DOUBLED = ('I\'ll use:\n<tools>\n{"function": {"name": "country_facts"}, "type": "function"}\n</tools>\n'
           '{{"name": "country_facts", "arguments": {"country": "The Netherlands"}}}\n'
           '{{"name": "country_facts", "arguments": {"country": "Pakistan"}}}}\nThe combined')


def test_lenient_parsing_reads_untagged_json_calls_only_when_asked() -> None:
    known = {"country_facts"}
    assert parse_hermes(FENCED, known_tools=known).tool_calls == []
    fenced = parse_hermes(FENCED, known_tools=known, lenient=True)
    assert [c["args"] for c in fenced.tool_calls] == [{"country": "Equatorial Guinea"}]
    assert fenced.content == "I'll use:" and fenced.response_metadata["lenient_tool_calls"] == 1
    doubled = parse_hermes(DOUBLED, known_tools=known, lenient=True)
    assert [c["args"]["country"] for c in doubled.tool_calls] == ["The Netherlands", "Pakistan"]
    assert len(parse_hermes(DOUBLED, known_tools=known, lenient=True, single=True).tool_calls) == 1
    # A JSON object naming no bound tool (the schema echoed back) is not a call.
    assert parse_hermes('{"name": "other", "arguments": {}}', known_tools=known, lenient=True).tool_calls == []


async def test_lenient_model_field() -> None:
    backend = ScriptedBackend({"": FENCED.replace("country_facts", "calculator").replace(
        '"country": "Equatorial Guinea"', '"expression": "1+1"')})
    model = BackendChatModel(backend=backend, lenient_tool_calls=True).bind_tools([calculator])
    msg = await model.ainvoke([HumanMessage("1+1?")])
    assert msg.tool_calls[0]["args"] == {"expression": "1+1"}
