"""The OpenAI-compatible server: API schema, validation, auth, the queue, cancellation, the real process.

Everything runs on a tiny random model quantized into a .bitdial artifact (full vocabulary, so the chat
template tokenizes in range; about a second to build), with a few tokens per request.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra (fastapi, uvicorn)")
try:
    from fastapi.testclient import TestClient
except (ImportError, RuntimeError) as e:  # starlette's TestClient needs httpx
    pytest.skip(f"FastAPI's TestClient needs httpx: {e}", allow_module_level=True)

from bitdial.runtime.engine import Engine
from bitdial.serving import worker as worker_mod
from bitdial.serving.app import ServerConfig, create_app
from bitdial.serving.errors import ApiError
from bitdial.serving.precision import (ControlAdapter, PrecisionBackend, PrecisionGovernor, backend_for,
                                       probe_latency, probe_thread_latency)
from bitdial.serving.schemas import BitdialOptions

from conftest import make_tiny

USER = [{"role": "user", "content": "Why is the sky blue?"}]
MAX_BITS = 6


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, default_gguf) -> Path:
    from bitdial.artifact import QuantSettings, write_artifact
    from bitdial.loading import load_model

    tok = load_model(default_gguf).tokenizer  # the real tokenizer; the tensors are not read
    out = tmp_path_factory.mktemp("serve") / "tiny.bitdial"
    write_artifact(make_tiny(tok, seed=11), out, QuantSettings(group_size=32, max_bits=MAX_BITS, clip="none"),
                   progress=False, source_hash=False)
    return out


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine.load(tiny_artifact)


@contextmanager
def serve(engine, governor=None, **config):
    app = create_app(engine, ServerConfig(model_id="tiny", **config), governor=governor)
    with TestClient(app) as client:
        client.app_state = app.state
        yield client


@pytest.fixture
def client(engine):
    with serve(engine) as c:
        yield c


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes at least 10 ms longer, so a cancellation lands mid-generation."""
    real = worker_mod.stream_generate

    def slow(model, tok, ids, params, result, *, step_hook=None, cancel=None):
        def hook(info):
            time.sleep(0.01)
            if step_hook is not None:
                step_hook(info)

        return real(model, tok, ids, params, result, step_hook=hook, cancel=cancel)

    monkeypatch.setattr(worker_mod, "stream_generate", slow)


def sse_events(lines) -> list:
    """Parse an SSE body: every event is one 'data: ' line followed by a blank line."""
    events, blank_expected = [], False
    for line in lines:
        if blank_expected:
            assert line == "", f"an SSE event must end with a blank line, got {line!r}"
            blank_expected = False
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
        blank_expected = True
    return events


