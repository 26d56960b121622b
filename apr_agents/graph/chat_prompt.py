"""The tool-call mode's ``spawn`` tool: what the model reads, its schema, its parsing, its result.

``DEFAULT_CHAT_SYSTEM_PROMPT`` ships as the default; pass ``system_prompt=`` to
``create_chat_apr_agent`` to replace it (``""`` adds none). ``{max_threads}`` in
any system prompt is replaced by the configured limit. ``spawn_tool_schema`` is
bound to the model beside the user's tools; ``parse_spawn_args`` checks what the
model sent (never trusted); ``default_chat_merge`` writes the spawn's result
message; ``render_transcript`` renders a conversation for the trace.

Usage::

    tasks, error, kind = parse_spawn_args({"tasks": ["a", "b"]}, max_threads=4)
    assert tasks == ["a", "b"] and error is None
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

SPAWN_TOOL_NAME = "spawn"

DEFAULT_CHAT_SYSTEM_PROMPT = """\
You are a careful assistant that uses tools and can work on independent sub-tasks in parallel.

Besides your other tools you have a `spawn` tool. Call it as spawn({"tasks": ["<sub-task 1>", "<sub-task 2>", ...]}) \
when the request contains sub-tasks that are independent of each other, meaning none of them needs the result of \
another (for example: find three different facts, compute several separate quantities, check several candidates). \
Each task then runs as its own branch at the same time as the others: a branch sees this conversation and its one \
task, may use tools, and ends with a short result. When every branch is done, `spawn` returns all results in the \
order of your tasks, and you continue: combine them into your answer.

Do not spawn when:
- the steps depend on each other (step 2 needs what step 1 finds): do them one after another yourself;
- there is only one task, or it takes one quick tool call;
- calling several tools at once in one message is enough (those calls already run concurrently).

Write each task so it stands alone: say exactly what to find or compute and what to return. Use at most \
{max_threads} tasks per spawn call, and at most one spawn call per message. When you are given a single sub-task, \
work on that sub-task only and finish with its result."""

SPAWN_TOOL_DESCRIPTION = (
    "Run independent sub-tasks in parallel. Each task becomes a branch that sees this conversation plus its task, "
    "may use tools, and returns a result; all results come back together, in task order. Only for sub-tasks that "
    "do not depend on each other."
)

SPAWN_TASKS_DESCRIPTION = "Self-contained descriptions of the independent sub-tasks, one string each."


def spawn_ack(n: int) -> str:
    """The spawn call's answer inside a branch: identical in all branches, so they share a prefix."""
    return f"Started {n} parallel branches; this conversation is one of them and works on one sub-task only."


def branch_task_message(index: int, n: int, task: str, *, can_spawn: bool) -> str:
    """The message that gives a branch its sub-task (``index`` counts from 1)."""
    text = (
        f"Sub-task {index} of {n}: {task}\n\n"
        "Work on this sub-task only; the other sub-tasks are handled separately. "
        "Use tools if they help, then reply with the result of this sub-task."
    )
    if not can_spawn:
        text += " Do not call spawn here: do this sub-task yourself."
    return text


def format_system_prompt(template: str, max_threads: int) -> str:
    return template.replace("{max_threads}", str(max_threads))


Task = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class SpawnArgs(BaseModel):
    """Arguments of the ``spawn`` tool: checked here, never trusted from the model."""

    model_config = ConfigDict(extra="ignore")

    tasks: list[Task] = Field(min_length=1, description=SPAWN_TASKS_DESCRIPTION)


def spawn_tool_schema(max_threads: int) -> dict[str, Any]:
    """The OpenAI-format schema bound to the model (``maxItems`` is the per-spawn limit)."""
    return {
        "type": "function",
        "function": {
            "name": SPAWN_TOOL_NAME,
            "description": SPAWN_TOOL_DESCRIPTION,
            "parameters": {
                "type": "object",
                "properties": {
                    "tasks": {
                        "type": "array",
                        "description": SPAWN_TASKS_DESCRIPTION,
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": max_threads,
                    }
                },
                "required": ["tasks"],
            },
        },
    }


def parse_spawn_args(args: Any, max_threads: int) -> tuple[list[str] | None, str | None, str | None]:
    """``(tasks, None, None)`` or ``(None, error text for the model, "invalid_spawn" | "max_threads")``."""
    usage = (f'spawn takes {{"tasks": ["<sub-task 1>", "<sub-task 2>", ...]}}: a list of 1 to {max_threads} '
             "non-empty strings")
    if isinstance(args, Mapping) and isinstance(args.get("tasks"), list) and len(args["tasks"]) > max_threads:
        n = len(args["tasks"])
        return None, (f"error: spawn accepts at most {max_threads} tasks per call; got {n}. Nothing was run. "
                      "Spawn fewer, broader sub-tasks (or do some yourself)."), "max_threads"
    try:
        parsed = SpawnArgs.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors()[:3])
        more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
        return None, f"error: invalid spawn call: {problems}{more}. Nothing was run. {usage}.", "invalid_spawn"
    return parsed.tasks, None, None


def default_chat_merge(results: list[dict[str, Any]], dialect: Any = None) -> str:
    """The spawn tool's result: every branch's final message, in task order."""
    parts = [f"Results of {len(results)} sub-task{'s' if len(results) != 1 else ''}, in task order:"]
    for r in results:
        head = f"[{r['label']}] {r['outline']}"
        body = r["text"].strip() or "(no result)"
        if r["end"] not in ("thread_end", "eos"):
            body += f"\n(this branch ended early: {r['end']}; the result may be incomplete)"
        parts.append(f"{head}\n{body}")
    return "\n\n".join(parts)


def render_transcript(messages: Sequence[BaseMessage]) -> str:
    """A readable, JSON-friendly rendering of a conversation for the trace."""
    lines = []
    for m in messages:
        text = m.text if isinstance(m.text, str) else str(m.content)
        if isinstance(m, ToolMessage):
            lines.append(f"[tool {m.name or ''} {m.tool_call_id}] {text}")
            continue
        lines.append(f"[{m.type}] {text}")
        if isinstance(m, AIMessage):
            for c in m.tool_calls:
                lines.append(f"  -> {c['name']}({json.dumps(c['args'], ensure_ascii=False)}) [{c['id']}]")
            for c in m.invalid_tool_calls:
                lines.append(f"  -> {c.get('name')}(<invalid> {c.get('args')!r}) [{c.get('id')}]")
    return "\n".join(lines)
