"""OpenAICompatibleBackend's routing, failover and response mapping, against FAKE servers.

The servers here are stdlib HTTP fakes (``FakeCompletionsServer``), not models:
they test the HTTP client logic only. The same behaviour against a real engine
server is in test_openai_compat_llama_server.py.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from backend_servers import FakeCompletionsServer, free_port

from apr_agents.backends.base import BackendError, BackendUnavailable, route_key
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
    kw.setdefault("max_retries", 0)
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
    assert all(st["failures"] == 0 for st in backend.stats().values()), backend.stats()
    for k in keys:
        assert served[f"key={k}"] == {backend.replica_for(k)}, k
    # and the keys spread over the replicas (rendezvous hashing: 24 keys all on one of 3 replicas
    # has odds of about 1e-11 whatever the random ports; missing one replica, about 2e-4)
    assert sum(len(s.bodies) > 0 for s in fakes) >= 2
    assert sum(st["requests"] for st in backend.stats().values()) == 72


async def test_no_key_goes_round_robin(fakes):
    backend = _backend([s.url for s in fakes])
    for _ in range(6):
        await backend.complete("key=-", stop=[], max_tokens=4)
    assert [len(s.bodies) for s in fakes] == [2, 2, 2]


async def test_failover_on_http_500_then_stays_on_the_next_replica(fakes):
    backend = _backend([s.url for s in fakes], down_for_s=30)
    key = "run-x"
    home = backend.replica_for(key)
    bad = next(s for s in fakes if s.url == home)
    bad.mode = "500"
    c = await _call(backend, key)
    assert c.text == "served run-x"
    stats = backend.stats()
    assert stats[home]["failures"] == 1 and stats[home]["down"]
    fallback = {s.url for s in fakes if s.bodies and s is not bad}
    assert len(fallback) == 1
    # the key sticks to its fallback while home is down: home gets no new request
    for _ in range(3):
        await _call(backend, key)
    assert len(bad.bodies) == 1
    assert {s.url for s in fakes if s.bodies and s is not bad} == fallback


async def test_down_replica_is_tried_again_after_down_for_s(fakes):
    backend = _backend([s.url for s in fakes], down_for_s=0.3)
    key = "run-y"
    home = next(s for s in fakes if s.url == backend.replica_for(key))
    home.mode = "500"
    await _call(backend, key)
    home.mode = "ok"
    await _call(backend, key)
    assert len(home.bodies) == 1  # still down: skipped
    time.sleep(0.35)
    await _call(backend, key)
    assert len(home.bodies) == 2  # back in rotation, and first again for its key
    assert not backend.stats()[home.url]["down"]


async def test_failover_on_connection_refused_and_timeout_and_drop(fakes):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    hang, drop, good = fakes
    hang.mode, hang.hang_s = "hang", 30.0  # far past the timeout: a slow machine cannot blur the two
    drop.mode = "drop"
    backend = _backend([dead, hang.url, drop.url, good.url], timeout_s=2.0)
    # Ports are random, so hashing decides which replica a key tries first. Pick
    # one key homed on each failing replica, so each is tried before any other
    # failure marks it down, whatever the ports; then two keys homed on `good`.
    keys = [_key_homed_on(backend, url) for url in (dead, hang.url, drop.url)]
    keys += [_key_homed_on(backend, good.url, skip=i) for i in range(2)]
    for key in keys:
        c = await _call(backend, key)
        assert c.text == f"served {key}"
    stats = backend.stats()
    assert stats[dead]["failures"] >= 1 and "ConnectError" in stats[dead]["last_error"]
    assert stats[hang.url]["failures"] >= 1 and "Timeout" in stats[hang.url]["last_error"]
    assert stats[drop.url]["failures"] >= 1
    assert stats[good.url]["ok"] == len(keys)
    assert stats[good.url]["failures"] == 0


async def test_all_replicas_failing_raises_unavailable_naming_each(fakes):
    for s in fakes:
        s.mode = "500"
    dead = f"http://127.0.0.1:{free_port()}"
    backend = _backend([*(s.url for s in fakes), dead], max_retries=1)
    with pytest.raises(BackendUnavailable) as err:
        await _call(backend, "k")
    msg = str(err.value)
    for url in [*(s.url for s in fakes), dead]:
        assert url in msg
    assert "HTTP 500" in msg and "2 pass(es)" in msg
    assert all(len(s.bodies) == 2 for s in fakes)  # one try per pass


async def test_client_error_is_not_failed_over(fakes):
    backend = _backend([s.url for s in fakes])
    home = next(s for s in fakes if s.url == backend.replica_for("k"))
    home.mode = "400"
    with pytest.raises(BackendError) as err:
        await _call(backend, "k")
    assert not isinstance(err.value, BackendUnavailable)
    assert "HTTP 400" in str(err.value)
    assert sum(len(s.bodies) for s in fakes) == 1
    assert not backend.stats()[home.url]["down"]


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


async def test_stream_pieces_usage_and_failover_before_first_piece(fakes):
    text = "<tool_call>{\"name\": \"lookup\", \"arguments\": {}}"
    for s in fakes:
        s.reply = lambda body: {"text": text, "finish_reason": "stop"}
    first, second, _ = fakes
    first.mode = "500"
    backend = _backend([first.url, second.url])
    items = [x async for x in backend.stream("p", stop=["</tool_call>"], max_tokens=32)]
    final = items[-1]
    assert "".join(items[:-1]) == final.text == text
    assert (final.stop, final.finish_reason) == ("</tool_call>", "stop")
    assert final.completion_tokens == len(text.split())  # from the usage event
    assert len(first.bodies) == 1 and len(second.bodies) == 1
    assert second.bodies[0]["stream"] is True


async def test_stream_cut_short_is_an_error_not_a_short_answer(fakes):
    only = fakes[0]
    only.reply = lambda body: {"text": "one two three four five six", "finish_reason": "length"}
    only.mode = "cut"
    backend = _backend([only.url])
    with pytest.raises(BackendError, match="broke after it started"):
        async for _ in backend.stream("p", stop=[], max_tokens=32):
            pass


def test_infer_stop_picks_the_innermost_open_tag():
    stops = ["</tool_call>", "</Outlines>", "</Thread>"]
    assert infer_stop("x <Thread>1: look <tool_call>{", stops) == "</tool_call>"
    assert infer_stop("x <Thread>1: done", stops) == "</Thread>"
    assert infer_stop("<Thread>1: a</Thread> final", stops) is None
    assert infer_stop("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n", stops) == "</Outlines>"


def test_constructor_validation():
    with pytest.raises(ValueError):
        OpenAICompatibleBackend([], "m")
    with pytest.raises(ValueError):
        OpenAICompatibleBackend(["http://a", "http://a"], "m")
    b = OpenAICompatibleBackend("http://h:1/v1/", "m", stream=False)
    assert b.replicas[0].endpoint == "http://h:1/v1/completions"
    assert getattr(b, "stream", None) is None  # the runtime then uses complete()
