"""The served graph: an APR agent configured from environment variables.

``graphs/apr_graph.py`` calls ``graph_from_env()`` and the LangGraph server
(``langgraph dev`` / ``langgraph up``) serves the result; see docs/deployment.md.

Variables (all optional):

- ``APR_BACKEND``: ``embedded`` (default: the CPU model of ``default_backend()``),
  ``scripted`` (FAKE, tests and load runs), ``openai`` (an OpenAI-compatible
  completions server, e.g. ``vllm serve``) or ``vllm`` (in-process vLLM).
- ``APR_MODEL``: model name (``openai``) or name/folder (``vllm``); for
  ``embedded``, an optional GGUF path instead of the shipped one.
- ``APR_BASE_URL``: ``openai`` server URL, or the URL of a serving router in front of
  replicas (docs/scale-out.md); comma-separated replicas without a router.
- ``APR_API_KEY``: ``openai`` key, if the server wants one.
- ``APR_SCRIPT``: ``scripted`` only: ``arith`` (default: the load-test task of
  ``apr_agents.testing.scripts``), ``demo`` (the CLI demo), or a JSON object
  ``{context path: reply}``; ``APR_SCRIPT_FILE``: the same JSON in a file.
- ``APR_TOKEN_LATENCY_S``, ``APR_CALL_LATENCY_S``: ``scripted`` simulated latency.
- ``APR_TOOLS``: demo tools to offer (``all`` default, or e.g. ``calculator,lookup``;
  ``none`` for no tools); ``APR_TOOL_LATENCY_S``: add this delay to every tool call;
  ``APR_TOOL_LATENCY_SPREAD_S``: plus up to this much more, fixed by the call's arguments;
  ``APR_TOOL_LOG``: append a JSON line per tool call start and end to this file (an audit
  for durability tests: thread id, arguments, process id).
- ``APR_<FIELD>`` for every ``APRConfig`` field, e.g. ``APR_MAX_THREADS=8``,
  ``APR_MAX_DEPTH``, ``APR_MAX_TOTAL_THREADS``, ``APR_MAX_TOKENS``,
  ``APR_THREAD_TIMEOUT_S``, ``APR_RUN_TIMEOUT_S``, ``APR_LLM_CONCURRENCY``,
  ``APR_TOOL_CONCURRENCY``, ``APR_TOOL_RATE_PER_S`` (``none`` for no cap),
  ``APR_DIALECT``, ``APR_PARALLEL``, ``APR_BRANCH_RUNS``. Invalid values fail at start with
  APRConfig's message.
- ``APR_GRAPH_NAME``: the compiled graph's name (default ``apr_agent``).

The server brings its own checkpointer (every thread is durable there), so
the graph is compiled without one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import APRConfig

_NONE = {"", "none", "null"}


def config_from_env(env: Mapping[str, str] | None = None) -> APRConfig:
    """``APRConfig`` from ``APR_<FIELD>`` variables; unset ones keep their defaults."""
    env = os.environ if env is None else env
    fields: dict[str, Any] = {}
    for name, info in APRConfig.model_fields.items():
        raw = env.get(f"APR_{name.upper()}")
        if raw is None:
            continue
        optional = info.default is None
        fields[name] = None if optional and raw.strip().lower() in _NONE else raw.strip()
    try:
        return APRConfig(**fields)
    except ValueError as exc:
        raise ValueError(f"invalid APR_* environment settings: {exc}") from exc


def backend_from_env(env: Mapping[str, str] | None = None) -> Any:
    env = os.environ if env is None else env
    kind = env.get("APR_BACKEND", "embedded").strip().lower()
    model = env.get("APR_MODEL") or None
    if kind == "embedded":
        from ..backends import default_backend

        return default_backend(**({"model_path": model} if model else {}))
    if kind == "scripted":
        from ..testing import ScriptedBackend

        return ScriptedBackend(_script(env), token_latency_s=float(env.get("APR_TOKEN_LATENCY_S", "0")),
                               call_latency_s=float(env.get("APR_CALL_LATENCY_S", "0")))
    if kind == "openai":
        from ..backends import OpenAICompatibleBackend

        url = env.get("APR_BASE_URL")
        if not url or not model:
            raise ValueError("APR_BACKEND=openai needs APR_BASE_URL and APR_MODEL")
        urls = [u.strip() for u in url.split(",") if u.strip()]
        return OpenAICompatibleBackend(urls if len(urls) > 1 else urls[0], model,
                                       api_key=env.get("APR_API_KEY") or None)
    if kind == "vllm":
        from ..backends import VLLMBackend

        if not model:
            raise ValueError("APR_BACKEND=vllm needs APR_MODEL (a model name or checkpoint folder)")
        return VLLMBackend(model)
    raise ValueError(f"unknown APR_BACKEND {kind!r}: use embedded, scripted, openai or vllm")


def _script(env: Mapping[str, str]) -> Any:
    if path := env.get("APR_SCRIPT_FILE"):
        return _checked(json.loads(Path(path).read_text()))
    raw = env.get("APR_SCRIPT", "arith").strip()
    if raw == "arith":
        from ..testing.scripts import arith_script

        return arith_script()
    if raw == "demo":
        from ..testing.scripts import demo_script

        return demo_script()
    return _checked(json.loads(raw))


def _checked(script: Any) -> dict[str, str]:
    if not (isinstance(script, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in script.items())):
        raise ValueError('a scripted backend script is a JSON object {"context path": "reply", ...}')
    return script


def tools_from_env(env: Mapping[str, str] | None = None) -> list[Any]:
    env = os.environ if env is None else env
    names = env.get("APR_TOOLS", "all").strip()
    if names.lower() in _NONE:
        return []
    from apr_tools import get_tools, with_latency

    latency = float(env.get("APR_TOOL_LATENCY_S", "0"))
    spread = float(env.get("APR_TOOL_LATENCY_SPREAD_S", "0"))
    log = env.get("APR_TOOL_LOG") or None
    if spread < 0:
        raise ValueError("APR_TOOL_LATENCY_SPREAD_S must be >= 0")
    tools = get_tools(names)
    if spread or log:
        return [_audited(t, latency, spread, log) for t in tools]
    return [with_latency(t, latency) for t in tools]


def _audited(tool: Any, latency: float, spread: float, log: str | None) -> Any:
    """``tool`` with a per-call latency of ``latency`` plus up to ``spread`` seconds (fixed by the
    arguments, so each call always takes the same time) and, with ``log``, one JSON line appended
    per call when it starts and when it ends (thread id, arguments, process id): the audit the
    durability tests read to see that a finished call never ran again."""
    import asyncio
    import hashlib

    from langchain_core.tools import StructuredTool

    def write(event: str, thread: str | None, args: dict[str, Any]) -> None:
        if log is None:
            return
        line = json.dumps({"event": event, "tool": tool.name, "thread": thread, "args": args,
                           "pid": os.getpid(), "t": time.time()}, sort_keys=True)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one write() of a short line with O_APPEND: lines of several processes never interleave
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    async def run(**kwargs: Any) -> Any:
        try:
            from langgraph.config import get_config

            thread = get_config().get("configurable", {}).get("thread_id")
        except RuntimeError:  # called outside a graph
            thread = None
        thread = str(thread) if thread is not None else None
        digest = hashlib.blake2b(json.dumps(kwargs, sort_keys=True).encode(), digest_size=4).digest()
        delay = latency + spread * int.from_bytes(digest, "big") / 0xFFFFFFFF
        write("start", thread, kwargs)
        if delay > 0:
            await asyncio.sleep(delay)
        out = await tool.ainvoke(kwargs)
        write("end", thread, kwargs)
        return out

    return StructuredTool.from_function(coroutine=run, name=tool.name, args_schema=tool.args_schema,
                                        description=tool.description)


def graph_from_env(env: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """The compiled APR graph the server serves (no checkpointer: the server supplies one)."""
    from .agent import create_apr_agent

    env = os.environ if env is None else env
    return create_apr_agent(backend_from_env(env), tools_from_env(env), config_from_env(env),
                            name=env.get("APR_GRAPH_NAME", "apr_agent"), **kwargs)
