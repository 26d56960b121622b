"""Durable runs: checkpoint every step, resume a killed run from its ``thread_id``.

The APR graph is an ordinary LangGraph graph, so any checkpointer works
(``InMemorySaver``, ``SqliteSaver``/``AsyncSqliteSaver``, ``PostgresSaver``).
What a checkpointer keeps for a run with branches in flight:

- the root's state at every step (its text up to the spawn point, the trace);
- the pending ``Send`` tasks of the spawn and, for each branch that already
  finished, its writes (its result and its trace) as *pending writes* of that
  step: on resume LangGraph hands those back instead of running the branch again;
- each branch's own checkpoints, under the namespace ``branch:<task id>``: a
  branch that was still running resumes from its last finished step (a tool
  call in flight when the process died runs again; its earlier steps do not).

``run_with_checkpoint`` is what ``apr run --db FILE [--resume THREAD_ID]`` calls. It
opens a LangGraph store beside the checkpointer (same SQLite file or Postgres database), where
each spawn's shared prefix is written once instead of once per branch, and it holds the thread
while it runs: a second run of the same thread, in this process or another, is refused
(``ThreadBusy``). Usage::

    from apr_agents import APRConfig, create_apr_agent, default_backend, run_with_checkpoint

    state = await run_with_checkpoint(
        lambda saver: create_apr_agent(default_backend(), [], APRConfig(), checkpointer=saver),
        "What is 2 + 2?", "runs.sqlite", "thread-1", resume=False)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import BaseCheckpointSaver

GraphFactory = Callable[[BaseCheckpointSaver], Any]
OnEvent = Callable[[dict[str, Any]], Awaitable[None] | None]
Durability = Literal["sync", "async", "exit"]


class NothingToResume(LookupError):
    """``resume=True`` named a thread the checkpoint store does not hold."""


class RunInProgress(RuntimeError):
    """A new question was given for a thread whose last run never finished."""


class ConfigMismatch(ValueError):
    """A resume was asked with another config or tool set than the run was started with."""


class ThreadBusy(RunInProgress):
    """Another run (in this process or another) holds the thread: a second resume would repeat
    every pending tool call, so it is refused."""


_held: set[tuple[str, str]] = set()  # (store, thread) pairs run by this process right now


@contextmanager
def thread_lock(db: str | Path | None, thread_id: str) -> Iterator[None]:
    """Hold ``thread_id`` of checkpoint store ``db`` for one run, or raise ``ThreadBusy``.

    In one process: a set of held (store, thread) pairs. Across processes, for a SQLite
    file: an exclusive ``flock`` on ``<db>.<thread>.lock`` next to it (released by the
    kernel if the process dies, so a ``kill -9`` never leaves a thread locked). A Postgres
    store is locked across processes by ``athread_lock`` (a Postgres advisory lock).
    """
    store = ":memory:" if db is None else str(db)
    key = (store, thread_id)
    if key in _held:
        raise ThreadBusy(f"thread {thread_id!r} is already running in this process; wait for it to "
                         "finish (resuming it twice would run its pending tool calls twice)")
    handle = None
    if store != ":memory:" and not _is_postgres(store):
        import fcntl

        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in thread_id)[:100]
        path = Path(_sqlite_file(store) + f".{safe}.lock")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ThreadBusy(f"thread {thread_id!r} of {store} is being run by another process (lock "
                             f"{path}); wait for it to finish (resuming it twice would run its pending "
                             "tool calls twice)") from None
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        if handle is not None:
            handle.close()  # releases the flock


@asynccontextmanager
async def athread_lock(db: str | Path | None, thread_id: str) -> AsyncIterator[None]:
    """``thread_lock``, and for a Postgres store a session advisory lock on the thread.

    The lock lives on its own connection for the length of the run; Postgres releases it when
    that connection ends, so a killed process never leaves a thread locked.
    """
    with thread_lock(db, thread_id):
        if db is None or not _is_postgres(str(db)):
            yield
            return
        import psycopg

        async with await psycopg.AsyncConnection.connect(str(db), autocommit=True) as conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                     (f"apr-agents:{thread_id}",))
            row = await cur.fetchone()
            if not row or not row[0]:
                raise ThreadBusy(f"thread {thread_id!r} of the Postgres store is being run by another "
                                 "process (advisory lock); wait for it to finish (resuming it twice would "
                                 "run its pending tool calls twice)")
            yield  # the lock ends with the connection


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


@asynccontextmanager
async def open_store(db: str | Path | None) -> AsyncIterator[Any]:
    """The LangGraph store beside ``open_checkpointer(db)``'s checkpointer: the same SQLite
    file or Postgres database, or an ``InMemoryStore`` for ``None``/``":memory:"``."""
    if db is None or str(db) == ":memory:":
        from langgraph.store.memory import InMemoryStore

        yield InMemoryStore()
        return
    url = str(db)
    if _is_postgres(url):
        from langgraph.store.postgres.aio import AsyncPostgresStore

        async with AsyncPostgresStore.from_conn_string(url) as store:
            await store.setup()
            yield store
        return
    from langgraph.store.sqlite.aio import AsyncSqliteStore

    async with AsyncSqliteStore.from_conn_string(_sqlite_file(url)) as store:
        await store.setup()
        yield store


def new_thread_id() -> str:
    return f"apr-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def open_checkpointer(db: str | Path | None) -> AsyncIterator[BaseCheckpointSaver]:
    """An async checkpointer for ``db``.

    - ``None`` or ``":memory:"``: LangGraph's ``InMemorySaver`` (lost with the process);
    - ``postgres://...`` / ``postgresql://...``: ``AsyncPostgresSaver`` (extra ``apr-agents[postgres]``);
    - anything else: a SQLite file through ``AsyncSqliteSaver`` (extra ``apr-agents[sqlite]``).
    """
    if db is None or str(db) == ":memory:":
        from langgraph.checkpoint.memory import InMemorySaver

        yield InMemorySaver()
        return
    url = str(db)
    if _is_postgres(url):
        try:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ImportError("a Postgres checkpoint store needs `pip install apr-agents[postgres]`") from exc
        async with AsyncPostgresSaver.from_conn_string(url) as saver:
            await saver.setup()
            yield saver
        return
    try:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError("a SQLite checkpoint file needs `pip install apr-agents[sqlite]`") from exc
    async with AsyncSqliteSaver.from_conn_string(_sqlite_file(url)) as saver:
        yield saver


def _check_same(trace: dict[str, Any], expect: dict[str, Any], thread_id: str) -> None:
    diffs = []
    for key, want in expect.items():
        have = trace.get(key)
        if have is None or have == want:
            continue
        if isinstance(want, dict) and isinstance(have, dict):
            diffs += [f"{key}.{k}: run has {have.get(k)!r}, now {want.get(k)!r}"
                      for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
        else:
            diffs.append(f"{key}: run has {have!r}, now {want!r}")
    if diffs:
        raise ConfigMismatch(f"thread {thread_id!r} was started with another setup; resume it with the same "
                             "config and tools: " + "; ".join(diffs))


def _sqlite_file(url: str) -> str:
    path = os.path.expanduser(url)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return path


async def run_with_checkpoint(
    graph_factory: GraphFactory,
    question: str | None,
    db_path: str | Path | None,
    thread_id: str,
    resume: bool,
    *,
    on_event: OnEvent | None = None,
    config: dict[str, Any] | None = None,
    durability: Durability = "sync",
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one checkpointed APR run and return its final state.

    ``graph_factory(checkpointer)`` builds the graph, e.g.
    ``lambda cp: create_apr_agent(backend, tools, cfg, checkpointer=cp)``; it
    must build the same graph (same tools, same config) for a resume.

    - ``resume=False``: asks ``question`` on ``thread_id`` (a thread that
      already has finished runs continues its conversation). Raises
      ``RunInProgress`` if the thread's last run never finished.
    - ``resume=True``: finishes the run that was interrupted on ``thread_id``
      (``question`` is ignored); returns the stored final state at once if
      that run had already finished. Raises ``NothingToResume`` if the store
      has no such thread.

    ``on_event`` (sync or async) receives every normalised event of
    ``apr_agents.graph.streaming.stream_events`` while the run goes on, the
    live tree of every branch. ``durability="sync"`` (default) writes each
    checkpoint before the next step starts, so a ``kill -9`` loses at most the
    steps that were running.

    ``expect`` (e.g. ``{"config": cfg.model_dump(), "tools": ["calculator"]}``): on resume, the
    run's trace must say the same, or ``ConfigMismatch`` names what differs (a resume with
    another dialect or tool set would misread the run's text and lose the answer).

    Only one run of a thread at a time: a second concurrent call for the same thread (this
    process, or another process on the same SQLite file or Postgres database) raises ``ThreadBusy`` at once.
    """
    async with athread_lock(db_path, thread_id):
        return await _run_with_checkpoint(graph_factory, question, db_path, thread_id, resume,
                                          on_event=on_event, config=config, durability=durability,
                                          expect=expect)


