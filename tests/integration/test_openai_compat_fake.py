"""OpenAICompatibleBackend's routing key, error mapping and response mapping, against FAKE servers.

The servers here are stdlib HTTP fakes (``FakeCompletionsServer``), not models:
they test the HTTP client logic only. The same behaviour against a real engine
server is in test_openai_compat_llama_server.py.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from backend_servers import FakeCompletionsServer, free_port

from apr_agents.backends.base import BackendError, BackendRequestError, BackendUnavailable, route_key
from apr_agents.backends.openai_compat import OpenAICompatibleBackend, infer_stop

pytestmark = pytest.mark.server


def _key_echo(body):
    m = re.search(r"key=(\S+)", body["prompt"])
    return {"text": f"served {m.group(1) if m else '-'}", "finish_reason": "length"}


@pytest.fixture
def fakes():
    servers = [FakeCompletionsServer(_key_echo) for _ in range(3)]
    yield servers
    for s in servers:
        s.close()


def _backend(urls, **kw):
    kw.setdefault("timeout_s", 2.0)
    return OpenAICompatibleBackend(urls, "fake-model", **kw)


async def _call(backend, key, prompt=None, **kw):
    token = route_key.set(key)
    try:
        return await backend.complete(prompt or f"key={key}", stop=kw.pop("stop", []),
                                      max_tokens=kw.pop("max_tokens", 8), **kw)
    finally:
        route_key.reset(token)


def _key_homed_on(backend, url, skip=0):
    """The ``skip``-th key (of k0, k1, ...) whose first-choice replica is ``url``."""
    homed = (f"k{i}" for i in range(10_000) if backend.replica_for(f"k{i}") == url)
    for _ in range(skip):
        next(homed)
    return next(homed)


def _served_by(fakes):
    out = {}
    for s in fakes:
        for b in s.bodies:
            out.setdefault(b["prompt"], set()).add(s.url)
    return out


async def test_same_route_key_same_replica(fakes):
    backend = _backend([s.url for s in fakes])
    keys = [f"run{i}" for i in range(24)]
    # every key three times, interleaved and concurrent, like the branches of runs
    await asyncio.gather(*[_call(backend, k) for _ in range(3) for k in keys])
    served = _served_by(fakes)
    for k in keys:
        assert served[f"key={k}"] == {backend.replica_for(k)}, k
    # and the keys spread over the replicas (rendezvous hashing: 24 keys all on one of 3 replicas
    # has odds of about 1e-11 whatever the random ports; missing one replica, about 2e-4)
    assert sum(len(s.bodies) > 0 for s in fakes) >= 2
    assert sum(len(s.bodies) for s in fakes) == 72


async def test_route_key_travels_in_the_header_a_router_hashes(fakes):
    """The router's consistent_hash policy reads X-Session-ID: every call of a run carries the run id."""
    one = fakes[0]
    backend = _backend(one.url)
    await asyncio.gather(*[_call(backend, k) for k in ("run-a", "run-b", "run-a")])
    await backend.complete("no key", stop=[], max_tokens=4)
    sent = sorted(h.get("x-session-id", "-") for h in one.headers)
    assert sent == ["-", "run-a", "run-a", "run-b"]
    quiet = _backend(one.url, route_header=None)
    await _call(quiet, "run-c")
    assert "x-session-id" not in one.headers[-1]


async def test_issue12_item10_nothing_grows_with_the_number_of_runs(fakes):
    """Replica.keys kept every run id forever; the backend now holds no per-run or per-replica state."""
    backend = _backend([s.url for s in fakes])
    await _call(backend, "warm-up")  # the HTTP client exists from here on
    before = {k: repr(v) for k, v in vars(backend).items() if k not in ("_rr", "_clients")}
    await asyncio.gather(*[_call(backend, f"run-{i}") for i in range(300)])
    after = {k: repr(v) for k, v in vars(backend).items() if k not in ("_rr", "_clients")}
    assert after == before and len(backend._clients) == 1
    assert not hasattr(backend, "replicas") and not hasattr(backend, "stats")


async def test_no_key_goes_round_robin(fakes):
    backend = _backend([s.url for s in fakes])
    for _ in range(6):
        await backend.complete("key=-", stop=[], max_tokens=4)
    assert [len(s.bodies) for s in fakes] == [2, 2, 2]


async def _stream_with_key(backend, key):
    token = route_key.set(key)
    try:
        async for item in backend.stream(f"key={key}", stop=[], max_tokens=8):
            yield item
    finally:
        route_key.reset(token)


