"""Prompts for models without a chat template of their own (base models).

``render_fewshot`` teaches a base model the canonical dialect (SPEC §2) and
Hermes-style tool calls by example. It was tuned on Gemma 3 270M base (greedy
probes, see docs/engines.md): turns are framed with Gemma's ``<start_of_turn>``
tokens, with which it wrote well-formed spawn blocks and tool calls (with plain
``Question:``/``Answer:`` markers it answered in prose and rambled on). A model
turn ends with the plain text ``<end>``: the base model never learnt to emit
its ``<end_of_turn>`` token (it wrote a junk token there instead), but it does
copy ``<end>``, which backends treat as end of sequence (``FEWSHOT_END_STOPS``).

The layout is short on purpose (about 560 Gemma tokens with the three demo tools):
an instruction, the tool list, two worked examples (one plain tool call, one
spawn of two branches that each call a tool and a merge followed by a sequential
call), then the conversation, ending where the model starts writing.

``render_chat_template`` is for instruction-tuned models that have a Jinja chat
template: it adds the protocol instruction as a system message and lets the
template lay out the turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage

TURN_USER = "<start_of_turn>user\n"
TURN_MODEL = "<start_of_turn>model\n"
TURN_END = "<end_of_turn>"
ANSWER_END = "<end>"

#: Text that means "the model's turn is over" in a few-shot prompt. A backend that
#: renders with ``render_fewshot`` adds these to its stop strings and reports a hit
#: as end of sequence (finish_reason "eos", stop None): a base model that writes
#: ``<end>`` or opens a new turn is done with its own.
FEWSHOT_END_STOPS: tuple[str, ...] = (ANSWER_END, TURN_END, TURN_USER.rstrip("\n"))

#: Two demo tools as short OpenAI schemas: the prompts the engine tests and the vLLM
#: measurement render, so their greedy outputs are comparable run to run.
PROBE_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                    "required": ["expression"]}}},
    {"type": "function", "function": {"name": "lookup", "description": "Facts about a country or city.",
     "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}}},
]

INSTRUCTION = (
    "An assistant answers questions. It calls a tool by writing "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>; the result comes back in '
    "<tool_response>. When a question has independent parts, it splits them into parallel "
    "threads: <Parallel>, an <Outlines> list of one <Outline> per part, then one <Thread> per "
    "outline, then </Parallel>, then the answer."
)


def _call(name: str, **arguments: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


#: The default worked examples (they use the demo tools ``lookup`` and ``calculator``).
#: The plain one comes first: in a small probe (six questions, greedy) Gemma 270M
#: chose spawn/no-spawn and filled branches best with the spawn example last.
EXAMPLES = (
    f"{TURN_USER}What is 12 * 7?{TURN_END}\n"
    f"{TURN_MODEL}{_call('calculator', expression='12 * 7')}\n"
    "<tool_response>84</tool_response>\n"
    f"12 * 7 is 84.{ANSWER_END}\n"
    f"{TURN_USER}What is the population of Japan plus the population of Kenya, in millions?{TURN_END}\n"
    f"{TURN_MODEL}<Parallel>\n"
    "<Outlines>\n"
    "<Outline>1: lookup Japan</Outline>\n"
    "<Outline>2: lookup Kenya</Outline>\n"
    "</Outlines>\n"
    f"<Thread>1: Japan. {_call('lookup', topic='Japan')}\n"
    "<tool_response>Japan: capital: Tokyo; population_millions: 124.5</tool_response>\n"
    "Japan has 124.5 million people.</Thread>\n"
    f"<Thread>2: Kenya. {_call('lookup', topic='Kenya')}\n"
    "<tool_response>Kenya: capital: Nairobi; population_millions: 55.1</tool_response>\n"
    "Kenya has 55.1 million people.</Thread>\n"
    "</Parallel>\n"
    f"{_call('calculator', expression='124.5 + 55.1')}\n"
    "<tool_response>179.6</tool_response>\n"
    f"Together they have 179.6 million people.{ANSWER_END}\n"
)

_JSON_TYPES = {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean",
               "array": "array", "object": "object"}


def tool_signature(tool: dict[str, Any]) -> str:
    """``- name(arg: type, ...): description`` for an OpenAI-style tool schema."""
    fn = tool.get("function", tool)
    name = fn.get("name", "?")
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or props)
    args = []
    for arg, schema in props.items():
        typ = schema.get("type") if isinstance(schema, dict) else None
        if isinstance(typ, list):
            typ = "|".join(str(t) for t in typ)
        typ = _JSON_TYPES.get(str(typ), str(typ or "any"))
        args.append(f"{arg}: {typ}" + ("" if arg in required else "?"))
    desc = " ".join(str(fn.get("description") or "").split())
    if len(desc) > 160:
        desc = desc[:157] + "..."
    return f"- {name}({', '.join(args)})" + (f": {desc}" if desc else "")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # LangChain content blocks
        return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in content
                       if isinstance(b, str) or b.get("type") == "text")
    return str(content)


def _ai_text(m: AIMessage) -> str:
    text = _text(m.content)
    for call in m.tool_calls or []:
        sep = "" if not text or text.endswith("\n") else "\n"
        text += sep + _call(call["name"], **(call.get("args") or {}))
    return text


def render_fewshot(
    messages: Sequence[BaseMessage],
    tools: Sequence[dict[str, Any]] = (),
    *,
    examples: str | None = None,
    instruction: str = INSTRUCTION,
) -> str:
    """The whole prompt for a base model, ending where the assistant starts writing.

    ``examples`` replaces the default worked examples (``""`` drops them); write
    them like ``EXAMPLES``: ``TURN_USER`` question ``TURN_END``, then ``TURN_MODEL``
    answer ``ANSWER_END``.
    System messages join the instruction. An ``AIMessage``'s tool calls are written
    as ``<tool_call>`` lines and the ``ToolMessage`` results as ``<tool_response>``
    in the same model turn; when the conversation ends with tool results the model
    turn is left open so the model goes on from them.
    """
    head = [instruction]
    for m in messages:
        if isinstance(m, SystemMessage):
            head.append(_text(m.content).strip())
    out = ["\n\n".join(h for h in head if h), "\n\n"]
    if tools:
        out.append("Tools:\n" + "\n".join(tool_signature(t) for t in tools) + "\n\n")
    out.append(EXAMPLES if examples is None else examples)

    in_model_turn = False
    for m in messages:
        if isinstance(m, SystemMessage):
            continue
        if isinstance(m, ToolMessage):
            if not in_model_turn:
                out.append(TURN_MODEL)
                in_model_turn = True
            out.append(f"<tool_response>{_text(m.content)}</tool_response>\n")
            continue
        if in_model_turn:
            out.append(f"{ANSWER_END}\n")
            in_model_turn = False
        if isinstance(m, AIMessage):
            text = _ai_text(m)
            if m.tool_calls:  # results follow: keep the turn open
                out.append(f"{TURN_MODEL}{text}\n")
                in_model_turn = True
            else:
                out.append(f"{TURN_MODEL}{text}{ANSWER_END}\n")
        else:  # HumanMessage and any other role speak as the user
            out.append(f"{TURN_USER}{_text(m.content)}{TURN_END}\n")
    if not in_model_turn:
        out.append(TURN_MODEL)
    return "".join(out)


def render_chat_template(
    template: str | Callable[..., str],
    messages: Sequence[BaseMessage],
    tools: Sequence[dict[str, Any]] = (),
    *,
    bos_token: str = "",
    eos_token: str = "",
    instruction: str = INSTRUCTION,
) -> str:
    """Render with a model's own Jinja chat template (instruction-tuned models).

    The protocol instruction and the tool list go into a leading system message;
    the template also receives ``tools`` so templates with native tool sections
    (Qwen, Hermes) lay them out their own way. ``template`` may also be a callable
    ``f(messages=[{"role", "content"}], tools=..., add_generation_prompt=True)``
    such as a Hugging Face tokenizer's ``apply_chat_template`` (with
    ``tokenize=False`` bound).
    """
    system = [instruction]
    if tools:
        system.append("Tools:\n" + "\n".join(tool_signature(t) for t in tools))
    chat = chat_dicts(messages, system, wrap_tool_results=True)
    return apply_template(template, chat, tools, bos_token=bos_token, eos_token=eos_token)


def chat_dicts(messages: Sequence[BaseMessage], system: list[str], *,
               wrap_tool_results: bool) -> list[dict[str, Any]]:
    """Messages as template dicts, the system texts (and system messages) joined into the first.

    ``wrap_tool_results`` writes a tool result as ``<tool_response>...</tool_response>``
    (for templates that do not wrap tool turns themselves).
    """
    system = list(system)
    chat: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            system.append(_text(m.content).strip())
        elif isinstance(m, AIMessage):
            chat.append({"role": "assistant", "content": _ai_text(m)})
        elif isinstance(m, ToolMessage):
            text = _text(m.content)
            chat.append({"role": "tool", "content": f"<tool_response>{text}</tool_response>" if wrap_tool_results
                         else text})
        else:  # HumanMessage and any other role speak as the user
            chat.append({"role": "user", "content": _text(m.content)})
    chat.insert(0, {"role": "system", "content": "\n\n".join(s for s in system if s)})
    return chat


def apply_template(template: str | Callable[..., str], chat: list[dict[str, Any]],
                   tools: Sequence[dict[str, Any]], *, bos_token: str = "", eos_token: str = "") -> str:
    """Render template dicts with a Jinja chat template (sandboxed) or a callable one."""
    if callable(template):
        return template(messages=chat, tools=list(tools) or None, add_generation_prompt=True)
    import jinja2.sandbox  # a dependency of llama-cpp-python and of transformers

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=chat, tools=list(tools) or None, add_generation_prompt=True,
        bos_token=bos_token, eos_token=eos_token,
    )

__all__ = ["ANSWER_END", "EXAMPLES", "FEWSHOT_END_STOPS", "INSTRUCTION", "TURN_END", "TURN_MODEL", "TURN_USER",
           "apply_template", "chat_dicts", "render_chat_template", "render_fewshot", "tool_signature"]
