"""BatchedEngine: many sequences decoded together in one llama.cpp context; a fork copies KV, not text.

``LlamaCppBackend(batched=True)`` runs every call through this engine. One
engine thread owns a ``llama_context`` with ``n_seq_max`` sequences in a
unified KV cache. Every live request (the branches of one spawn, and the calls
of concurrent runs) is stepped together: each ``llama_decode`` evaluates one
token for every generating sequence plus chunks of the prompts still being
read, all in one ``llama_batch``; then each sequence samples its next token
with its own ``Sampler`` (greedy, or top-k/top-p/min-p/temperature with its
own seed, and an optional GBNF grammar).

Forks: a new request whose prompt shares a prefix with tokens already in the
KV cache (the parent that wrote the spawn block, a sibling branch, an earlier
call) gets that prefix with ``llama_memory_seq_cp``: in a unified cache the
cells are shared between sequences, nothing is evaluated again or copied.
A request whose siblings are still reading the same prefix waits for them and
then forks, so K branches of a cold prompt read it once. ``cached_prompt_tokens``
counts exactly the prompt tokens that were not evaluated for this request.

Finished sequences stay in the cache (so the parent resumes after the merge
from its cached prefix) until their sequence is needed; a cancelled request
frees its sequence and cells at once. More concurrent requests than sequences
queue first in, first out. If the KV cache runs out of cells, idle sequences
are dropped first; then the youngest request is paused (its cells freed) and
resumed later by re-reading its prompt and the tokens it already wrote.

``Request``/``Slot``, the llama.cpp setup and the choice of fork source are in
``llamacpp_native``; the stop-string and prefix helpers in ``llamacpp_helpers``.

Usage (normally through the backend)::

    from apr_agents.backends.llamacpp import LlamaCppBackend
    backend = LlamaCppBackend("model.gguf", batched=True, n_seq_max=8)
    # concurrent backend.complete()/stream() calls now decode in one batch
    backend.sequences()   # what each sequence holds (for tests and debugging)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from .base import BackendError, BackendRequestError, BackendUnavailable, Completion
from .llamacpp_helpers import CacheSnapshot, DecodedText, common_prefix, find_first, grammar_source, holdback
from .llamacpp_native import (
    JumpForward,
    Request,
    Sampler,
    Slot,
    forced_step,
    fork_source,
    load_sequence,
    open_context,
    save_sequence,
    waits_for_sibling,
)

# A request defers its start while a live sibling is still evaluating at least
# this many more tokens of their common prefix: it then forks instead of re-reading
# (a prompt being read finishes within a step or two, so waiting is cheap).
DEFER_MIN_TOKENS = 1


class BatchedEngine:
    """The decode loop of ``LlamaCppBackend(batched=True)``; see the module doc.

    ``llama``: a loaded ``llama_cpp.Llama`` (its model weights, tokenizer and
    thread settings are used; its own context is not). ``n_ctx``: the limit per
    request (prompt + generated tokens). ``n_seq_max``: sequences decoded
    together. ``kv_cells``: KV cache size shared by all sequences (default
    ``2 * n_ctx``). ``n_batch``: most prompt tokens of one request per step
    (a longer prompt is read in chunks of this size); a step holds one chunk
    plus one token per generating sequence, in one ubatch.
    """

    def __init__(self, llama: Any, model_path: str, *, n_ctx: int, n_seq_max: int = 8,
                 kv_unified: bool = False, kv_cells: int | None = None, n_batch: int = 512,
                 n_threads: int | None = None, n_threads_batch: int | None = None,
                 repack: bool = False, reuse_prefix: bool = True, end_token_ids: Sequence[int] = (),
                 jump_forward: bool = True) -> None:
        import llama_cpp

        if n_seq_max < 1:
            raise ValueError("n_seq_max must be at least 1")
        self._lc = llama_cpp
        self.llama = llama  # tokenizer and detokenizer only
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.n_chunk = max(1, n_batch)
        self.n_batch = max(self.n_chunk, n_seq_max)
        self.reuse_prefix = reuse_prefix
        self.end_token_ids = set(end_token_ids)
        self.kv_unified = kv_unified
        # separate streams: n_ctx cells per sequence; unified: one pool (default 2 * n_ctx cells)
        self.kv_cells = n_ctx * n_seq_max if not kv_unified else max(n_ctx, kv_cells or 2 * n_ctx)
        self._model, self._vocab, self._ctx, params = open_context(
            llama_cpp, model_path, n_cells=self.kv_cells, n_batch=self.n_batch, n_seq_max=n_seq_max,
            kv_unified=kv_unified, repack=repack, n_threads=n_threads, n_threads_batch=n_threads_batch)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.jump_forward = jump_forward
        self._jump: JumpForward | None = None  # built at the first grammar request (a vocabulary scan)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_threads = int(params.n_threads)
        self.n_threads_batch = int(params.n_threads_batch)
        self._threads_now = self.n_threads_batch
        self._slots = [Slot(seq=i) for i in range(n_seq_max)]
        self._pending: deque[Request] = deque()
        self._inbox: list[Request] = []
        self._cv = threading.Condition()
        self._state = threading.Lock()
        self._closing = False
        self._order = 0
        self.stats_lock = threading.Lock()
        self.counters: dict[str, float] = {
            "steps": 0, "batch_tokens": 0, "max_batch_seqs": 0, "prefill_tokens": 0, "forks": 0,
            "forked_tokens": 0, "preempted": 0, "evicted": 0, "aborted": 0, "forced_tokens": 0, "forced_steps": 0,
            "grammar_refusals": 0,
            "decode_s": 0.0}
        self._thread = threading.Thread(target=self._loop, name="apr-llamacpp-engine", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------
    def submit(self, req: Request) -> Future[Completion]:
        with self._cv:
            if self._closing:
                raise BackendUnavailable("LlamaCppBackend is closed")
            self._inbox.append(req)
            self._cv.notify()
        return req.future

    def wake(self) -> None:
        """Make the engine look at cancellations now (it also does so before every step)."""
        with self._cv:
            self._cv.notify()

    def sequences(self) -> list[dict[str, Any]]:
        """What each sequence holds: its KV positions as llama.cpp reports them, live or idle."""
        out = []
        with self._state:
            for s in self._slots:
                lo = self._lc.llama_memory_seq_pos_min(self._mem, s.seq)
                hi = self._lc.llama_memory_seq_pos_max(self._mem, s.seq)
                out.append({"seq": s.seq, "tokens": len(s.tokens), "live": s.request is not None,
                            "kv_pos_min": lo, "kv_pos_max": hi})
        return out

    def clear_cache(self) -> int:
        """Forget the cached prefixes of idle sequences (live requests keep theirs); returns how many."""
        n = 0
        with self._state:
            for s in self._slots:
                if s.request is None and s.tokens:
                    self._lc.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
                    s.tokens = []
                    n += 1
        return n

    def snapshot(self) -> CacheSnapshot:
        """Every cached sequence's tokens and KV state (``LlamaCppBackend.snapshot_cache``)."""
        with self._state:
            self._check_idle("snapshot_cache")
            out = []
            for s in self._slots:
                blob = save_sequence(self._lc, self._ctx, s.seq) if s.tokens else None
                if blob is not None:
                    out.append((s.seq, tuple(s.tokens), blob))
            return CacheSnapshot(tuple(out))

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Each sequence holds what it held in ``snapshot`` (the others nothing)."""
        with self._state:
            self._check_idle("restore_cache")
            self._lc.llama_memory_clear(self._mem, True)
            for s in self._slots:
                s.tokens = []
            for seq, tokens, blob in snapshot.sequences:
                if not 0 <= seq < len(self._slots):
                    continue
                if load_sequence(self._lc, self._ctx, seq, blob):
                    self._slots[seq].tokens = list(tokens)
                else:  # refused (another engine's state, no room): that sequence starts empty
                    self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def _check_idle(self, what: str) -> None:
        """Raise unless nothing is in flight; called under ``_state`` (``_cv`` inside it is safe:
        no thread holds ``_cv`` while it waits for ``_state``)."""
        if self._ctx is None:
            raise BackendUnavailable("LlamaCppBackend is closed")
        with self._cv:
            queued = bool(self._inbox)
        if queued or self._live() or self._pending:
            raise BackendError(f"{what}() needs every call to have finished (calls are in flight)")

    def close(self) -> None:
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify()
        self._thread.join()
        lc = self._lc
        for s in self._slots:
            if s.request is not None:
                self._finish(s.request, "abort")
        for r in [*self._pending, *self._inbox]:
            r.future.cancel()
        self._pending.clear()
        self._inbox.clear()
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)
        self._ctx = None

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._inbox and not self._pending and not self._live():
                    self._cv.wait()
                if self._closing:
                    return
                new, self._inbox = self._inbox, []
            with self._state:  # callers only take _cv (submit never waits for a decode step)
                try:
                    for req in new:
                        self._prepare(req)
                    self._drop_cancelled()
                    self._admit()
                    if self._live():
                        self._step()
                        continue
                except Exception as exc:  # noqa: BLE001 - a bug must fail the calls, not hang them
                    self._fail_all(BackendError(f"llama.cpp engine error: {type(exc).__name__}: {exc}"))
                    continue
            if self._pending:  # nothing live and nothing admitted cannot happen; never spin
                time.sleep(0.01)

    def _live(self) -> list[Slot]:
        return [s for s in self._slots if s.request is not None]

    def _prepare(self, req: Request) -> None:
        try:
            toks = self.llama.tokenize(req.prompt.encode("utf-8"), add_bos=True, special=True)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            self._fail(req, BackendRequestError(f"could not tokenize the prompt: {exc}"))
            return
        n = len(toks)
        if n >= self.n_ctx:
            self._fail(req, BackendRequestError(
                f"prompt has {n} tokens but the context window is n_ctx={self.n_ctx}; construct "
                "LlamaCppBackend with a larger n_ctx or lower APRConfig.max_tokens"))
            return
        req.tokens, req.n_prompt = list(toks), n
        req.budget = max(0, min(req.max_tokens, self.n_ctx - n))
        req.out = DecodedText(req.stops, req.end_stops, req.budget, req.emit, is_end=self._is_end,
                              piece=lambda t: self.llama.detokenize([t]))
        self._order += 1
        req.order = self._order
        if req.cancel.is_set():
            self._finish(req, "abort")
            return
        if req.budget > 0 and req.grammar is not None:
            try:
                forced = self._forced(req)
            except BackendRequestError as exc:  # the grammar does not parse
                self._fail(req, exc)
                return
            if forced:
                req.cached = n  # the grammar left no choice: nothing is evaluated, no sequence is taken
                self._finish(req, req.out.finish or "eos", req.out.hit)
                return
        if req.budget == 0:
            req.cached = self._best_source(req)[1]
            self._finish(req, "length")
        else:
            self._pending.append(req)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._pending if r.cancel.is_set()]:
            self._pending.remove(req)
            self._finish(req, "abort")
        for s in self._slots:
            if s.request is not None and s.request.cancel.is_set():
                self._finish(s.request, "abort")

    def _best_source(self, req: Request) -> tuple[Slot | None, int]:
        return fork_source(self._slots, req) if self.reuse_prefix else (None, 0)

    def _admit(self) -> None:
        lc = self._lc
        for req in list(self._pending):
            idle = [s for s in self._slots if s.request is None]
            if not idle:
                return
            src, n = self._best_source(req)
            if self.reuse_prefix and waits_for_sibling(self._slots, req, n, DEFER_MIN_TOKENS):
                continue
            if src is not None and src.request is None and n > 0:
                # keep the source intact when an empty or less useful sequence is free
                others = [s for s in idle if s is not src]
                empty = [s for s in others if not s.tokens]
                target = empty[0] if empty else src
            else:
                target = min(idle, key=lambda s: (len(s.tokens) > 0, s.used_at))
            if target is src:
                if not lc.llama_memory_seq_rm(self._mem, target.seq, n, -1):
                    lc.llama_memory_seq_rm(self._mem, target.seq, -1, -1)
                    n = 0
                target.tokens = target.tokens[:n]
            else:
                lc.llama_memory_seq_rm(self._mem, target.seq, -1, -1)
                target.tokens = []
                if src is not None and n > 0:
                    if self.kv_unified:  # the cells are shared, only their sequence sets change
                        lc.llama_memory_seq_cp(self._mem, src.seq, target.seq, 0, n)
                    else:  # across streams llama.cpp copies whole buffers only; then cut the tail
                        lc.llama_memory_seq_cp(self._mem, src.seq, target.seq, -1, -1)
                        lc.llama_memory_seq_rm(self._mem, target.seq, n, -1)
                    target.tokens = src.tokens[:n]
                    with self.stats_lock:
                        self.counters["forks"] += 1
                        self.counters["forked_tokens"] += n
            self._pending.remove(req)
            if req.cached is None:  # a resumed (preempted) request keeps its first count
                req.cached = n
            if req.sampler is None:
                try:
                    req.sampler = Sampler(self._lc, self._vocab, req)
                except BackendRequestError as exc:
                    target.used_at = time.perf_counter()
                    self._fail(req, exc)
                    continue
            target.request, req.slot = req, target
            if req.admitted is None:
                req.admitted = time.time()

    def _step(self) -> None:
        """One engine step: one llama_decode with the next token of every generating sequence, then
        prompt chunks of new requests, each in its own llama_decode (see "Exactness" in docs/engines.md:
        a sequence's logits then depend only on its own tokens and cached prefix, not on the batch)."""
        t0 = time.perf_counter()
        live = sorted(self._live(), key=lambda s: s.request.order)  # type: ignore[union-attr]
        decoding = [s for s in live if len(s.request.tokens) - len(s.tokens) == 1]  # type: ignore[union-attr]
        reading = [s for s in live if len(s.request.tokens) - len(s.tokens) > 1]  # type: ignore[union-attr]
        calls: list[list[tuple[Slot, int]]] = []
        if decoding:
            calls.append([(s, 1) for s in decoding])
        budget = self.n_chunk
        for s in reading:
            todo = len(s.request.tokens) - len(s.tokens)  # type: ignore[union-attr]
            take = min(todo, self.n_chunk)  # chunks start at the cached length, whatever else runs
            if take > budget and calls:
                break
            calls.append([(s, take)])
            budget -= take
        n_tokens = prefill = 0
        for items in calls:
            if any(s.request is None for s, _ in items):  # failed or paused by an earlier call
                items = [(s, k) for s, k in items if s.request is not None]
                if not items:
                    continue
            done = self._decode(items)
            if done is None:
                break
            n_tokens += sum(k for _, k in items)
            prefill += done
        with self.stats_lock:
            c = self.counters
            c["steps"] += 1
            c["batch_tokens"] += n_tokens
            c["max_batch_seqs"] = max(c["max_batch_seqs"], len(decoding) + len(calls) - bool(decoding))
            c["prefill_tokens"] += prefill
            c["decode_s"] += time.perf_counter() - t0

    def _decode(self, items: list[tuple[Slot, int]]) -> int | None:
        """Evaluate ``k`` pending tokens of each slot's request in one llama_decode; sample where due.

        Returns how many prompt tokens were evaluated, or None when the call failed."""
        lc = self._lc
        batch = self._batch
        n = 0
        outputs: list[tuple[Request, int]] = []
        for s, take in items:
            req = s.request
            assert req is not None
            pos0 = len(s.tokens)
            todo = len(req.tokens) - pos0
            for j in range(take):
                batch.token[n] = req.tokens[pos0 + j]
                batch.pos[n] = pos0 + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = s.seq
                last = j == take - 1 and take == todo
                batch.logits[n] = last
                if last:
                    outputs.append((req, n))
                n += 1
        batch.n_tokens = n
        # decode steps run on n_threads (default one per physical core), prompt chunks on n_threads_batch (all
        # cores). Measured on the shared 2-core machine: two threads for batched decode steps made K=4 2.5x
        # faster than one after another when the machine was nearly idle, and K=8 eight times slower under
        # load (threads wait for each other at every op); so decode steps keep the user's n_threads
        threads = self.n_threads if all(k == 1 for _, k in items) else self.n_threads_batch
        if threads != self._threads_now:
            lc.llama_set_n_threads(self._ctx, self.n_threads, threads)
            self._threads_now = threads
        ret = lc.llama_decode(self._ctx, batch)
        if ret == 1:
            self._make_room()
            return None
        if ret != 0:
            live = [s.request for s in self._live() if s.request is not None]
            err = BackendError(f"llama_decode failed (code {ret}); the engine dropped its KV cache")
            for req in live:
                self._fail(req, err)
            lc.llama_memory_clear(self._mem, True)
            for s in self._slots:
                s.tokens = []
            return None
        prefill = 0
        for s, take in items:
            req = s.request
            assert req is not None
            start = len(s.tokens)
            s.tokens.extend(req.tokens[start:start + take])
            prefill += max(0, min(start + take, req.n_prompt) - start)
        for req, idx in outputs:
            token = req.sampler.sample(self._ctx, idx)
            self._on_token(req, token)
        return prefill

    def _make_room(self) -> None:
        """No free KV cells for this batch: drop idle sequences, else pause the youngest request."""
        lc = self._lc
        idle = [s for s in self._slots if s.request is None and s.tokens]
        if idle:
            for s in idle:
                lc.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
                s.tokens = []
            with self.stats_lock:
                self.counters["evicted"] += len(idle)
            return
        live = self._live()
        youngest = max(live, key=lambda s: s.request.order)  # type: ignore[union-attr]
        req = youngest.request
        assert req is not None
        if len(live) == 1:
            self._fail(req, BackendError(f"the KV cache ({self.kv_cells} cells) cannot hold this request; "
                                         "construct LlamaCppBackend with more kv_cells"))
            return
        lc.llama_memory_seq_rm(self._mem, youngest.seq, -1, -1)
        youngest.tokens = []
        youngest.request, req.slot = None, None
        self._pending.appendleft(req)  # resumes first, from whatever prefix is cached then
        with self.stats_lock:
            self.counters["preempted"] += 1

    def _is_end(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token)) or token in self.end_token_ids

    def _jump_forward(self) -> JumpForward | None:
        if not self.jump_forward:
            return None
        if self._jump is None:  # a vocabulary scan, once
            self._jump = JumpForward(self._lc, self._vocab)
        return self._jump if self._jump.enabled else None

    def _forced(self, req: Request) -> bool:
        """``forced_step`` for ``req`` (its whole text is the only one its grammar allows)."""
        assert req.out is not None
        if req.sampler is None:  # built here once: admission and decoding use the same chain
            req.sampler = Sampler(self._lc, self._vocab, req)
        if not forced_step(self._lc, self._jump_forward(), req.sampler, req.out, self._tokenize):
            return False
        with self.stats_lock:
            self.counters["forced_steps"] += 1
            self.counters["forced_tokens"] += req.out.n_out
        return True

    def _tokenize(self, data: bytes) -> list[int]:
        return self.llama.tokenize(data, add_bos=False, special=True)

    def _on_token(self, req: Request, token: int) -> None:
        out = req.out
        assert out is not None
        if not out.take(token):
            self._finish(req, out.finish or "length", out.hit)
            return
        req.tokens.append(token)
        jump = self._jump_forward() if req.grammar is not None else None
        if jump is None:
            return
        # jump-forward: text the grammar forces joins the request's pending tokens, so the next
        # step reads it (one llama_decode for the whole span) instead of decoding it token by token
        step = jump.extend(req.sampler.grammar, token, limit=req.budget - out.n_out, detokenize=self.llama.detokenize,
                           tokenize=self._tokenize)
        if step.end:
            self._finish(req, "eos")
            return
        if not step.text:
            return
        with self.stats_lock:
            self.counters["forced_tokens"] += step.n_new
        if not out.take_text(step.text, step.n_new):
            self._finish(req, out.finish or "length", out.hit)
            return
        req.tokens[-1:] = step.tokens  # the sampled token is not evaluated yet: it is replaced

    def _release(self, req: Request, *, free: bool) -> None:
        s = req.slot
        if s is not None:
            if free:
                self._lc.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
                s.tokens = []
            s.request, req.slot = None, None
            s.used_at = time.perf_counter()
        if req.sampler is not None:
            with self.stats_lock:
                self.counters["grammar_refusals"] += req.sampler.resampled
            req.sampler.free()
            req.sampler = None

    def _finish(self, req: Request, finish: str, hit: str | None = None) -> None:
        self._release(req, free=finish == "abort")
        if finish == "abort":
            with self.stats_lock:
                self.counters["aborted"] += 1
        text = req.out.close(emit=finish != "abort") if req.out is not None else ""
        n_out = req.out.n_out if req.out is not None else 0
        queued = None if req.admitted is None else round(max(0.0, req.admitted - req.submitted), 4)
        comp = Completion(text=text, stop=hit, finish_reason=finish, prompt_tokens=req.n_prompt,
                          completion_tokens=n_out, cached_prompt_tokens=max(0, req.cached or 0),
                          engine_started=req.admitted, engine_ended=time.time(), queued_s=queued)
        try:
            req.future.set_result(comp)
        except InvalidStateError:  # the caller cancelled the future meanwhile
            pass

    def _fail_all(self, exc: BaseException) -> None:
        for req in [*(s.request for s in self._slots if s.request is not None), *self._pending]:
            self._fail(req, exc)
        self._pending.clear()
        self._lc.llama_memory_clear(self._mem, True)
        for s in self._slots:
            s.tokens = []

    def _fail(self, req: Request, exc: BaseException) -> None:
        self._release(req, free=True)
        try:
            req.future.set_exception(exc)
        except InvalidStateError:
            pass



# Request and the text helpers live in llamacpp_native / llamacpp_helpers; re-exported here for old imports.
__all__ = ["BatchedEngine", "Request", "common_prefix", "find_first", "grammar_source", "holdback"]