async def test_connection_refused_falls_through_to_the_next_url(fakes):
    """Only a connection that never opened moves on: the request reached no server."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    good = fakes[0]
    backend = _backend([dead, good.url])
    key = _key_homed_on(backend, dead)
    c = await _call(backend, key)
    assert c.text == f"served {key}" and len(good.bodies) == 1
    items = [x async for x in _stream_with_key(backend, key)]
    assert items[-1].text == f"served {key}" and len(good.bodies) == 2
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        await _call(_backend([dead]), "k")


@pytest.mark.parametrize("mode", ["500", "hang", "drop"])
async def test_server_errors_and_timeouts_are_transient_and_not_resent(fakes, mode):
    """5xx, a timeout, a dropped connection: BackendError (the runtime retries; a router
    picks another worker), not a client-side resend to another replica."""
    bad, other, _ = fakes
    bad.mode, bad.hang_s = mode, 30.0
    backend = _backend([bad.url, other.url], timeout_s=1.0)
    key = _key_homed_on(backend, bad.url)
    with pytest.raises(BackendError) as err:
        await _call(backend, key)
    assert not isinstance(err.value, BackendRequestError | BackendUnavailable)
    assert len(bad.bodies) == 1 and not other.bodies


async def test_issue12_item9_context_overflow_http_400_is_not_retried(fakes):
    one = fakes[0]
    one.mode = "400"
    one.error_text = "Requested tokens (2100) exceed context window of 2048"
    backend = _backend(one.url)
    with pytest.raises(BackendRequestError) as err:
        await _call(backend, "k", max_tokens=300)
    msg = str(err.value)
    assert "HTTP 400" in msg and "max_tokens=300" in msg and "n_ctx" in msg and "exceed context window" in msg
    assert len(one.bodies) == 1
    with pytest.raises(BackendRequestError):  # the stream path maps it the same way
        async for _ in backend.stream("p", stop=[], max_tokens=8):
            pass
    one.error_text = "unknown field 'frobnicate'"
    with pytest.raises(BackendRequestError, match="parameters"):
        await _call(backend, "k")
    assert len(one.bodies) == 3
    one.mode = "429"  # rate limited: can succeed later, so transient
    with pytest.raises(BackendError) as err:
        await _call(backend, "k")
    assert not isinstance(err.value, BackendRequestError)


async def test_max_tokens_and_stops_always_reach_the_server(fakes):
    one = fakes[0]
    backend = _backend(one.url, extra_body={"max_tokens": 9999, "top_k": 20, "stop": ["x"]})
    await _call(backend, "k", max_tokens=17, stop=["</tool_call>"])
    body = one.bodies[-1]
    assert body["max_tokens"] == 17 and body["top_k"] == 20 and body["stop"][0] == "</tool_call>"
    assert "x" not in body["stop"]


async def test_stream_pieces_and_usage(fakes):
    text = "<tool_call>{\"name\": \"lookup\", \"arguments\": {}}"
    one = fakes[0]
    one.reply = lambda body: {"text": text, "finish_reason": "stop"}
    backend = _backend(one.url)
    items = [x async for x in backend.stream("p", stop=["</tool_call>"], max_tokens=32)]
    final = items[-1]
    assert "".join(items[:-1]) == final.text == text
    assert (final.stop, final.finish_reason) == ("</tool_call>", "stop")
    assert final.completion_tokens == len(text.split())  # from the usage event
    assert one.bodies[0]["stream"] is True


async def test_request_body_and_stop_mapping():
    replies = iter([
        # vLLM style: stop_reason names the stop string
        {"text": '<tool_call>{"name": "x"}', "finish_reason": "stop", "stop_reason": "</tool_call>"},
        # vLLM style EOS: stop_reason is the EOS token id
        {"text": "The answer is 4.", "finish_reason": "stop", "stop_reason": 1},
        # no stop_reason (llama-cpp-python): inferred from the open tag
        {"text": "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n", "finish_reason": "stop"},
        # no stop_reason and nothing open: end of sequence
        {"text": "Done.", "finish_reason": "stop"},
        # a server that ignored the stop strings: cut at the first one
        {"text": "<tool_call>{}</tool_call> and more", "finish_reason": "length"},
        # an end-of-turn marker from the few-shot prompt: end of sequence
        {"text": "Bye.", "finish_reason": "stop", "stop_reason": "<end_of_turn>"},
        {"text": "abc", "finish_reason": "length"},
    ])
    fake = FakeCompletionsServer(lambda body: next(replies))
    try:
        backend = _backend(fake.url, api_key=None)
        stops = ["</tool_call>", "</Outlines>"]
        got = [await backend.complete("p", stop=stops, max_tokens=16, temperature=0.3) for _ in range(7)]
        assert (got[0].stop, got[0].finish_reason) == ("</tool_call>", "stop")
        assert (got[1].stop, got[1].finish_reason) == (None, "eos")
        assert (got[2].stop, got[2].finish_reason) == ("</Outlines>", "stop")
        assert (got[3].stop, got[3].finish_reason) == (None, "eos")
        assert (got[4].text, got[4].stop, got[4].finish_reason) == ("<tool_call>{}", "</tool_call>", "stop")
        assert (got[5].text, got[5].stop, got[5].finish_reason) == ("Bye.", None, "eos")
        assert (got[6].stop, got[6].finish_reason, got[6].completion_tokens) == (None, "length", 1)
        body = fake.bodies[0]
        assert body["prompt"] == "p" and body["max_tokens"] == 16 and body["temperature"] == 0.3
        assert body["model"] == "fake-model"
        assert body["stop"][:2] == stops and "<end_of_turn>" in body["stop"]  # few-shot end marker added
    finally:
        fake.close()


def test_infer_stop_picks_the_innermost_open_tag():
    stops = ["</tool_call>", "</Outlines>", "</Thread>"]
    assert infer_stop("x <Thread>1: look <tool_call>{", stops) == "</tool_call>"
    assert infer_stop("x <Thread>1: done", stops) == "</Thread>"
    assert infer_stop("<Thread>1: a</Thread> final", stops) is None
    assert infer_stop("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n", stops) == "</Outlines>"


def test_issue12_item4_spawn_stop_never_inferred_from_the_prompt():
    """A chat prompt whose instruction mentions an unclosed <Outlines>: a normal end is an end."""
    stops = ["</tool_call>", "</Outlines>", "</Thread>"]
    instruction = "When sub-tasks are independent, write <Parallel><Outlines> and one <Outline> per task.\n"
    prompt = f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\nCapital?<|im_end|>\n<|im_start|>assistant\n"
    assert infer_stop("Paris is the capital of France.", stops, prompt) is None
    # the generated text decides: a spawn it wrote, a tool call it opened
    assert infer_stop("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n", stops, prompt) == "</Outlines>"
    assert infer_stop("Let me look. <tool_call>{", stops, prompt) == "</tool_call>"
    # the runtime's own context tag at the end of a branch prompt: that branch's end
    assert infer_stop("done", stops, prompt + "x</Outlines>\n<Thread>1:") == "</Thread>"
    assert infer_stop("done", ["</Path>", "</Goal>"], "...</Goal>\n<Path>\n12:") == "</Path>"
    # a spawn marker's opener at the prompt's very end still does not make a spawn
    assert infer_stop("text", stops, prompt + "<Parallel>\n<Outlines>\n") is None


async def test_issue12_item4_chat_template_answer_is_not_a_spawn():
    """llama-cpp-python's server says finish_reason "stop" without stop_reason, for the end of turn too."""
    fake = FakeCompletionsServer(lambda body: {"text": "Paris is the capital of France.", "finish_reason": "stop"})
    try:
        backend = _backend(fake.url, render=lambda messages, tools: "unused")
        prompt = ("<|im_start|>system\nTo split work write <Parallel>\n<Outlines>\n<Outline>1: ...\n<|im_end|>\n"
                  "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
        c = await backend.complete(prompt, stop=["</tool_call>", "</Outlines>"], max_tokens=32)
        assert (c.text, c.stop, c.finish_reason) == ("Paris is the capital of France.", None, "eos")
        items = [x async for x in backend.stream(prompt, stop=["</tool_call>", "</Outlines>"], max_tokens=32)]
        assert (items[-1].stop, items[-1].finish_reason) == (None, "eos")
    finally:
        fake.close()


def test_constructor_validation():
    with pytest.raises(ValueError):
        OpenAICompatibleBackend([], "m")
    with pytest.raises(ValueError):
        OpenAICompatibleBackend(["http://a", "http://a"], "m")
    b = OpenAICompatibleBackend("http://h:1/v1/", "m", stream=False)
    assert b.endpoints == ["http://h:1/v1/completions"]
    assert getattr(b, "stream", None) is None  # the runtime then uses complete()