def wait_for(cond, timeout=10.0, what="condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# ------------------------------------------------------------------------------------------ schema
def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list" and len(data["data"]) == 1
    card = data["data"][0]
    assert card["id"] == "tiny" and card["object"] == "model" and isinstance(card["created"], int)
    assert card["bitdial"]["precision"] == "static"
    assert card["bitdial"]["targets"][-1] == MAX_BITS
    assert card["bitdial"]["context_length"] == 512
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert_error(client.get("/v1/models/gpt-4"), 404, param="model", code="model_not_found")
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["queue_depth"] == 0 and h["busy"] is False
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_chat_completion(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 6,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-") and d["model"] == "tiny"
    (choice,) = d["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = d["usage"]
    assert u["prompt_tokens"] > 10 and 1 <= u["completion_tokens"] <= 6
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    b = d["bitdial"]
    assert b["realized_bits"] == pytest.approx(MAX_BITS)  # as loaded: every module at its maximum
    assert b["precision"] == "static" and b["policy"] == "fixed"
    assert b["prefill_ms"] > 0 and b["queue_ms"] >= 0
    if b["decode_steps"]:
        assert b["decode_tokens_per_s"] > 0 and b["ms_per_token_p95"] >= b["ms_per_token_p50"] > 0
    assert b["latency_target_misses"] == 0


def test_chat_stream_matches_non_stream(client):
    body = {"messages": USER, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert final["bitdial"]["realized_bits"] == pytest.approx(MAX_BITS)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == full["choices"][0]["message"]["content"]


def test_completions(client):
    r = client.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 4, "temperature": 0,
                                             "ignore_eos": True, "echo": True})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "text_completion" and d["id"].startswith("cmpl-")
    (choice,) = d["choices"]
    assert choice["text"].startswith("The sky is") and choice["finish_reason"] == "length"
    assert d["usage"]["completion_tokens"] == 4
    # token ids as the prompt, streamed; the default max_tokens of /v1/completions is 16
    with client.stream("POST", "/v1/completions", json={"prompt": [504, 3476, 314], "stream": True,
                                                        "temperature": 0, "ignore_eos": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["bitdial"]["decode_steps"] == 15  # 16 tokens: the first comes from the prefill


def test_metrics_text(client):
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": "3"})
    text = client.get("/metrics").text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="[^"]*",?)*\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$')
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")), line
            continue
        assert sample.match(line), f"not a Prometheus sample: {line!r}"
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    assert values["bitdial_generated_tokens_total"] >= 3
    assert values['bitdial_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values['bitdial_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert values["bitdial_queue_depth"] == 0
    assert values['bitdial_realized_bits{window="last"}'] == pytest.approx(MAX_BITS)
    assert values['bitdial_decode_tokens_per_second{window="last"}'] > 0
    for name in ("bitdial_latency_target_misses_total", "bitdial_requests_cancelled_total"):
        assert name in values


# -------------------------------------------------------------------------------------- precision
def test_target_bits_per_request(client):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "ignore_eos": True,
                                                  "bitdial": {"target_bits": 3}})
    b = r.json()["bitdial"]
    assert b["target"] == 3 and b["targets_used"] == [3] and b["realized_bits"] == pytest.approx(3)
    # the next request runs as loaded again
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "ignore_eos": True})
    assert r.json()["bitdial"]["realized_bits"] == pytest.approx(MAX_BITS)
    # a latency target nobody can meet: every decode step is a miss, counted per response and in /metrics
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "ignore_eos": True,
                                                  "bitdial": {"max_ms_per_token": 1e-6, "target_bits": 4}})
    b = r.json()["bitdial"]
    assert b["latency_target_misses"] == b["decode_steps"] == 3 and b["max_ms_per_token"] == 1e-6
    assert "bitdial_latency_target_misses_total 3" in client.get("/metrics").text


def test_adaptive_policy_without_controller_degrades(client):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2,
                                                  "bitdial": {"policy": "bandit", "max_ms_per_token": 50}})
    b = r.json()["bitdial"]
    assert r.status_code == 200 and b["policy"] == "fixed" and "not available" in b["reason"]


def test_controller_chooses_targets(engine):
    pytest.importorskip("bitdial.control", reason="the precision controller (bitdial.control) is not built yet")
    backend = backend_for(engine)
    latency = probe_latency(engine.model, backend, steps=3)
    assert set(latency) == set(backend.targets) and all(v > 0 for v in latency.values())
    control = ControlAdapter.create(backend.targets, latency)
    assert control is not None
    gov = PrecisionGovernor(backend, control=control)
    with serve(engine, governor=gov) as c:
        def run(opts):
            r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 6, "ignore_eos": True,
                                                     "bitdial": opts})
            assert r.status_code == 200, r.text
            return r.json()["bitdial"]

        loose = run({"policy": "rule", "max_ms_per_token": 10_000})
        assert loose["policy"] == "rule" and loose["target"] == backend.targets[-1] and loose["reason"]
        tight = run({"max_ms_per_token": 1e-3, "min_bits": 4})  # a latency target alone means "rule"
        assert tight["policy"] == "rule" and min(tight["targets_used"]) >= 4
        assert tight["realized_bits"] >= 4 - 1e-9
        assert c.get("/v1/models").json()["data"][0]["bitdial"]["controller"] is True


