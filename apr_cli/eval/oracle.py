"""A FAKE model for the eval's own tests and ``--backend scripted``: it plays a perfect agent.

Nothing here is a model. ``OracleBackend`` is a ``ScriptedBackend`` that knows
the question set: for each question it writes the tool calls of the question's
``plan`` (one branch per part when the question has several, in the text
protocol; a ``spawn`` call, one call per turn or all calls at once in chat
mode), then the ``followup`` calls, then the reference answer, but only once
every tool result it needs is in its prompt (otherwise it says it does not
know). So a run proves that the harness, the agents and the tools work end to
end, and grading gives 100 % exactly when every tool result came back.

It tells the two ways it is driven apart by the stop strings: the chat adapter
(``BackendChatModel``) stops at ``<tool_response>``, the text runtime never does.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from apr_agents.backends.base import Completion
from apr_agents.testing import Rule, ScriptedBackend

from .questions import Question

SPAWN = "spawn"


def _call(step: dict[str, Any]) -> str:
    return "<tool_call>" + json.dumps({"name": step["tool"], "arguments": step["args"]}) + "</tool_call>"


def _desc(step: dict[str, Any]) -> str:
    return f"{step['tool']} " + ", ".join(str(v) for v in step["args"].values())


class OracleBackend(ScriptedBackend):
    """FAKE (tests and ``--backend scripted`` only): answers the given questions by their plans."""

    def __init__(self, questions: Sequence[Question], **kwargs: Any) -> None:
        self.questions = sorted(questions, key=lambda q: -len(q.question))
        self._chat = False
        rules = [Rule(self._root, path="")]
        rules += [Rule(self._branch(i), path=str(i)) for i in range(1, 17)]
        super().__init__(rules, **kwargs)

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        # Set right before the parent's generator computes its reply (no await in between).
        self._chat = "<tool_response>" in stop
        async for item in super().stream(prompt, stop=stop, max_tokens=max_tokens, temperature=temperature):
            yield item

    def question_in(self, prompt: str) -> Question | None:
        return next((q for q in self.questions if q.question in prompt), None)

    @staticmethod
    def _answer(q: Question, results: int) -> str:
        if results >= len(q.plan) + len(q.followup):
            return f" The answer is {q.answer}."
        return f" I could not find the answer ({results} tool results)."

    # -- text protocol ---------------------------------------------------------------
    def _root(self, prompt: str) -> str:
        q = self.question_in(prompt)
        if q is None:
            return "I do not know this question."
        if self._chat:
            return self._chat_turn(prompt, q)
        results = prompt.count("<tool_response>")
        follow = "".join(f"\n{_call(s)}" for s in q.followup)
        if len(q.plan) >= 2:
            outlines = "".join(f"<Outline>{i}: {_desc(s)}</Outline>\n" for i, s in enumerate(q.plan, 1))
            return (f"The parts are independent.\n<Parallel>\n<Outlines>\n{outlines}</Outlines>\n{follow}"
                    + self._answer(q, results))
        calls = "".join(_call(s) for s in q.plan)
        return calls + follow + self._answer(q, results)

    def _branch(self, index: int) -> Any:
        def reply(prompt: str) -> str:
            q = self.question_in(prompt)
            if q is None or index > len(q.plan):
                return " nothing to do.</Thread>"
            return f" {_call(q.plan[index - 1])} Found it.</Thread>"

        return reply

    # -- chat (tool-call) mode ----------------------------------------------------------
    def _chat_turn(self, prompt: str, q: Question) -> str:
        tools_line = prompt.split("### Tools\n", 1)[1].split("\n", 1)[0] if "### Tools\n" in prompt else ""
        can_spawn = SPAWN in [t.strip() for t in tools_line.split(",")]
        last_user = prompt.rfind("### User\n")
        task = re.match(r"Sub-task (\d+) of (\d+):", prompt[last_user + len("### User\n"):])
        if task:  # a branch of a spawn: its one part
            index = int(task.group(1))
            if "### Tool\n" in prompt[last_user:]:
                return "Result: " + prompt[last_user:].rsplit("### Tool\n", 1)[1].split("\n###", 1)[0].strip()
            return _call(q.plan[index - 1]) if index <= len(q.plan) else "Result: nothing."
        done = prompt[prompt.find(q.question):].count("### Tool\n")
        if can_spawn and len(q.plan) >= 2:
            if done == 0:
                tasks = [_desc(s) for s in q.plan]
                return _call({"tool": SPAWN, "args": {"tasks": tasks}})
            merged = prompt[prompt.find(q.question):].split("### Tool\n", 2)[1]
            got = merged.count("Result: ") + done - 1
            steps, done_steps = q.followup, done - 1
            results = got
        else:
            steps, done_steps = [*q.plan, *q.followup], done
            results = done
        if done_steps < len(steps):
            first = done_steps
            last = len(q.plan) if first < len(q.plan) and steps is not q.followup else first + 1
            return "".join(_call(s) for s in steps[first:last])
        return self._answer(q, results).strip()


__all__ = ["OracleBackend"]
