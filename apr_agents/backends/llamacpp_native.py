"""What the batched llama.cpp engine is built from: its records and the llama.cpp objects it creates.

``Request`` is one ``complete``/``stream`` call as ``BatchedEngine``
(``llamacpp_engine.py``) sees it, ``Slot`` one llama.cpp sequence and the
tokens whose KV cells it holds; ``fork_source`` and ``waits_for_sibling`` pick
the sequence a new request forks its cached prefix from. ``open_context``
loads the model and makes the one context whose sequences every request
shares; ``Sampler`` is a request's own sampler (greedy, or
top-k/top-p/min-p/temperature with its seed, and an optional GBNF grammar
checked against the chosen token, not the whole vocabulary).
``JumpForward`` finds the text a grammar forces (read in one pass instead of
decoded), and ``forced_step`` answers a call whose grammar allows one text only
without the model (both llama.cpp modes use them).
``llama_cpp`` is passed in as ``lc``, never imported here, so this module
imports without it.

Usage (inside the engine)::

    model, vocab, ctx, params = open_context(lc, path, n_cells=4096, n_batch=512, n_seq_max=8)
    src, n = fork_source(slots, req)            # copy src's first n KV cells, read the rest
    req.sampler = Sampler(lc, vocab, req)
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .base import BackendRequestError, BackendUnavailable, Completion
from .llamacpp_helpers import DecodedText, common_prefix


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
    out: DecodedText | None = None  # the text so far, its stop strings and budget
    sampler: Sampler | None = None
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


def save_sequence(lc: Any, ctx: Any, seq: int) -> bytes | None:
    """The KV state of sequence ``seq`` as llama.cpp serialises it (None when it gives none)."""
    size = lc.llama_state_seq_get_size(ctx, seq)
    if size <= 0:
        return None
    buf = (ctypes.c_uint8 * size)()
    n = lc.llama_state_seq_get_data(ctx, buf, size, seq)
    return ctypes.string_at(buf, n) if 0 < n <= size else None


def load_sequence(lc: Any, ctx: Any, seq: int, blob: bytes) -> bool:
    """Load a state from ``save_sequence`` into the (emptied) sequence ``seq``; False when llama.cpp
    refuses it (no room for its cells, or bytes from another context)."""
    src = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    return bool(lc.llama_state_seq_set_data(ctx, src, len(blob), seq) == len(blob))


def grammar_allows(lc: Any, grammar: Any, data: Any, ids: Sequence[int]) -> list[int]:
    """Which of ``ids`` the GBNF sampler ``grammar`` allows now (indices into ``ids``); ``data`` is a
    ``llama_token_data`` array at least ``len(ids)`` long, used as scratch. The grammar is not advanced."""
    for i, t in enumerate(ids):
        data[i].id, data[i].logit, data[i].p = t, 0.0, 0.0
    lc.llama_sampler_apply(grammar, ctypes.byref(lc.llama_token_data_array(data, len(ids), -1, False)))
    return [i for i in range(len(ids)) if data[i].logit != float("-inf")]


class Sampler:
    """One call's sampler: a llama.cpp chain that picks the token, and the call's grammar beside it.

    The grammar is not in the chain. Applied there it checks every token of the
    vocabulary at every step (measured: 56-76 ms a token for Qwen2.5's 151,936 tokens
    under the protocol grammar on this 2-core CPU, against 0.2 ms for greedy choice and
    90 ms for the forward pass). ``sample`` lets the chain pick from all the logits first
    and asks the grammar about that one token; only when the grammar refuses it does the
    grammar mask the whole vocabulary and the chain pick again (llama.cpp's
    ``common_sampler`` does the same). Greedy decoding picks the same token either way;
    sampling with a temperature draws from the same masked distribution (rejection
    sampling), up to the top-k/top-p cut being made before the mask instead of after.

        sampler = Sampler(lc, vocab, grammar=(gbnf, "root"), temperature=0.0, seed=0)
        token = sampler.sample(ctx, -1)        # the grammar has accepted it
        sampler.free()

    ``grammar`` is the GBNF sampler (None without one): ``JumpForward`` probes and
    advances it. ``resampled`` counts the steps where the grammar refused the first pick.
    """

    def __init__(self, lc: Any, vocab: Any, req: Request | None = None, *,
                 grammar: tuple[str, str] | None = None, temperature: float = 0.0, seed: int = 0) -> None:
        if req is not None:
            grammar, temperature, seed = req.grammar, req.temperature, req.seed
        self._lc = lc
        self._n_vocab = int(lc.llama_vocab_n_tokens(vocab))
        self._all: Any = None  # the whole vocabulary as llama_token_data, made on the first refusal
        self.resampled = 0
        self.grammar: Any = None
        if grammar is not None:
            self.grammar = lc.llama_sampler_init_grammar(vocab, grammar[0].encode(), grammar[1].encode())
            if not self.grammar:
                raise BackendRequestError("llama.cpp could not parse the GBNF grammar")
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if temperature <= 0:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_greedy())
        else:  # llama-cpp-python's defaults (top_k 40, top_p 0.95, min_p 0.05)
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_k(40))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_p(0.95, 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_min_p(0.05, 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_temp(temperature))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._one = (lc.llama_token_data * 1)()

    def allows(self, token: int) -> bool:
        """Whether the grammar (if any) allows ``token`` now."""
        return self.grammar is None or bool(grammar_allows(self._lc, self.grammar, self._one, [token]))

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token from the logits of output ``idx`` (-1: the last), accepted by the grammar."""
        lc = self._lc
        token = int(lc.llama_sampler_sample(self.chain, ctx, idx))
        if self.grammar is None:
            return token
        if not self.allows(token):
            token = self._masked(ctx, idx)
        lc.llama_sampler_accept(self.grammar, token)
        return token

    def _masked(self, ctx: Any, idx: int) -> int:
        """The chain's pick among the tokens the grammar allows (the slow path: the whole vocabulary)."""
        import numpy as np  # llama-cpp-python's own dependency

        lc = self._lc
        self.resampled += 1
        if self._all is None:
            self._all = np.zeros(self._n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        data = self._all
        data["id"] = np.arange(self._n_vocab, dtype=np.int32)  # again: top-k sorts the array in place
        data["logit"] = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, idx), shape=(self._n_vocab,))
        data["p"] = 0.0
        arr = lc.llama_token_data_array(ctypes.cast(data.ctypes.data, ctypes.POINTER(lc.llama_token_data)),
                                        self._n_vocab, -1, False)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size or arr.data[arr.selected].logit == float("-inf"):
            # accepting a token the grammar refused would abort the process inside llama.cpp
            raise BackendRequestError("the grammar allows no token here")
        token = int(arr.data[arr.selected].id)
        lc.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        """Free the llama.cpp samplers (idempotent)."""
        if self.chain is not None:
            self._lc.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            self._lc.llama_sampler_free(self.grammar)
            self.grammar = None