def test_controller_runs_a_request_on_the_free_cores(engine):
    """A replayed device state with one of two cores busy: the request runs on 1 thread (its prefill too),
    the response says so, and the server's thread count is back afterwards."""
    control_mod = pytest.importorskip("bitdial.control")
    backend = backend_for(engine)
    latency = probe_latency(engine.model, backend, steps=3)
    one = probe_thread_latency(engine.model, backend, [1], steps=3)
    assert set(one) == {1} and set(one[1]) == set(backend.targets)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # the server's count, whatever this machine has
    busy = [{"t": 0, "per_cpu_util": [1.0, 0.0], "cpu_count": 2, "self_cpu_cores": 0.0}]
    ctl = control_mod.Controller(backend.targets, latency, control_mod.ControlConfig(threads=2, adapt_threads=True),
                                 thread_latency_ms=one)
    control = ControlAdapter(ctl, control_mod.Telemetry.replay(busy), control_mod.RequestConstraints)
    seen = []
    gov = PrecisionGovernor(backend, control=control)
    with serve(engine, governor=gov) as c:
        orig = engine.model.forward

        def spy(*a, **k):  # the thread count the model actually runs with (prefill and decode)
            seen.append(torch.get_num_threads())
            return orig(*a, **k)

        engine.model.forward = spy
        try:
            r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "ignore_eos": True,
                                                     "bitdial": {"policy": "rule", "max_ms_per_token": 10_000}})
        finally:
            del engine.model.forward
        assert r.status_code == 200, r.text
        b = r.json()["bitdial"]
        assert b["threads"] == 1 and "1 thread (1.0 of 2 cores free)" in b["reason"]
        assert re.search(r"^bitdial_request_threads 1$", c.get("/metrics").text, re.M)
    try:
        assert seen and seen[0] == 1  # the prefill ran on one thread
        assert torch.get_num_threads() == 2  # restored after the request
    finally:
        torch.set_num_threads(threads_before)


class FakeDynamicEngine:
    """The dynamic-precision engine interface (``targets``, ``set_target``) over the tiny static model:
    a target t runs every decoder linear at floor(t) bits, and every call is recorded."""

    def __init__(self, engine):
        self.model, self.tokenizer, self.source = engine.model, engine.tokenizer, engine.source
        self.static = backend_for(engine)
        self.targets = [2.5, 3.0, 3.5, 4.0]
        self.calls = []

    def set_target(self, t):
        self.calls.append(t)
        self.static.apply(None if t is None else float(int(t)))


def test_dynamic_engine_targets(engine):
    fake = FakeDynamicEngine(engine)
    backend = backend_for(fake)
    assert backend.kind == "dynamic" and backend.targets == [2.5, 3.0, 3.5, 4.0]
    with serve(fake, governor=PrecisionGovernor(backend, default_target=3.0)) as c:
        card = c.get("/v1/models").json()["data"][0]["bitdial"]
        assert card["precision"] == "dynamic" and card["default_target"] == 3.0
        fake.calls.clear()
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True,
                                            "bitdial": {"target_bits": 3.6}})
        b = r.json()["bitdial"]
        assert b["precision"] == "dynamic" and b["target"] == 3.5 and b["realized_bits"] == pytest.approx(3)
        assert fake.calls == [3.5, 3.0]  # the request's target, then the server's default again
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "bitdial": {"target_bits": 2}})
        assert_error(r, 400, param="bitdial.target_bits")  # below 2.5 - 0.25
    fake.static.apply(None)


def test_governor_validation():
    static = PrecisionBackend()
    static.kind, static.targets = "static", [2.0, 3.0, 4.0]
    gov = PrecisionGovernor(static)
    assert gov.plan(BitdialOptions(target_bits=3.4)).target_bits == 3.0  # nearest available target
    assert gov.plan(None).policy == "fixed"
    for opts, param in [(BitdialOptions(target_bits=9), "bitdial.target_bits"),
                        (BitdialOptions(min_bits=5), "bitdial.min_bits"),
                        (BitdialOptions(target_bits=2, min_bits=3), "bitdial.target_bits"),
                        (BitdialOptions(target_bits=3, policy="rule"), "bitdial.policy")]:
        with pytest.raises(ApiError) as e:
            gov.plan(opts)
        assert e.value.status == 400 and e.value.param == param
    with pytest.raises(ApiError, match="cannot be chosen"):
        PrecisionGovernor(PrecisionBackend()).plan(BitdialOptions(target_bits=4))


