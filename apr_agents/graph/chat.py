"""Tool-call mode: any LangChain chat model with tool calling drives the agent.

``create_apr_agent(chat_model, ...)`` lands here when ``chat_model`` is a
``BaseChatModel``. The model gets the user's tools plus a ``spawn`` tool
(``{"tasks": [...]}``). A ``spawn`` call fans out like a text-protocol spawn:
one LangGraph ``Send`` per task to the ``branch`` node, which runs this same
graph for a conversation made of the parent's messages, the spawn call's
acknowledgement and the branch's sub-task. A branch may call tools and spawn
again (up to ``max_depth``) and ends with a message without tool calls. The
merge answers the parent's ``spawn`` call with one ``ToolMessage`` holding
every branch's result in task order, and the parent goes on.

Nodes: ``prepare -> generate -> tools -> (branch* -> merge ->) generate ... -> END``
(the step whose message has no tool call also closes the context); one model call
per ``generate`` step, so each step is checkpointed.
Trace, limits and custom stream events are those of the text mode.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Overwrite, Send

from ..backends.base import BackendError
from ..config import APRConfig
from ..protocol.parser import ToolCall
from ..runtime.limits import Limiter, ThreadBudget
from ..runtime.tool_exec import run_tool_calls, truncate
from ..runtime.trace import merge_traces, new_record, summarize
from .build import checked_config_and_tools, compile_agent
from .chat_prompt import (
    DEFAULT_CHAT_SYSTEM_PROMPT,
    SPAWN_TOOL_NAME,
    branch_task_message,
    default_chat_merge,
    format_system_prompt,
    parse_spawn_args,
    render_transcript,
    spawn_ack,
    spawn_tool_schema,
)
from .core import BranchRunner, call_with_retries, copy_ctx, emit, model_call, spawned_in, where
from .prefixes import SharedPrefixes
from .state import APRState

# (results in task order, dialect) -> the spawn ToolMessage's text. Results carry the
# same keys as in the text mode (id, label, index, text, end, outline=the task); the
# dialect is None in this mode, so one strategy can serve both.
ChatMergeStrategy = Callable[[list[dict[str, Any]], Any], str]
# What to pass to ``bind_tools`` besides the tools: a dict, or a function of the step
# ({"ctx", "depth", "step", "spawn_bound"}) returning one (e.g. a per-step tool_choice).
BindKwargs = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]

def _estimate_tokens(msg: AIMessage) -> int:
    text = msg.text if isinstance(msg.text, str) else str(msg.content)
    for c in msg.tool_calls:
        text += c["name"] + json.dumps(c["args"])
    for c in msg.invalid_tool_calls:
        text += str(c.get("name")) + str(c.get("args"))
    return max(1, len(text) // 4)


def _last_ai_text(messages: Sequence[BaseMessage]) -> str:
    for m in reversed(messages):
        if isinstance(m, AIMessage):
            return m.text if isinstance(m.text, str) else str(m.content)
    return ""


class _ChatAgent(BranchRunner):
    def __init__(self, model: BaseChatModel, tools: Sequence[BaseTool], config: APRConfig, *,
                 system_prompt: str | None, merge_strategy: ChatMergeStrategy | None,
                 bind_tools_kwargs: BindKwargs | None, empty_tool_call_content: str | None = None) -> None:
        self.model = model
        self.empty_tool_call_content = empty_tool_call_content
        self.user_tools = list(tools)
        self.tools = {t.name: t for t in tools}
        self.config = config
        self.limiter = Limiter(config)
        self.budget = ThreadBudget()
        self.merge_strategy = merge_strategy
        self.bind_tools_kwargs = bind_tools_kwargs
        self.delta_fields = ({"messages": "apr_msgs"}, {})  # the context's messages, checkpointed as deltas
        self.prefixes = SharedPrefixes()  # spawn prefixes kept once in the graph's store
        template = DEFAULT_CHAT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.system_prompt = format_system_prompt(template, config.max_threads)
        self.spawn_schema = spawn_tool_schema(config.max_threads)

    # -- model ---------------------------------------------------------------
    def bound_model(self, ctx: dict[str, Any]) -> Any:
        tools: list[Any] = list(self.user_tools)
        if ctx["spawn_ok"]:
            tools.append(self.spawn_schema)
        if not tools:
            return self.model
        kw = self.bind_tools_kwargs
        if callable(kw):
            kw = kw({"ctx": ctx["id"], "depth": ctx["depth"], "step": ctx["rec"]["calls"],
                     "spawn_bound": ctx["spawn_ok"]})
        return self.model.bind_tools(tools, **dict(kw or {}))

    # -- context bookkeeping -------------------------------------------------
    def _new_context(self, *, cid: str, run: str, depth: int, messages: list[dict[str, Any]], label: str | None,
                     outline: str | None, parent: str | None, deadline: float | None,
                     deadline_kind: str | None, prefix_len: int = 0, budget_seed: int = 0,
                     prefix_ref: str | None = None) -> dict[str, Any]:
        # ``messages``: the context's conversation; with ``prefix_ref`` (a checkpointed run with a
        # store) only what follows the parent's prefix, which is read back by key (_full)
        return {
            "id": cid, "run": run, "depth": depth, "messages": messages, "prefix_len": prefix_len,
            **({"prefix_ref": prefix_ref} if prefix_ref is not None else {}),
            "budget_seed": budget_seed,  # branches of the run already started when this one was (resume)
            "label": label, "deadline": deadline, "deadline_kind": deadline_kind,
            "spawn_ok": depth < self.config.max_depth, "spawns": 0, "end": None,
            "pending_tools": False, "pending_spawn": None, "text": "",
            "rec": new_record(cid, parent=parent, depth=depth, label=label, outline=outline),
        }

    # -- nodes ---------------------------------------------------------------
    async def prepare(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        """The root's setup (branches are set up from their parent's spec, never from input)."""
        messages = list(state.get("messages", []))
        if not messages:
            raise ValueError("apr agent needs at least one message in state['messages']")
        if self.system_prompt:
            if isinstance(messages[0], SystemMessage) and isinstance(messages[0].content, str):
                messages[0] = SystemMessage(self.system_prompt + "\n\n" + messages[0].content)
            else:
                messages.insert(0, SystemMessage(self.system_prompt))
        run = uuid.uuid4().hex
        deadline = time.time() + self.config.run_timeout_s if self.config.run_timeout_s else None
        ctx = self._new_context(cid="root", run=run, depth=0, messages=[message_to_dict(m) for m in messages],
                                label=None, outline=None, parent=None, deadline=deadline,
                                deadline_kind="run_timeout_s" if deadline else None, prefix_len=len(messages))
        trace = {"version": 1, "run_id": run, "dialect": "tool_calls", "mode": "chat",
                 "config": self.config.model_dump(), "tools": sorted(self.tools), "contexts": {"root": ctx["rec"]},
                 "limits": [], "repairs": []}
        return {"apr": ctx, "apr_trace": Overwrite(trace), "apr_branch_results": Overwrite([])}

    async def generate(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = copy_ctx(state["apr"])
        ctx["messages"] = list(ctx["messages"])
        cfg = self.config
        limits: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        rec = ctx["rec"]
        if rec["calls"] >= cfg.max_steps:
            limits.append(self._limit(ctx, "max_steps", f"{cfg.max_steps} model calls"))
            ctx["end"] = "max_steps"
        elif rec["completion_tokens"] >= cfg.max_tokens:
            limits.append(self._limit(ctx, "max_tokens", f"{cfg.max_tokens} tokens"))
            ctx["end"], rec["truncated"] = "max_tokens", True
        elif ctx["deadline"] is not None and time.time() >= ctx["deadline"]:
            limits.append(self._limit(ctx, ctx["deadline_kind"], "deadline passed"))
            ctx["end"], rec["truncated"] = "timeout", True
        else:
            started = time.time()
            ai = await self._invoke(ctx, messages_from_dict(await self._full(ctx)), config)
            if ai is None:
                limits.append(self._limit(ctx, ctx["deadline_kind"] or "thread_timeout_s",
                                          "deadline passed during generation"))
                ctx["end"], rec["truncated"] = "timeout", True
            else:
                ai = self._with_ids(ai)
                before = {k: rec[k] for k in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")}
                self._account(ctx, ai)
                calls.append(model_call(started, **{k: rec[k] - v for k, v in before.items()}))
                ctx["messages"].append(message_to_dict(ai))
                if ai.tool_calls or ai.invalid_tool_calls:
                    ctx["pending_tools"] = True
                elif (ai.response_metadata or {}).get("finish_reason") == "length":
                    limits.append(self._limit(ctx, "max_tokens", "the model stopped at its own token limit"))
                    ctx["end"], rec["truncated"] = "max_tokens", True
                else:
                    ctx["end"] = "thread_end" if ctx["depth"] > 0 else "eos"
        if ctx["end"] is not None:
            rec["end"] = ctx["end"]
        return {"apr": ctx, "apr_trace": self._trace(ctx, model_calls=calls, limits=limits)}

    async def _invoke(self, ctx: dict[str, Any], messages: list[BaseMessage],
                      config: RunnableConfig) -> AIMessage | None:
        """One model call under the shared retry policy (core.py); ``None`` when the deadline passed."""
        model = self.bound_model(ctx)
        if self.empty_tool_call_content:
            messages = [self._filled(m) for m in messages]

        async def attempt() -> AIMessage:
            out = await model.ainvoke(messages, config)
            if not isinstance(out, AIMessage):
                raise BackendError(f"chat model returned {type(out).__name__}, not an AIMessage")
            return out

        return await call_with_retries(ctx, self.config, self.limiter, attempt,
                                       what=f"chat model {type(self.model).__name__}")

    def _filled(self, m: BaseMessage) -> BaseMessage:
        """What is sent (never stored) for a tool-calling assistant message without text."""
        if isinstance(m, AIMessage) and (m.tool_calls or m.invalid_tool_calls) and not m.content:
            return m.model_copy(update={"content": self.empty_tool_call_content})
        return m

    @staticmethod
    def _with_ids(ai: AIMessage) -> AIMessage:
        """Every tool call needs an id for its ToolMessage; some servers leave it out."""
        if all(c.get("id") for c in ai.tool_calls) and all(c.get("id") for c in ai.invalid_tool_calls):
            return ai
        fill = lambda c: {**c, "id": c.get("id") or f"call_{uuid.uuid4().hex[:16]}"}  # noqa: E731
        return ai.model_copy(update={"tool_calls": [fill(c) for c in ai.tool_calls],
                                     "invalid_tool_calls": [fill(c) for c in ai.invalid_tool_calls]})

    @staticmethod
    def _account(ctx: dict[str, Any], ai: AIMessage) -> None:
        rec = ctx["rec"]
        rec["calls"] += 1
        usage = ai.usage_metadata
        if usage:
            rec["prompt_tokens"] += int(usage.get("input_tokens") or 0)
            rec["completion_tokens"] += int(usage.get("output_tokens") or 0)
            details = usage.get("input_token_details") or {}
            rec["cached_prompt_tokens"] += int(details.get("cache_read") or 0)
        else:  # the model reports no usage: estimate, and say so
            rec["completion_tokens"] += _estimate_tokens(ai)
            rec["tokens_estimated"] = True

    async def tools_node(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = copy_ctx(state["apr"])
        ctx["messages"] = list(ctx["messages"])
        cfg = self.config
        limits: list[dict[str, Any]] = []
        repairs: list[dict[str, Any]] = []
        ai = messages_from_dict(ctx["messages"][-1:])[0]
        assert isinstance(ai, AIMessage)
        order: list[dict[str, Any]] = [*ai.tool_calls, *ai.invalid_tool_calls]
        answers: dict[str, ToolMessage] = {}
        records: list[dict[str, Any]] = []

        def reply(call: dict[str, Any], text: str, error: str | None) -> None:
            answers[call["id"]] = ToolMessage(text, tool_call_id=call["id"], name=call.get("name") or "",
                                              status="error" if error else "success")
            if error:
                records.append({"name": call.get("name"), "args": call.get("args"), "started": time.time(),
                                "duration_s": 0.0, "error": error})

        allowed = order[: cfg.max_tool_calls_per_step]
        for call in order[cfg.max_tool_calls_per_step:]:
            reply(call, f"error: at most {cfg.max_tool_calls_per_step} tool calls per message; this one was not "
                        "run. Call it again in a later message.", "max_tool_calls_per_step")
        if len(order) > len(allowed):
            limits.append(self._limit(ctx, "max_tool_calls_per_step",
                                      f"{len(order)} calls in one message; ran {len(allowed)}"))
        regular: list[dict[str, Any]] = []
        spawn_call: dict[str, Any] | None = None
        for call in allowed:
            if call.get("type") == "invalid_tool_call":
                reply(call, f"error: the arguments of {call.get('name')!r} are not valid JSON ({call.get('error')}); "
                            "nothing was run. Call it again with a JSON object of arguments.", "invalid_arguments")
                repairs.append({"ctx": ctx["id"], "kind": "invalid_tool_call",
                                "detail": truncate(str(call.get("args")), 200)})
            elif call["name"] != SPAWN_TOOL_NAME:
                regular.append(call)
            elif spawn_call is not None:
                reply(call, "error: only one spawn call per message is run; this one was not. Put all "
                            "independent sub-tasks in a single spawn call.", "duplicate_spawn")
                repairs.append({"ctx": ctx["id"], "kind": "duplicate_spawn", "detail": call["id"]})
            else:
                spawn_call = call
        spawn: dict[str, Any] | None = None
        if spawn_call is not None:
            spawn, error = self._plan_spawn(ctx, spawn_call, limits, repairs, state.get("apr_trace"))
            if error is not None:
                reply(spawn_call, error, "invalid_spawn" if error.startswith("error: invalid") else "limit")
        if regular:
            calls = [ToolCall(c["name"], c["args"], json.dumps(c["args"], default=str), None) for c in regular]
            results = await run_tool_calls(calls, self.tools, self.limiter, cfg, deadline=ctx["deadline"],
                                           emit=emit, ctx_id=ctx["id"])
            for call, (text, trec) in zip(regular, results, strict=True):
                answers[call["id"]] = ToolMessage(text, tool_call_id=call["id"], name=call["name"],
                                                  status="error" if trec["error"] else "success")
                records.append(trec)
        records.sort(key=lambda r: r["started"])
        ctx["pending_tools"] = False
        ids = [c["id"] for c in order]
        if spawn is None:
            ctx["messages"].extend(message_to_dict(answers[i]) for i in ids)
        else:
            spawn["answers"] = {i: message_to_dict(m) for i, m in answers.items()}
            spawn["order"] = ids
            await self._fill_children(ctx, spawn)
            ctx["pending_spawn"] = spawn
        spawned = [[c["cid"] for c in spawn["children"]]] if spawn is not None else None
        return {"apr": ctx, "apr_trace": self._trace(ctx, tool_calls=records, spawns=spawned, limits=limits,
                                                     repairs=repairs)}

    def _plan_spawn(self, ctx: dict[str, Any], call: dict[str, Any], limits: list[dict[str, Any]],
                    repairs: list[dict[str, Any]],
                    trace: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
        cfg = self.config
        if not ctx["spawn_ok"]:
            if ctx["depth"] >= cfg.max_depth:
                limits.append(self._limit(ctx, "max_depth", f"spawn at depth {ctx['depth']} not run"))
                return None, (f"error: spawn is not available here (depth {ctx['depth']}, max_depth "
                              f"{cfg.max_depth}). Do the sub-tasks yourself, one after another.")
            limits.append(self._limit(ctx, "max_total_threads", "spawn after the run's branch budget was spent"))
            return None, ("error: this run has no branches left (max_total_threads reached). Do the sub-tasks "
                          "yourself, one after another.")
        tasks, error, kind = parse_spawn_args(call.get("args"), cfg.max_threads)
        if error is not None:
            n = len(call["args"]["tasks"]) if kind == "max_threads" else None
            if kind == "max_threads":
                limits.append(self._limit(ctx, "max_threads",
                                          f"spawn with {n} tasks refused; at most {cfg.max_threads}"))
            else:
                repairs.append({"ctx": ctx["id"], "kind": "invalid_spawn", "detail": error[:300]})
            return None, error
        assert tasks is not None
        # After a restart the in-process budget is empty: seed it from what the checkpointed state knows.
        seed = ctx.get("budget_seed", 0) + spawned_in(trace, ctx)
        got = self.budget.reserve(ctx["run"], len(tasks), cfg.max_total_threads, seed=seed)
        skipped: list[str] = []
        if got < len(tasks):
            limits.append(self._limit(ctx, "max_total_threads",
                                      f"{cfg.max_total_threads} branches per run; {got} of {len(tasks)} run"))
            if got == 0:
                ctx["spawn_ok"] = False  # not offered again in this context
                return None, ("error: this run has no branches left (max_total_threads reached); nothing was "
                              "run. Do the sub-tasks yourself, one after another.")
            tasks, skipped = tasks[:got], tasks[got:]
        ctx["spawns"] += 1
        return {"call_id": call["id"], "tasks": tasks, "skipped": skipped, "spawn_no": ctx["spawns"]}, None

    async def _full(self, ctx: dict[str, Any]) -> list[dict[str, Any]]:
        """The context's whole conversation: its parent's prefix (by reference) and its own messages."""
        if "prefix_ref" not in ctx:
            return list(ctx["messages"])
        prefix = await self.prefixes.get(ctx["run"], ctx["prefix_ref"], where(ctx) + ")")
        return [*prefix, *ctx["messages"]]

    async def _fill_children(self, ctx: dict[str, Any], spawn: dict[str, Any]) -> None:
        """Each branch: the parent's conversation, the spawn acknowledged, then its own sub-task.

        With a store, the shared part is written there once and each child carries its key and
        its own task message only (graph/prefixes.py)."""
        cfg = self.config
        tasks: list[str] = spawn["tasks"]
        n = len(tasks)
        prefix = await self._full(ctx)
        for i in spawn["order"]:
            if i == spawn["call_id"]:
                prefix.append(message_to_dict(ToolMessage(spawn_ack(n), tool_call_id=i, name=SPAWN_TOOL_NAME)))
            else:
                prefix.append(spawn["answers"][i])
        depth = ctx["depth"] + 1
        now = time.time()
        children = []
        for k, task in enumerate(tasks):
            label = str(k + 1)
            deadline, kind = now + cfg.thread_timeout_s, "thread_timeout_s"
            if ctx["deadline"] is not None and ctx["deadline"] < deadline:
                deadline, kind = ctx["deadline"], ctx["deadline_kind"]
            msg = HumanMessage(branch_task_message(k + 1, n, task, can_spawn=depth < cfg.max_depth))
            children.append({
                "cid": f"{ctx['id']}/{spawn['spawn_no']}.{label}", "run": ctx["run"], "depth": depth,
                "messages": [*prefix, message_to_dict(msg)], "prefix_len": len(prefix) + 1,
                "label": label, "outline": task, "parent": ctx["id"], "deadline": deadline,
                "deadline_kind": kind, "index": k, "budget_seed": self.budget.used(ctx["run"]),
            })
        ref = await self.prefixes.share(ctx["run"], prefix) if children else None
        if ref is not None:
            for child in children:
                child["messages"], child["prefix_ref"] = child["messages"][len(prefix):], ref
        spawn["children"] = children
        emit({"apr": "spawn", "ctx": ctx["id"], "outlines": [[c["label"], c["outline"]] for c in children],
               "skipped": len(spawn["skipped"])})

    async def merge(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = copy_ctx(state["apr"])
        ctx["messages"] = list(ctx["messages"])
        spawn = ctx["pending_spawn"]
        wanted = {c["cid"] for c in spawn["children"]}
        results = sorted((r for r in state.get("apr_branch_results", []) if r["id"] in wanted),
                         key=lambda r: r["index"])
        if self.merge_strategy is not None:
            text = self.merge_strategy(results, None)
        else:
            text = default_chat_merge(results)
        if spawn["skipped"]:
            first = len(results) + 1
            text += "\n\nNot run (max_total_threads reached; do these yourself):\n" + "\n".join(
                f"[{first + k}] {t}" for k, t in enumerate(spawn["skipped"]))
        answer = ToolMessage(text, tool_call_id=spawn["call_id"], name=SPAWN_TOOL_NAME)
        for i in spawn["order"]:
            ctx["messages"].append(message_to_dict(answer) if i == spawn["call_id"] else spawn["answers"][i])
        ctx["pending_spawn"] = None
        emit({"apr": "merge", "ctx": ctx["id"], "children": [r["id"] for r in results]})
        return {"apr": ctx, "apr_branch_results": Overwrite([]), "apr_trace": self._trace(ctx)}

    async def finalize(self, state: APRState, config: RunnableConfig) -> dict[str, Any]:
        ctx = copy_ctx(state["apr"])
        messages = messages_from_dict(await self._full(ctx))
        rec = ctx["rec"]
        rec["ended"] = time.time()
        rec["end"] = ctx["end"]
        ctx["text"] = _last_ai_text(messages[ctx["prefix_len"]:])
        rec["text"] = render_transcript(messages[ctx["prefix_len"]:])
        if ctx["depth"] > 0:
            emit({"apr": "branch_end", "ctx": ctx["id"], "end": ctx["end"], "tokens": rec["completion_tokens"]})
            return {"apr": ctx, "apr_trace": self._trace(ctx)}
        if ctx["id"] == "root":
            self.budget.release_run(ctx["run"])
            await self.prefixes.forget(ctx["run"])
        full = merge_traces(state.get("apr_trace", {}), self._trace(ctx))
        msg = AIMessage(content=ctx["text"], response_metadata={"apr_end": ctx["end"], "apr_run_id": ctx["run"]})
        return {"apr": ctx, "messages": [msg],
                "apr_trace": {"contexts": {"root": rec}, "summary": summarize(full),
                              "transcript": render_transcript(messages)}}

    # -- routing -------------------------------------------------------------
    @staticmethod
    def route_generate(state: APRState) -> str:
        return "tools" if state["apr"].get("pending_tools") else "finalize"

    def route_tools(self, state: APRState) -> str | list[Send]:
        spawn = state["apr"].get("pending_spawn")
        if not spawn:
            return "generate"
        children = spawn["children"]
        if self.config.parallel:
            return [Send("branch", {"children": [c]}) for c in children]
        return [Send("branch", {"children": children})]


def create_chat_apr_agent(
    chat_model: BaseChatModel,
    tools: Sequence[BaseTool] = (),
    config: APRConfig | None = None,
    *,
    checkpointer: BaseCheckpointSaver | Literal[False] | None = None,
    store: BaseStore | None = None,
    name: str = "apr_agent",
    merge_strategy: ChatMergeStrategy | None = None,
    system_prompt: str | None = None,
    bind_tools_kwargs: BindKwargs | None = None,
    empty_tool_call_content: str | None = None,
) -> CompiledStateGraph:
    """The APR agent for a LangChain chat model with tool calling; spawning goes through a ``spawn`` tool.

    ``system_prompt``: ``None`` ships ``DEFAULT_CHAT_SYSTEM_PROMPT``; ``""`` adds none; any other text
    replaces it (``{max_threads}`` is filled in). A system message already in the input is kept after it.
    ``bind_tools_kwargs``: extra ``bind_tools`` keywords (e.g. ``{"tool_choice": "auto"}``, which
    llama-cpp-python's server needs), or a function of the step returning them.
    ``empty_tool_call_content``: text sent in place of the empty content of an assistant message that
    only makes tool calls. OpenAI clients send ``null`` there, which some servers reject (llama-cpp-python's
    answers HTTP 500); e.g. ``" "`` works around it. The stored conversation is not changed.
    """
    if not isinstance(chat_model, BaseChatModel):
        raise TypeError(f"chat_model must be a LangChain BaseChatModel, not {type(chat_model).__name__}")
    config, tools = checked_config_and_tools(config, tools)
    if config.spawn_at == "outline":
        raise ValueError("spawn_at='outline' (eager spawn) is a text-mode option: in tool-call mode the "
                         "branches start when the model's spawn call is complete")
    if SPAWN_TOOL_NAME in (t.name for t in tools):
        raise ValueError(f"a tool may not be named {SPAWN_TOOL_NAME!r}: the agent binds its own spawn tool")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError("system_prompt must be a string (or None for the default)")
    try:
        chat_model.bind_tools([spawn_tool_schema(config.max_threads)])
    except NotImplementedError as exc:
        raise TypeError(f"{type(chat_model).__name__} has no tool calling (bind_tools); the tool-call mode "
                        "needs it. Use a text-protocol backend instead.") from exc
    agent = _ChatAgent(chat_model, tools, config, system_prompt=system_prompt, merge_strategy=merge_strategy,
                       bind_tools_kwargs=bind_tools_kwargs, empty_tool_call_content=empty_tool_call_content)

    routes = {"generate": (agent.route_generate, ["tools", "finalize"]),
              "tools": (agent.route_tools, ["branch", "generate"])}
    return compile_agent(agent, routes, checkpointer=checkpointer, store=store, name=name)
