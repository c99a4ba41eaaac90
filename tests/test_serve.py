"""`python -m runtime serve` against its oracles: the official `openai` client talks to a live server
on 127.0.0.1 that serves the demo artifact, and every completion is compared with
`runtime.load(...).generate` on the same prompt alone (greedy, stop strings, seeded sampling),
logprobs with `Model.score`. Also: concurrent clients, a client that drops its stream, every bad
request, a full queue, graceful shutdown, and the CLI in a subprocess.

Over 400 lines because the checks share one live server (a module fixture) and its helpers."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")

import runtime  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.background import BackgroundServer  # noqa: E402
from runtime.serve.slots import SlotCache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "demo"
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "All:",
           "To be, or not to be, that is the question", "KING RICHARD III:\nNow is the winter",
           "O", "JULIET:\nWherefore", "Speak, speak."]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The embedded Shakespeare model exported once per test process (tests/demo.py)."""
    from demo import demo_artifact

    return demo_artifact("arith")


@pytest.fixture(scope="module")
def model(demo_dir):
    return runtime.load(demo_dir, provider="cpu", graph="kv", threads=1)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, name=NAME, max_batch=8)
    with BackgroundServer(app) as s:
        s.app = app
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def slow_steps(monkeypatch, app, seconds: float) -> None:
    """Make each decode step of this app's scheduler take `seconds` longer (the demo model is so
    fast that a stream would end before a client could act on it)."""
    cache = app.state.served.scheduler.cache
    step = cache.step

    def slow(tokens):
        time.sleep(seconds)
        return step(tokens)

    monkeypatch.setattr(cache, "step", slow)


def metric(server, name: str, labels: str = "") -> float:
    text = _get(server, "/metrics")[1]
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _get(server, path: str) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read().decode()