# ------------------------------------------------------------------------------------- validation
BAD_BODIES = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"", None),
    (b'"text"', None),
    (b"[" * 100_000, None),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    (json.dumps({"messages": []}), "messages"),
    (json.dumps({"model": "tiny"}), "messages"),
    (json.dumps({"messages": "hello"}), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
     "messages[0].content"),
    (json.dumps({"messages": USER, "max_tokens": "5"}), "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": 2.5}), "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": 0}), "max_tokens"),
    (json.dumps({"messages": USER, "temperature": "hot"}), "temperature"),
    (json.dumps({"messages": USER, "temperature": -1}), "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    (json.dumps({"messages": USER, "top_p": 0}), "top_p"),
    (json.dumps({"messages": USER, "stream": "yes"}), "stream"),
    (json.dumps({"messages": USER, "stop": 5}), "stop"),
    (json.dumps({"messages": USER, "seed": 2 ** 70}), "seed"),
    (json.dumps({"messages": USER, "n": 2}), "n"),
    (json.dumps({"messages": USER, "presence_penalty": 0.5}), "presence_penalty"),
    (json.dumps({"messages": USER, "tools": [{"type": "function"}]}), "tools"),
    (json.dumps({"messages": USER, "logprobs": True}), "logprobs"),
    (json.dumps({"messages": USER, "bitdial": 4}), "bitdial"),
    (json.dumps({"messages": USER, "bitdial": {"target_bit": 4}}), "bitdial.target_bit"),
    (json.dumps({"messages": USER, "bitdial": {"target_bits": "4"}}), "bitdial.target_bits"),
    (json.dumps({"messages": USER, "bitdial": {"target_bits": 12}}), "bitdial.target_bits"),
    (json.dumps({"messages": USER, "bitdial": {"policy": "greedy"}}), "bitdial.policy"),
    (json.dumps({"messages": USER, "bitdial": {"max_ms_per_token": -3}}), "bitdial.max_ms_per_token"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[f"bad{i}" for i in range(len(BAD_BODIES))])
def test_bad_chat_requests_are_400(client, body, param):
    err = assert_error(client.post("/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


def test_bad_completion_requests_are_400(client):
    for body, param in [({"prompt": 5}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": []}, "prompt"),
                        ({"prompt": [10 ** 9]}, "prompt"), ({"prompt": "x", "suffix": "y"}, "suffix"),
                        ({"prompt": "x", "best_of": 3}, "best_of"), ({}, "prompt")]:
        assert_error(client.post("/v1/completions", json=body), 400, param=param)


def test_limits(engine):
    with serve(engine, max_prompt_tokens=40, max_tokens_limit=16) as c:
        long_chat = [{"role": "user", "content": "blue sky " * 40}]
        assert_error(c.post("/v1/chat/completions", json={"messages": long_chat}), 400,
                     param="messages", code="context_length_exceeded")
        err = assert_error(c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 17}), 400,
                           param="max_tokens")
        assert "limit of 16" in err["message"]
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 16}).status_code == 200
    with serve(engine, max_tokens_limit=1024) as c:  # prompt + max_tokens over the context of 512
        err = assert_error(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 600}), 400,
                           param="max_tokens", code="context_length_exceeded")
        assert "context of 512" in err["message"]
    with serve(engine, max_body_bytes=1000) as c:
        assert_error(c.post("/v1/completions", json={"prompt": "x" * 2000}), 413)


def test_api_key(engine):
    with serve(engine, api_key="s3cret") as c:
        assert c.get("/health").status_code == 200  # liveness probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert_error(c.get("/v1/models", headers=headers), 401, code="invalid_api_key")
            assert_error(c.post("/v1/completions", json={"prompt": "x"}, headers=headers), 401)
        assert_error(c.get("/metrics"), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=ok).status_code == 200