#: The characters whose one-character tokens probe a grammar (all of them must exist in the vocabulary).
_PROBE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"
#: Characters outside ASCII: if the grammar allows any of them, the next character is not forced.
_SENTINEL_CHARS = "éü中—€"


@dataclass
class Jump:
    """What ``JumpForward.extend`` decided after a sampled token.

    ``tokens``: what to evaluate next: the sampled token, then the forced text's tokens;
    ``text``: the forced text (``""``: none); ``end``: the grammar allows nothing but the
    end of the sequence."""

    tokens: list[int]
    text: str = ""
    end: bool = False

    @property
    def n_new(self) -> int:
        """The forced text's tokens (those after the sampled one)."""
        return len(self.tokens) - 1


class JumpForward:
    """Jump-forward decoding (SGLang's name): text a grammar forces is read, not decoded.

    Where the grammar leaves one possible next character (``<tool_call>\n{"name": "``,
    a restated outline, ``</Thread>``), decoding it token by token wastes a forward pass
    per token. ``forced(grammar, limit)``
    finds that text by probing the grammar with the vocabulary's one-character tokens,
    on a clone (the grammar itself is unchanged). It stops before trailing whitespace
    and a word the free text may go on with, so the model writes those as its own
    tokens (BPE joins a space to the word after it: a forced ``": "`` then a free
    ``look`` as separate tokens made Qwen2.5 write ``1. Look`` where it writes
    ``look``). ``extend`` is the whole step: the forced text is tokenized, the grammar
    advanced over it, and the caller evaluates the sampled token and those tokens in
    one ``llama_decode`` (on a CPU about the cost of one decode step).

    ``enabled`` is False for a vocabulary without a one-character token for each
    printable ASCII character (the probe could not tell a forced character from an
    unprobed one).

    Usage (inside a decode loop; ``sampler`` is the call's ``Sampler``)::

        jump = JumpForward(lc, vocab)
        token = sampler.sample(ctx, -1)
        step = jump.extend(sampler.grammar, token, limit=64, tokenize=..., detokenize=...)
        # evaluate step.tokens; step.text is the forced text, step.end: only the end may follow
    """

    def __init__(self, lc: Any, vocab: Any) -> None:
        self._lc = lc
        self._vocab = vocab
        found: dict[str, int] = {}
        buf = (ctypes.c_char * 16)()
        wanted = set(_PROBE_CHARS + _SENTINEL_CHARS)
        for tok in range(lc.llama_vocab_n_tokens(vocab)):
            n = lc.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
            if 0 < n <= 4:
                piece = buf.raw[:n].decode("utf-8", errors="ignore")
                if len(piece) == 1 and piece in wanted and piece not in found:
                    found[piece] = tok
        self.enabled = all(c in found for c in _PROBE_CHARS)
        self._chars = [(c, found[c]) for c in _PROBE_CHARS if c in found]
        self._chars += [(c, found[c]) for c in _SENTINEL_CHARS if c in found]
        self._char_token = {c: t for c, t in self._chars}
        self._added = lc.LLAMA_TOKEN_ATTR_USER_DEFINED | lc.LLAMA_TOKEN_ATTR_CONTROL
        self._eog = sorted({t for t in (lc.llama_vocab_eos(vocab), lc.llama_vocab_eot(vocab)) if t >= 0})
        self._ids = [t for _, t in self._chars] + self._eog
        self._data = (lc.llama_token_data * len(self._ids))()

    def _allowed(self, grammar: Any, ids: Sequence[int]) -> list[int]:
        """Which of ``ids`` the grammar allows now (indices into ``ids``)."""
        return grammar_allows(self._lc, grammar, self._data, ids)

    def _walk(self, grammar: Any, limit: int, stops: Sequence[str] = ()) -> tuple[str, bool]:
        """The characters the grammar forces from here (at most ``limit``, or up to the first of
        ``stops`` it reaches), walked on a clone; and whether only the end of the sequence may
        follow them."""
        allowed = self._allowed(grammar, self._ids)
        n_chars = len(self._chars)
        out: list[str] = []
        if len(allowed) == 1 and allowed[0] < n_chars and self._chars[allowed[0]][0] not in _SENTINEL_CHARS:
            lc = self._lc
            clone = lc.llama_sampler_clone(grammar)
            try:
                while len(allowed) == 1 and allowed[0] < n_chars and len(out) < limit:
                    char, tok = self._chars[allowed[0]]
                    if char in _SENTINEL_CHARS:
                        break
                    out.append(char)
                    lc.llama_sampler_accept(clone, tok)
                    if stops and any("".join(out[-len(s):]) == s for s in stops):
                        return "".join(out), False
                    allowed = self._allowed(clone, self._ids)
            finally:
                lc.llama_sampler_free(clone)
        return "".join(out), bool(allowed) and allowed[0] >= n_chars

    def forced(self, grammar: Any, limit: int) -> tuple[str, bool]:
        """The text (at most ``limit`` characters) the grammar allows as the only continuation,
        and whether the grammar allows nothing but the end of the sequence."""
        if not self.enabled or limit <= 0:
            return "", False
        text, end = self._walk(grammar, limit)
        if not text:
            return "", end
        if end:  # the text ends the sequence: keep all of it
            return text, False
        cut = len(text)
        while cut > 0 and (text[cut - 1].isalnum() or text[cut - 1] in "_ \t\n"):
            cut -= 1
        return text[:cut], False

    def whole(self, grammar: Any, limit: int, stops: Sequence[str] = ()) -> str | None:
        """The step's whole text when the grammar allows exactly one: it forces every character up
        to one of ``stops`` or to the end of the sequence, within ``limit`` characters. None
        otherwise. Such a step needs no forward pass at all (``forced_step``)."""
        if not self.enabled or limit <= 0:
            return None
        text, end = self._walk(grammar, limit, stops)
        if text and (end or any(text.endswith(s) for s in stops if s)):
            return text
        return None

    def advance(self, grammar: Any, text: str) -> int:
        """Advance ``grammar`` over ``text`` one character at a time while it allows them (llama.cpp
        aborts the process on a token its grammar refuses); returns how many characters it took."""
        for i, char in enumerate(text):
            tok = self._char_token.get(char)
            if tok is None or not self._allowed(grammar, [tok]):
                return i
            self._lc.llama_sampler_accept(grammar, tok)
        return len(text)

    def extend(self, grammar: Any, token: int, *, limit: int, tokenize: Callable[[bytes], list[int]],
               detokenize: Callable[[list[int]], bytes]) -> Jump:
        """After ``token`` was sampled (and accepted by ``grammar``): what to evaluate next.

        ``tokenize``/``detokenize``: the model's (no BOS; special tokens parsed). The forced
        text is tokenized on its own, as the model emits it after the sampled token, and the
        jump ends before the first added token in it (``<tool_call>`` in Qwen2.5): under a
        grammar the model may spell such a tag in plain pieces (``<``, ``tool``, ``_call``) and
        the tokens it sees after it depend on which (measured: the added token there flipped a
        near-tie between two tool names in 3 of 3 threads). It is also used only where its
        tokens give back exactly its text."""
        text, end = self.forced(grammar, limit)
        if end or not text:
            return Jump([token], end=end)
        rest = tokenize(text.encode("utf-8"))
        for i, t in enumerate(rest):
            if self._lc.llama_vocab_get_attr(self._vocab, t) & self._added:
                rest = rest[:i]
                break
        try:
            taken = detokenize(rest).decode("utf-8")
        except UnicodeDecodeError:
            return Jump([token])
        if not rest or not taken or not text.startswith(taken):
            return Jump([token])  # the tokenizer does not give these bytes back: decode them instead
        if self.advance(grammar, taken) != len(taken):  # cannot happen: forced() walked these characters
            raise BackendRequestError("jump-forward: the grammar refused the text it had forced")
        return Jump([token, *rest], taken)