def _post(server, path: str, body: bytes | dict) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, data, {"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


# -- the slot cache alone --------------------------------------------------------------------------
def test_slot_cache_rows_joining_and_leaving_match_generate_alone(model):
    """Prompts prefilled into their own rows at different steps, decoded together, rows compacted
    when one leaves: each row's greedy tokens are those of generate on that prompt alone."""
    want = [model.generate(p, max_new_tokens=24).ids for p in PROMPTS[:4]]
    cache = SlotCache.from_model(model, max_batch=4)
    rows: list[tuple[int, list[int]]] = []  # (prompt index, tokens), row r of the cache = rows[r]
    done: dict[int, list[int]] = {}
    for t in range(200):
        if t % 5 == 0 and t // 5 < 4:
            i = t // 5
            rows.append((i, [int(cache.prefill(len(rows), model.encode(PROMPTS[i])).argmax())]))
        if not rows:
            break
        logits = cache.step(np.asarray([ids[-1] for _, ids in rows]))
        for r, (_, ids) in enumerate(rows):
            ids.append(int(logits[r].argmax()))
        for r in reversed(range(len(rows))):
            i, ids = rows[r]
            if len(ids) == 12 + 4 * i:  # leave at different times; the last row moves into the hole
                done[i] = ids
                last = len(rows) - 1
                if r != last:
                    cache.move(last, r)
                    rows[r] = rows[last]
                rows.pop()
                cache.free(last)
    assert sorted(done) == [0, 1, 2, 3]
    for i, ids in done.items():
        assert ids == want[i][: len(ids)], f"prompt {i}"


def test_slot_cache_batched_prefill_of_unequal_prompts_matches_generate_alone(model):
    """Three prompts of different lengths prefilled together (right-padded) into rows 1-3 while row
    0 holds another request: every row continues as generate does on its prompt alone."""
    want = [model.generate(p, max_new_tokens=17).ids for p in PROMPTS[:4]]
    cache = SlotCache.from_model(model, max_batch=4)
    rows = [[int(cache.prefill(0, model.encode(PROMPTS[0])).argmax())]]
    rows[0].append(int(cache.step(np.asarray([rows[0][-1]]))[0].argmax()))
    first = cache.prefill_rows(1, [model.encode(p) for p in PROMPTS[1:4]])
    rows += [[int(t)] for t in first.argmax(-1)]
    while len(rows[1]) < 16:
        logits = cache.step(np.asarray([r[-1] for r in rows]))
        for r, ids in enumerate(rows):
            ids.append(int(logits[r].argmax()))
    assert [len(r) for r in rows] == [17, 16, 16, 16]
    for i, ids in enumerate(rows):
        assert ids == want[i][: len(ids)], f"prompt {i}"


# -- completions -----------------------------------------------------------------------------------
def test_greedy_equals_generate_streaming_and_not(client, model):
    for p in PROMPTS[:3]:
        want = model.generate(p, max_new_tokens=40)
        r = client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0)
        assert r.choices[0].text == want.text
        assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert r.usage.prompt_tokens == len(model.encode(p)) and r.usage.completion_tokens == len(want.ids)
        assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == NAME
        chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert len(chunks) > 5, "a stream hands out text as it is generated"
        assert [c.choices[0].finish_reason for c in chunks][-1] == r.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_token_id_prompts_lists_n_echo_and_usage_chunk(client, model):
    ids = model.encode(PROMPTS[1])
    want = model.generate(ids, max_new_tokens=16).text
    r = client.completions.create(model=NAME, prompt=[ids, model.encode(PROMPTS[2])], max_tokens=16, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == want
    assert r.choices[2].text == model.generate(PROMPTS[2], max_new_tokens=16).text
    e = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    assert e.choices[0].text == PROMPTS[0] + model.generate(PROMPTS[0], max_new_tokens=8).text
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stop_strings_end_the_text_as_generate_does(client, model):
    p = PROMPTS[0]
    full = model.generate(p, max_new_tokens=40).text
    stop = full[12:15]  # a piece in the middle of the greedy text (may span tokens)
    want = model.generate(p, max_new_tokens=40, stop=[stop, "no such text"])
    assert want.finish_reason == "stop" and stop not in want.text
    r = client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0, stop=[stop, "no such text"])
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_generate(client, model):
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=32, temperature=0.9, top_p=0.95, extra_body={"top_k": 50})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    want = model.generate(PROMPTS[0], max_new_tokens=32, do_sample=True, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    assert a == b == want.text
    assert c != a, "another seed draws another text"


def test_logprobs_equal_score(client, model):
    r = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    gen = model.generate(PROMPTS[3], max_new_tokens=10)
    ref = model.score(model.encode(PROMPTS[3]) + gen.ids).token_logprobs[-10:]
    np.testing.assert_allclose(lp.token_logprobs, ref, atol=1e-4)
    assert all(len(t) == 3 and max(t.values()) == pytest.approx(x, abs=1e-6)  # greedy: the chosen token is the top one
               for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens) == r.choices[0].text


def test_eight_concurrent_clients_each_get_their_solo_greedy_text(client, model, server):
    lengths = [24, 40, 16, 48, 32, 20, 44, 28]
    want = [model.generate(p, max_new_tokens=n).text for p, n in zip(PROMPTS, lengths)]
    steps_before = metric(server, "tablefree_decode_batch_size_count")
    rows_before = metric(server, "tablefree_decode_batch_size_sum")
    timed_before = metric(server, "tablefree_decode_step_seconds_count")
    seconds_before = metric(server, "tablefree_decode_step_seconds_sum")

    def ask(i: int) -> str:
        kw = dict(model=NAME, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    for i in range(8):
        assert got[i] == want[i], f"client {i}"
    steps = metric(server, "tablefree_decode_batch_size_count") - steps_before
    rows = metric(server, "tablefree_decode_batch_size_sum") - rows_before
    assert rows / steps > 1.5, "the requests were decoded in shared steps (continuous batching)"
    # every decode step is timed once (the aggregate decode throughput is rows / these seconds)
    assert metric(server, "tablefree_decode_step_seconds_count") - timed_before == steps
    assert metric(server, "tablefree_decode_step_seconds_sum") > seconds_before


@pytest.mark.parametrize("budget", [1, 3])
def test_prefill_budget_and_prompts_in_pieces_still_give_solo_texts(model, budget):
    """--max-prefill-tokens: between two decode steps at most `budget` prompt tokens go in (whole
    prompts that fit, a longer prompt in pieces), so arrivals barely stall the running streams;
    every text stays generate's on the prompt alone."""
    app = create_app(model, name=NAME, max_batch=4, max_prefill_tokens=budget)
    want = [model.generate(p, max_new_tokens=20).text for p in PROMPTS[:4]]
    cache = app.state.served.scheduler.cache
    fed: list[int] = []  # prompt tokens per call, after the warm-up
    prefill, extend = cache.prefill_rows, cache.extend
    cache.prefill_rows = lambda start, prompts: (fed.append(sum(map(len, prompts))), prefill(start, prompts))[1]
    cache.extend = lambda slot, ids: (fed.append(len(ids)), extend(slot, ids))[1]
    with BackgroundServer(app) as s:
        fed.clear()
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: c.completions.create(model=NAME, prompt=p, max_tokens=20,
                                                               temperature=0).choices[0].text, PROMPTS[:4]))
    assert got == want
    lengths = sorted(len(model.encode(p)) for p in PROMPTS[:4])
    assert sum(fed) == sum(lengths)
    assert max(fed) <= budget and len(fed) > 4, "the long prompts went in pieces"