# ------------------------------------------------------------------------------- queue, cancellation
def test_queue_full_is_429(engine):
    with serve(engine, max_queue=1) as c:
        worker = c.app_state.worker
        first = {}
        with worker.hold():
            t = threading.Thread(target=lambda: first.update(r=c.post(
                "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})))
            t.start()
            wait_for(lambda: worker.queue_depth == 1, what="the first request to be queued")
            r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
            err = assert_error(r, 429, code="queue_full")
            assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
            assert_error(c.post("/v1/chat/completions", json={"messages": USER, "stream": True}), 429)
            assert c.get("/health").json()["queue_depth"] == 1
        t.join(10)
        assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 2
        assert 'status="429"} 2' in c.get("/metrics").text


def test_stream_disconnect_cancels_generation(engine, slow_steps):
    with serve(engine) as c:
        worker = c.app_state.worker
        t0 = time.monotonic()
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": USER, "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            for line in lines:
                if '"content"' in line:  # the first generated text: now hang up
                    break
        wait_for(lambda: worker.last_job is not None and not worker.busy, what="the generation to stop")
        job = worker.last_job
        assert job.result.finish_reason == "cancelled"
        assert job.result.completion_tokens < 100 and time.monotonic() - t0 < 2.5  # 300 steps take >= 3 s
        assert "bitdial_requests_cancelled_total 1" in c.get("/metrics").text


@contextmanager
def live_server(app):
    """The app behind a real uvicorn server on a free port (disconnects need real sockets)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: server.started, what="uvicorn to start")
        yield port
    finally:
        server.should_exit = True
        t.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_post(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_non_stream_disconnect_cancels_generation(engine, slow_steps):
    app = create_app(engine, ServerConfig(model_id="tiny"))
    worker = app.state.worker
    with live_server(app) as port:
        s = raw_post(port, "/v1/chat/completions", {"messages": USER, "max_tokens": 300, "ignore_eos": True})
        wait_for(lambda: worker.busy, what="the generation to start")
        time.sleep(0.2)
        s.close()
        wait_for(lambda: worker.last_job is not None and not worker.busy, what="the generation to stop")
        assert worker.last_job.result.finish_reason == "cancelled"
        assert worker.last_job.result.completion_tokens < 100


def test_queued_request_is_dropped_on_disconnect(engine):
    app = create_app(engine, ServerConfig(model_id="tiny", max_queue=4))
    worker = app.state.worker
    with live_server(app) as port:
        with worker.hold():
            streaming = raw_post(port, "/v1/chat/completions", {"messages": USER, "max_tokens": 4, "stream": True})
            plain = raw_post(port, "/v1/completions", {"prompt": "Hi", "max_tokens": 4})
            wait_for(lambda: worker.queue_depth == 2, what="two queued requests")
            streaming.close()
            plain.close()
            wait_for(lambda: worker.queue_depth == 0, what="the queue to drop both requests")
        assert worker.jobs_done == 0  # neither ever ran
        assert app.state.metrics.cancelled == 2


# ------------------------------------------------------------------------------ the real process
@contextmanager
def bitdial_serve(args: list[str], log_path: Path, env: dict[str, str]):
    """A `bitdial serve` process, stopped with SIGTERM (as a service manager would) on exit."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bitdial", "serve", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise


def test_bitdial_serve_with_openai_client(tiny_artifact, tmp_path):
    openai = pytest.importorskip("openai", reason="the official openai client is not installed")
    port = free_port()
    log_path = tmp_path / "serve.log"
    args = [str(tiny_artifact), "--port", str(port), "--model-name", "tiny", "--threads", "1",
            "--max-tokens-limit", "64"]
    with bitdial_serve(args, log_path, dict(os.environ, BITDIAL_API_KEY="test-key")) as proc:
        def up():
            assert proc.poll() is None, f"bitdial serve exited: {log_path.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(up, timeout=90, what="bitdial serve to answer /health")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0)
        assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
        assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
        assert r.model_extra["bitdial"]["realized_bits"] == pytest.approx(MAX_BITS)
        stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"bitdial": {"target_bits": 4}})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[0].choices[0].delta.role == "assistant" and isinstance(text, str)
        assert chunks[-1].usage.total_tokens == r.usage.prompt_tokens + chunks[-1].usage.completion_tokens
        assert chunks[-1].model_extra["bitdial"]["realized_bits"] == pytest.approx(4)
        c = client.completions.create(model="tiny", prompt="The sky is", max_tokens=3)
        assert c.choices[0].text is not None and c.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError, match="limit of 64"):
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=65)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    out = log_path.read_text()
    # uvicorn shuts down gracefully on SIGTERM, then exits by the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "shutdown complete" in out, out
