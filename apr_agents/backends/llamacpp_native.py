"""What the batched llama.cpp engine is built from: its records and the llama.cpp objects it creates.

``Request`` is one ``complete``/``stream`` call as ``BatchedEngine``
(``llamacpp_engine.py``) sees it, ``Slot`` one llama.cpp sequence and the
tokens whose KV cells it holds; ``fork_source`` and ``waits_for_sibling`` pick
the sequence a new request forks its cached prefix from. ``open_context``
loads the model and makes the one context whose sequences every request
shares; ``sampler_chain`` builds a request's own sampler (greedy, or
top-k/top-p/min-p/temperature with its seed, and an optional GBNF grammar).
``llama_cpp`` is passed in as ``lc``, never imported here, so this module
imports without it.

Usage (inside the engine)::

    model, vocab, ctx, params = open_context(lc, path, n_cells=4096, n_batch=512, n_seq_max=8)
    src, n = fork_source(slots, req)            # copy src's first n KV cells, read the rest
    req.sampler = sampler_chain(lc, vocab, req)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .base import BackendRequestError, BackendUnavailable, Completion
from .llamacpp_helpers import common_prefix


@dataclass(eq=False)
class Request:
    """One ``complete``/``stream`` call as the engine sees it."""

    prompt: str
    stops: list[str]
    end_stops: list[str]
    max_tokens: int
    temperature: float
    seed: int
    grammar: tuple[str, str] | None  # (GBNF text, root rule)
    emit: Callable[[str], None] | None
    cancel: threading.Event
    future: Future[Completion] = field(default_factory=Future)
    submitted: float = field(default_factory=time.time)
    admitted: float | None = None  # when the engine first gave it a sequence (time.time())
    # state, engine thread only
    tokens: list[int] = field(default_factory=list)  # prompt + sampled tokens (the last may not be in KV yet)
    n_prompt: int = 0
    budget: int = 0
    cached: int | None = None
    n_out: int = 0
    text: str = ""
    emitted: int = 0
    decoder: Any = None
    sampler: Any = None
    slot: Slot | None = None
    order: int = 0


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence: ``tokens`` are exactly the tokens whose KV cells it holds (positions 0..n-1)."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    request: Request | None = None
    used_at: float = 0.0


def fork_source(slots: Sequence[Slot], req: Request) -> tuple[Slot | None, int]:
    """The sequence holding the longest prefix of ``req.tokens`` (an idle one on a tie) and how many
    of its tokens ``req`` can take: never the last one, which is evaluated so its logits sample."""
    best: Slot | None = None
    n_best = 0
    for s in slots:
        n = common_prefix(s.tokens, req.tokens)
        if n > n_best or (n == n_best and n and best is not None and best.request is not None
                          and s.request is None):
            best, n_best = s, n
    return best, min(n_best, len(req.tokens) - 1)  # the last token is evaluated: its logits sample


def waits_for_sibling(slots: Sequence[Slot], req: Request, have: int, min_tokens: int) -> bool:
    """A live request is still evaluating at least ``min_tokens`` more of a common prefix than the
    ``have`` tokens ``req`` can fork now: ``req`` should wait and fork from it once it has."""
    for s in slots:
        r = s.request
        if r is None or len(s.tokens) >= r.n_prompt:
            continue
        planned = min(common_prefix(r.tokens[: r.n_prompt], req.tokens), len(req.tokens) - 1)
        if planned > len(s.tokens) and planned - have >= min_tokens:
            return True
    return False


def open_context(lc: Any, model_path: str, *, n_cells: int, n_batch: int, n_seq_max: int,
                 kv_unified: bool = False, repack: bool = False, n_threads: int | None = None,
                 n_threads_batch: int | None = None) -> tuple[Any, Any, Any, Any]:
    """Load the model and make a context of ``n_cells`` KV cells for ``n_seq_max`` sequences.

    Returns ``(model, vocab, context, context params)``; raises ``BackendUnavailable``
    (and frees the model) when llama.cpp cannot load or make either."""
    mparams = lc.llama_model_default_params()
    # CPU_REPACK weights (q4_K 8x8 kernels) compute a row differently depending on its place in
    # the batch; without them a sequence's logits do not depend on what else is in the batch
    mparams.use_extra_bufts = repack
    model = lc.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise BackendUnavailable(f"llama.cpp could not load {model_path}")
    vocab = lc.llama_model_get_vocab(model)
    params = lc.llama_context_default_params()
    params.n_ctx = n_cells
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.kv_unified = kv_unified
    params.swa_full = True  # sliding-window layers keep every cell, so any prefix can be forked
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    if n_threads is not None:
        params.n_threads = n_threads
    if n_threads_batch is not None:
        params.n_threads_batch = n_threads_batch
    ctx = lc.llama_init_from_model(model, params)
    if not ctx:
        lc.llama_model_free(model)
        raise BackendUnavailable(f"llama.cpp could not create a context with n_seq_max={n_seq_max}, "
                                 f"{n_cells} KV cells")
    return model, vocab, ctx, params


def sampler_chain(lc: Any, vocab: Any, req: Request) -> Any:
    """A new llama.cpp sampler chain for ``req`` (the caller frees it with ``llama_sampler_free``)."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if req.grammar is not None:
        g = lc.llama_sampler_init_grammar(vocab, req.grammar[0].encode(), req.grammar[1].encode())
        if not g:
            lc.llama_sampler_free(chain)
            raise BackendRequestError("llama.cpp could not parse the GBNF grammar")
        lc.llama_sampler_chain_add(chain, g)
    if req.temperature <= 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    else:  # the parameters Llama.generate used before (top_k 40, top_p 0.95, min_p 0.05)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(40))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(0.95, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(0.05, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(req.temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(req.seed & 0xFFFFFFFF))
    return chain


__all__ = ["Request", "Slot", "fork_source", "open_context", "sampler_chain", "waits_for_sibling"]