def test_dropped_stream_frees_its_slot_at_once(server, monkeypatch):
    slow_steps(monkeypatch, server.app, 0.02)
    tokens_before = metric(server, "tablefree_generation_tokens_total")
    cancelled_before = metric(server, "tablefree_requests_total", '{finish="cancelled"}')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "ROMEO:", "max_tokens": 200,
                                                        "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    assert metric(server, "tablefree_active_slots") == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_for(lambda: metric(server, "tablefree_active_slots") == 0, 5), "the slot was not freed"
    assert metric(server, "tablefree_requests_total", '{finish="cancelled"}') == cancelled_before + 1
    produced = metric(server, "tablefree_generation_tokens_total") - tokens_before
    assert produced < 100, f"{produced} tokens of 200: the dropped request kept running"


def test_dropped_non_streaming_request_is_cancelled(server, monkeypatch):
    slow_steps(monkeypatch, server.app, 0.02)
    cancelled_before = metric(server, "tablefree_requests_total", '{finish="cancelled"}')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "ROMEO:", "max_tokens": 200,
                                                        "temperature": 0}), {"Content-Type": "application/json"})
    assert wait_for(lambda: metric(server, "tablefree_active_slots") == 1, 5)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_for(lambda: metric(server, "tablefree_active_slots") == 0, 5), "the slot was not freed"
    assert metric(server, "tablefree_requests_total", '{finish="cancelled"}') == cancelled_before + 1


def test_a_failing_step_fails_requests_with_500_and_health_503(model, monkeypatch):
    app = create_app(model, name=NAME, max_batch=2)

    def broken(tokens):
        raise RuntimeError("injected ONNX Runtime failure")

    with BackgroundServer(app) as s:
        monkeypatch.setattr(app.state.served.scheduler.cache, "step", broken)
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError, match="injected"):
            c.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5, temperature=0)
        status, body = _get(s, "/health")
        assert status == 503 and "injected" in body
        with pytest.raises(openai.APIStatusError) as e:  # refused at once, not queued forever
            c.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5, temperature=0)
        assert e.value.status_code == 503


