"""Texts of the tool-call mode: the system prompt that teaches spawning, and what branches read.

``DEFAULT_CHAT_SYSTEM_PROMPT`` ships as the default; pass ``system_prompt=`` to
``create_chat_apr_agent`` to replace it (``""`` adds none). ``{max_threads}`` in
any system prompt is replaced by the configured limit.
"""

from __future__ import annotations

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