async def _run_with_checkpoint(graph_factory: GraphFactory, question: str | None, db_path: str | Path | None,
                               thread_id: str, resume: bool, *, on_event: OnEvent | None,
                               config: dict[str, Any] | None, durability: Durability,
                               expect: dict[str, Any] | None) -> dict[str, Any]:
    from .streaming import stream_events

    async with open_checkpointer(db_path) as saver, open_store(db_path) as store:
        graph = graph_factory(saver)
        if getattr(graph, "store", None) is None:
            graph.store = store  # where spawn prefixes are kept once (as a LangGraph server sets it)
        run_config: dict[str, Any] = {"recursion_limit": 10_000, **(config or {})}
        run_config["configurable"] = {**run_config.get("configurable", {}), "thread_id": thread_id}
        snapshot = await graph.aget_state(run_config)
        started = bool(snapshot.values) or snapshot.created_at is not None
        if resume:
            if not started:
                raise NothingToResume(f"no checkpointed run with thread_id {thread_id!r} in {db_path}")
            _check_same(snapshot.values.get("apr_trace") or {}, expect or {}, thread_id)
            if not snapshot.next:
                return dict(snapshot.values)  # it had finished: nothing left to run
            inp: dict[str, Any] | None = None
        else:
            if not question:
                raise ValueError("a new run needs a question (or resume=True)")
            if started and snapshot.next:
                raise RunInProgress(
                    f"thread {thread_id!r} has an unfinished run (next: {list(snapshot.next)}); "
                    "resume it first (resume=True / `apr run --resume`)"
                )
            inp = {"messages": [HumanMessage(question)]}
        if on_event is None:
            return dict(await graph.ainvoke(inp, run_config, durability=durability))
        final: dict[str, Any] = {}
        async for ev in stream_events(graph, inp, run_config, durability=durability):
            if ev["apr"] == "done":
                final = ev["state"]
            res = on_event(ev)
            if res is not None and hasattr(res, "__await__"):
                await res
        return final
