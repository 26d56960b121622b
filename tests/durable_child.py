"""Child process of tests/test_checkpoint.py: one APR run on a SQLite checkpoint file.

    python tests/durable_child.py DB WORKDIR THREAD_ID [--resume] [--sequential]

The root spawns four branches; each calls the ``work`` tool once. Branches 1
and 2 finish at once; branches 3 and 4 block in their tool until the file
``WORKDIR/gate`` exists (the first process never sees it: the test kills it
there). With ``--sequential`` (``APRConfig(parallel=False)``) the four
branches run one after another inside one ``branch`` node. After the merge the root spawns two more branches, which the run's
thread budget (``max_total_threads=5``) cuts to one, also after a restart.

Every backend call appends ``<pid> <context path>`` to ``WORKDIR/calls.log``;
every tool call appends ``<pid> start|end <tag>`` to ``WORKDIR/tools.log``.
On success the final answer, transcript and trace go to stdout as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from langchain_core.tools import tool

from apr_agents import APRConfig, create_apr_agent
from apr_agents.backends import Completion
from apr_agents.graph.durable import run_with_checkpoint
from apr_agents.testing import ScriptedBackend

WORK = Path(sys.argv[2])


def _log(name: str, line: str) -> None:
    with open(WORK / name, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


@tool
async def work(tag: str, block: bool = False) -> str:
    """Do the work of one branch; a blocking call waits for the gate file."""
    _log("tools.log", f"{os.getpid()} start {tag}")
    while block and not (WORK / "gate").exists():  # noqa: ASYNC110 - the gate is a file another process writes
        await asyncio.sleep(0.02)
    _log("tools.log", f"{os.getpid()} end {tag}")
    return f"result-{tag}"


class CountingBackend(ScriptedBackend):
    async def stream(self, prompt: str, **kw: Any) -> AsyncIterator[str | Completion]:
        _log("calls.log", f"{os.getpid()} {self.context_of(prompt)[0] or 'root'}")
        async for item in super().stream(prompt, **kw):
            yield item


def call(name: str, **args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def outlines(*labels: str) -> str:
    return "".join(f"<Outline>{lbl}: part {lbl}</Outline>\n" for lbl in labels)


SCRIPT = {
    "": (f"Split.\n<Parallel>\n<Outlines>\n{outlines('1', '2', '3', '4')}</Outlines>\n"
         f"Again.\n<Parallel>\n<Outlines>\n{outlines('5', '6')}</Outlines>\n"
         "All parts done."),
    **{str(i): f" doing {i} {call('work', tag=str(i), block=i > 2)} got part {i}</Thread>" for i in range(1, 5)},
    **{str(i): f" second round {i}</Thread>" for i in (5, 6)},
}


def factory(checkpointer: Any) -> Any:
    cfg = APRConfig(max_total_threads=5, thread_timeout_s=120, parallel="--sequential" not in sys.argv)
    return create_apr_agent(CountingBackend(SCRIPT), [work], cfg, checkpointer=checkpointer)


async def main() -> None:
    db, thread_id, resume = sys.argv[1], sys.argv[3], "--resume" in sys.argv
    _log("pids.log", f"{os.getpid()} {'resume' if resume else 'start'}")
    state = await run_with_checkpoint(factory, None if resume else "Do all parts.", db, thread_id, resume)
    trace = state["apr_trace"]
    print(json.dumps({"answer": state["messages"][-1].content, "transcript": trace["transcript"],
                      "summary": trace["summary"], "limits": trace.get("limits", []),
                      "contexts": sorted(trace["contexts"])}))


if __name__ == "__main__":
    asyncio.run(main())