def forced_step(lc: Any, jump: JumpForward | None, sampler: Sampler, out: DecodedText,
                tokenize: Callable[[bytes], list[int]]) -> bool:
    """Complete ``out`` without the model when the grammar allows one text only (``JumpForward.whole``).

    ``sampler`` is the call's ``Sampler``: the probe reads its grammar (on a clone) and leaves it as
    it was, so the same sampler decodes the step when the grammar leaves a choice (the GBNF is
    parsed once per call). A step whose every character the
    grammar forces (``Result: 17351822`` copied from a tool's response, then ``</Thread>``) comes out
    the same whatever the logits are, so neither its prompt nor its tokens are evaluated: the text
    goes to ``out`` as if decoded (stop strings, streaming, token count) and ``out.finish`` says why
    it ended. Returns False, touching nothing, when there is no grammar (or ``jump`` is None), the
    grammar leaves any choice, or the text would not fit the token budget.
    """
    if jump is None or sampler.grammar is None:
        return False
    text = jump.whole(sampler.grammar, limit=4 * max(1, out.budget), stops=out.all_stops)
    if text is None:
        return False
    n = len(tokenize(text.encode("utf-8")))
    if n > out.budget:
        return False
    out.take_text(text, n)
    if out.finish is None:  # the grammar allows only the end of the sequence next
        out.finish = "eos"
    return True


__all__ = ["Jump", "JumpForward", "Request", "Sampler", "Slot", "forced_step", "fork_source", "grammar_allows",
           "load_sequence", "open_context", "save_sequence", "waits_for_sibling"]
