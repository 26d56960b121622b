"""Eager spawn (``APRConfig(spawn_at="outline")``): branch i starts as soon as outline i closes.

By default (ThreadWeaver's ``spawn_at="outlines"``) a context stops at the spawn point, after
its last outline, and every branch starts then, each as a ``Send``. With ``spawn_at="outline"``
the text mode also stops at each ``</Outline>``: the branch of that outline starts at once, as
an asyncio task running the branch's steps (``BranchRunner.run_branch``), while the parent's model writes the
next outline. At the spawn point the parent waits for all of them, merges their threads in
outline order (as the ``merge`` node would) and goes on, all in the same ``generate`` step.

What a branch sees differs from the default: its prompt is the parent's text up to and
including *its own* outline, then ``\\n<Thread>i:`` (the later outlines do not exist yet).
What the merge writes is the same: the spawn point, then each thread in outline order. The
limits hold as they do by default (``max_threads`` per spawn, ``max_total_threads`` per run,
deadlines, ``max_depth``). A branch started eagerly runs within the parent's step, its steps
called directly (not as tasks), so a crash re-runs the spawn's branches on resume.

Usage::

    graph = create_apr_agent(backend, tools, APRConfig(spawn_at="outline"))
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import RunnableConfig

from .core import emit, gather_or_cancel, prompt_of, spawned_in

if TYPE_CHECKING:
    from .agent import _Agent


class EagerSpawn:
    """The branches of one spawn of one context, started one by one as their outlines close."""

    def __init__(self, agent: _Agent, ctx: dict[str, Any], base: str, trace: dict[str, Any] | None,
                 config: RunnableConfig) -> None:
        self.agent, self.ctx, self.base, self.config = agent, ctx, base, config
        self.spawn_no = ctx["spawns"] + 1
        self.started: list[tuple[int, asyncio.Future[dict[str, Any]]]] = []  # (outline index, branch task)
        self.seen = 0  # outlines considered so far (started or refused)
        self.full = False  # a limit stopped further starts
        # after a restart the in-process budget is empty: seed it from what the checkpointed state knows
        self.budget_seed = ctx.get("budget_seed", 0) + spawned_in(trace, ctx)

    def start(self, outlines: Sequence[tuple[str, str]], limits: list[dict[str, Any]]) -> None:
        """Start a branch for each outline not seen yet, within the spawn's and the run's limits."""
        agent, ctx, cfg = self.agent, self.ctx, self.agent.config
        for index in range(self.seen, len(outlines)):
            self.seen += 1
            if self.full:
                continue
            label, text = outlines[index]
            if index >= cfg.max_threads:
                limits.append(agent._limit(ctx, "max_threads",
                                           f"more than {cfg.max_threads} outlines; kept the first {cfg.max_threads}"))
                self.full = True
                continue
            if agent.budget.reserve(ctx["run"], 1, cfg.max_total_threads, seed=self.budget_seed) < 1:
                limits.append(agent._limit(ctx, "max_total_threads",
                                           f"{cfg.max_total_threads} branches per run; outline {label} not run"))
                self.full = True
                continue
            prefix = prompt_of(ctx, self.base)  # up to this outline's close
            spec = agent.child_spec(ctx, self.spawn_no, index, label, text, prefix,
                                    "\n" + agent.dialect.branch_suffix(label))
            spec.pop("index")
            emit({"apr": "spawn", "ctx": ctx["id"], "outlines": [[label, text]], "eager": True})
            task = asyncio.ensure_future(agent.run_branch(spec, self.config, tasks=False))
            self.started.append((index, task))

    async def finish(self) -> tuple[list[str], dict[str, Any]] | None:
        """At the spawn point: wait for every branch, write the merged threads into the parent's
        text; ``(branch ids, their traces)``, or ``None`` when no branch ran."""
        agent, ctx = self.agent, self.ctx
        ctx["text"] += agent.dialect.spawn_suffix()
        if not self.started:  # no outline, or every outline refused by a limit: the model goes on
            return None
        outs = await gather_or_cancel([task for _, task in self.started])
        collected = agent._collect([(out, index) for out, (index, _) in zip(outs, self.started, strict=True)])
        results = sorted(collected["apr_branch_results"], key=lambda r: r["index"])
        ctx["text"] += agent.merged_text(results)
        ctx["spawns"] = self.spawn_no
        ids = [r["id"] for r in results]
        emit({"apr": "merge", "ctx": ctx["id"], "children": ids})
        return ids, collected["apr_trace"]

    async def cancel(self) -> None:
        """The parent's step failed or was cancelled: stop every branch it started."""
        for _, task in self.started:
            task.cancel()
        await asyncio.gather(*(task for _, task in self.started), return_exceptions=True)