BAD = [  # (body, status, param)
    ({"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),  # wrong type
    ({"model": NAME, "prompt": "x", "temperature": True}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": NAME, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),  # unknown field
    ({"model": NAME, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),  # over the context
    ({"model": NAME, "prompt": "x" * 3000}, 400, "prompt"),  # the prompt alone is over it
    ({"model": NAME, "prompt": ""}, 400, "prompt"),
    ({"model": NAME, "prompt": []}, 400, "prompt"),
    ({"model": NAME, "prompt": ["ok", ""]}, 400, "prompt"),
    ({"model": NAME, "prompt": [1, -1]}, 400, "prompt"),  # bad token ids
    ({"model": NAME, "prompt": [65536]}, 400, "prompt"),
    ({"model": NAME, "prompt": [1, 2.5]}, 400, "prompt"),
    ({"model": NAME, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "stop": ""}, 400, "stop"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, body, status, param):
    got, err = _post(server, "/v1/completions", body)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert err["error"]["param"] == param
    got, ok = _post(server, "/v1/completions", {"model": NAME, "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0})
    assert got == 200 and ok["choices"][0]["finish_reason"] == "length"


def test_bad_request_through_the_client_and_chat_endpoint(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=NAME, prompt="x", top_p=2.0)
    with pytest.raises(openai.BadRequestError, match="chat template") as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "no_chat_template"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_models_health_metrics(client, server, model):
    ms = client.models.list().data
    assert [m.id for m in ms] == [NAME] and ms[0].max_model_len == model.context_length
    status, body = _get(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, text = _get(server, "/metrics")
    for name in ("tablefree_requests_total", "tablefree_generation_tokens_total", "tablefree_prompt_tokens_total",
                 "tablefree_queue_depth", "tablefree_active_slots", "tablefree_time_to_first_token_seconds_bucket",
                 "tablefree_inter_token_latency_seconds_bucket", "tablefree_decode_batch_size_bucket",
                 "tablefree_decode_step_seconds_bucket"):
        assert name in text, name


def test_full_queue_answers_429_and_the_rest_complete(model, monkeypatch):
    app = create_app(model, name=NAME, max_batch=1, max_queue=1)
    slow_steps(monkeypatch, app, 0.01)
    with BackgroundServer(app) as s:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(model=NAME, prompt="ROMEO:", max_tokens=30, temperature=0)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.completions.create, **kw)
            assert wait_for(lambda: app.state.served.scheduler.active == 1)
            second = pool.submit(c.completions.create, **kw)
            assert wait_for(lambda: app.state.served.scheduler.waiting == 1)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(**kw)
            assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
            want = model.generate("ROMEO:", max_new_tokens=30).text
            assert first.result().choices[0].text == second.result().choices[0].text == want


def test_graceful_shutdown_finishes_running_streams(model, monkeypatch):
    app = create_app(model, name=NAME, max_batch=2)
    slow_steps(monkeypatch, app, 0.01)
    s = BackgroundServer(app, shutdown_timeout=20).start()
    c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = c.completions.create(model=NAME, prompt="ROMEO:", max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))
    s.server.should_exit = True  # what SIGINT/SIGTERM does to uvicorn
    text = first.choices[0].text + "".join(ch.choices[0].text for ch in stream)
    assert text == model.generate("ROMEO:", max_new_tokens=60).text
    s.thread.join(20)
    assert not s.thread.is_alive() and not app.state.served.scheduler._thread.is_alive()
    s.sock.close()


def test_shutdown_timeout_cancels_what_is_still_running(model, monkeypatch):
    app = create_app(model, name=NAME, max_batch=2)
    slow_steps(monkeypatch, app, 0.05)  # 200 tokens would take 10 s
    s = BackgroundServer(app, shutdown_timeout=0.5).start()
    c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = c.completions.create(model=NAME, prompt="ROMEO:", max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    t0 = time.monotonic()
    s.server.should_exit = True
    with pytest.raises(Exception):  # the connection closes before the stream's end
        for _ in stream:
            pass
    s.thread.join(10)
    assert time.monotonic() - t0 < 5 and not s.thread.is_alive()
    sched = app.state.served.scheduler
    assert not sched._thread.is_alive() and sched.active == 0 and sched.waiting == 0
    s.sock.close()


def test_cli_serves_and_exits_on_sigterm(demo_dir):
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--model", str(demo_dir), "--port", str(port),
                             "--max-batch", "2", "--threads", "1", "--served-model-name", NAME],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)

        def up() -> bool:
            try:
                return [m.id for m in c.models.list().data] == [NAME]
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        assert wait_for(up, 60)
        r = c.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason == "length"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        log = proc.stdout.read()
        # uvicorn shuts down, then re-raises the signal it caught (so the exit status tells why)
        assert code in (0, -signal.SIGTERM), log
        assert "Application shutdown complete" in log and f"127.0.0.1:{port}" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
