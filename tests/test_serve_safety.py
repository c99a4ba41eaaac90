"""`python -m runtime serve` safe to expose (issue 19.5): the API key (--api-key / $TABLEFREE_API_KEY)
through the official `openai` client, /health and /metrics open; 413 for a body over
--max-body-bytes before it is read (Content-Length and chunked); the warning for a non-loopback
host without a key; a prompt refused for length before it is tokenized, by a bound checked against
the tokenizer itself; and a 20 MB request that stalls nobody: /health and a short completion on
other connections answer within 1 s while it is sent and refused.

The servers run in this process on 127.0.0.1 (background.py); the CLI's wiring is tested by
running `serve` with uvicorn.run replaced, so nothing binds 0.0.0.0."""
from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")

import runtime  # noqa: E402
from runtime.serve import cli as serve_cli  # noqa: E402
from runtime.serve import guard  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.background import BackgroundServer  # noqa: E402

NAME = "demo"
KEY = "sk-test-0123456789"
BIG = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def demo_dir():
    from demo import demo_artifact  # built once per test process, shared with test_serve.py

    return demo_artifact("arith")


@pytest.fixture(scope="module")
def model(demo_dir):
    return runtime.load(demo_dir, provider="cpu", graph="kv", threads=1)


@pytest.fixture(scope="module")
def keyed(model):
    with BackgroundServer(create_app(model, name=NAME, max_batch=2, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def open_server(model):
    """No key, the default body limit (4 MiB)."""
    app = create_app(model, name=NAME, max_batch=2)
    with BackgroundServer(app) as s:
        s.app = app
        yield s


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30) -> tuple[int, dict, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), json.loads(data) if data[:1] in (b"{", b"[") else {}


def completion(prompt: str = "ROMEO:", max_tokens: int = 4) -> bytes:
    return json.dumps({"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None
    assert body["error"]["code"] == code and body["error"]["message"]


# -- the API key -----------------------------------------------------------------------------------
def test_v1_needs_the_key_health_and_metrics_do_not(keyed, model):
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", completion())]:
        status, headers, err = request(keyed.port, method, path, body)
        assert status == 401 and headers.get("www-authenticate") == "Bearer", err
        assert_openai_error(err, "invalid_api_key")
        assert "Authorization: Bearer" in err["error"]["message"]
        status, _, err = request(keyed.port, method, path, body, {"Authorization": "Bearer sk-test-0123456788"})
        assert status == 401 and "not this server's" in err["error"]["message"]
        assert_openai_error(err, "invalid_api_key")
    assert request(keyed.port, "GET", "/health")[0] == 200
    c = http.client.HTTPConnection("127.0.0.1", keyed.port, timeout=30)
    c.request("GET", "/metrics")
    r = c.getresponse()
    assert r.status == 200 and 'tablefree_rejected_requests_total{status="401"} 4.0' in r.read().decode()


def test_the_openai_client_with_and_without_the_key(keyed, model):
    wrong = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=NAME, prompt="ROMEO:", max_tokens=4, temperature=0)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    right = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    r = right.completions.create(model=NAME, prompt="ROMEO:", max_tokens=4, temperature=0)
    assert r.choices[0].text == model.generate("ROMEO:", max_new_tokens=4).text
    assert [m.id for m in right.models.list().data] == [NAME]


def test_the_key_is_compared_in_constant_time(keyed, monkeypatch):
    seen = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert request(keyed.port, "GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert seen == [(KEY.encode(), KEY.encode())]


def _serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve_cli.add_flags(p)
    return p.parse_args(list(argv))


@pytest.fixture
def cli_app(monkeypatch, demo_dir):
    """`serve(args)` as the CLI runs it, with uvicorn.run replaced: returns (app, host) of the run."""
    import uvicorn

    got = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: got.update(app=app, host=host))

    def run(*argv: str):
        assert serve_cli.serve(_serve_args("--model", str(demo_dir), "--max-batch", "1", "--threads", "1",
                                           "--served-model-name", NAME, *argv)) == 0
        return got["app"]

    return run


def test_the_env_var_gives_the_key_and_the_flag_wins(cli_app, monkeypatch):
    monkeypatch.setenv("TABLEFREE_API_KEY", "sk-from-env")
    with BackgroundServer(cli_app()) as s:
        assert request(s.port, "GET", "/v1/models")[0] == 401
        assert request(s.port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-from-env"})[0] == 200
    with BackgroundServer(cli_app("--api-key", "sk-from-flag")) as s:
        assert request(s.port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-from-env"})[0] == 401
        assert request(s.port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-from-flag"})[0] == 200
    monkeypatch.setenv("TABLEFREE_API_KEY", "")  # empty: no key
    assert guard.resolve_api_key(None) is None
    with pytest.raises(SystemExit, match="--api-key is empty"):
        guard.resolve_api_key("")


def test_a_non_loopback_host_without_a_key_warns_once(cli_app, monkeypatch, capsys):
    monkeypatch.delenv("TABLEFREE_API_KEY", raising=False)
    cli_app("--host", "0.0.0.0")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and "0.0.0.0" in lines[0] and "--api-key" in lines[0]
    for argv in (("--host", "0.0.0.0", "--api-key", KEY), ("--host", "127.0.0.1"), ("--host", "localhost"),
                 ("--host", "::1")):
        cli_app(*argv)
        assert "warning" not in capsys.readouterr().err, argv
    assert guard.exposure_warning("::", None) and guard.exposure_warning("example.org", None)


# -- the body limit --------------------------------------------------------------------------------
def send_big(port: int, body: bytes, chunked: bool, piece: int = 1 << 18, stop_after: int | None = None) -> dict:
    """POST `body` on a raw socket while reading the answer, as curl does, so a refusal that comes
    before the body is all sent is seen; returns status, error, seconds to the answer, bytes sent.
    stop_after: send only that many bytes of the body, then wait for the answer (the connection open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n"
    out = {"sent": 0}
    answered = threading.Event()
    t0 = time.perf_counter()

    def read() -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536) or b"\r\n\r\n"
            out["seconds"] = time.perf_counter() - t0
            head_, _, rest = data.partition(b"\r\n\r\n")
            n = int(next((ln.split(b":")[1] for ln in head_.split(b"\r\n") if ln.lower().startswith(b"content-length")),
                         0))
            while len(rest) < n:
                rest += sock.recv(65536)
            out["status"], out["body"] = int(head_.split()[1]), json.loads(rest[:n])
        except (OSError, ValueError, IndexError) as e:
            out["error"] = repr(e)
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head.encode())
        end = len(body) if stop_after is None else stop_after
        for i in range(0, end, piece):
            if answered.is_set():
                break
            part = body[i : min(i + piece, end)]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            out["sent"] += len(part)
        else:
            if chunked and stop_after is None:
                sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server closed the connection after refusing: the rest is not read
        pass
    reader.join(60)
    sock.close()
    return out


def json_body(size: int) -> bytes:
    """A valid completions request of `size` bytes: one long text prompt."""
    pre, post = b'{"model": "demo", "prompt": "', b'", "max_tokens": 4}'
    return pre + b"x" * (size - len(pre) - len(post)) + post


@pytest.fixture(scope="module")
def small_limit(model):
    app = create_app(model, name=NAME, max_batch=2, max_body_bytes=64 * 1024)
    with BackgroundServer(app) as s:
        yield s


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_gets_413_before_it_is_read(small_limit, model, chunked):
    # Content-Length: refused on the headers, with no byte of the body sent; chunked: refused once
    # 64 KiB + 1 byte came, the body's end still to come
    got = send_big(small_limit.port, json_body(1024 * 1024), chunked, piece=16 * 1024,
                   stop_after=64 * 1024 + 1 if chunked else 0)
    assert got.get("status") == 413, got
    assert got["sent"] == (64 * 1024 + 1 if chunked else 0)
    assert_openai_error(got["body"], "request_too_large")
    assert "--max-body-bytes" in got["body"]["error"]["message"]
    # a body under the limit, chunked or not, is served whole
    prompt = "ROMEO: " * 20
    for chunk in (False, True):
        c = http.client.HTTPConnection("127.0.0.1", small_limit.port, timeout=30)
        body = completion(prompt)
        c.request("POST", "/v1/completions", iter([body[:100], body[100:]]) if chunk else body,
                  {"Content-Type": "application/json"}, encode_chunked=chunk)
        r = c.getresponse()
        assert r.status == 200
        assert json.loads(r.read())["choices"][0]["text"] == model.generate(prompt, max_new_tokens=4).text


# -- the prompt's length, before tokenizing --------------------------------------------------------
class CountingTokenizer:
    """The artifact's tokenizer, counting the characters it was asked to encode."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def encode(self, text, **kw):
        self.chars += len(text)
        return self.tok.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_the_chars_per_token_bound_holds_and_is_tight_for_this_tokenizer(model):
    tok = model.tokenizer
    per = guard.chars_per_token(tok)
    longest = max(len(t.content) for t in tok.get_added_tokens_decoder().values())
    assert per == longest == len("</tool_response>")  # the n-grams are 2 and 3 characters
    assert len(tok.encode("</tool_response>" * 50).ids) == 50  # the bound is reached: 50 * 16 chars
    rng = random.Random(0)
    pieces = ["</tool_response>", "<s>", "[INST]", "the", "ing", " ", "\U0001F600", "\ue123", "é", "中文", "x"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        assert len(tok.encode(text).ids) >= -(-len(text) // per), text


def test_a_prompt_that_cannot_fit_is_refused_untokenized_and_one_that_fits_is_served(model):
    app = create_app(model, name=NAME, max_batch=1)
    served = app.state.served
    per, n = served.chars_per_token, served.max_len
    served.tokenizer = counting = CountingTokenizer(model.tokenizer)
    densest = "</tool_response>" * (n - 1)  # the most characters n - 1 tokens can be: room for one more
    with BackgroundServer(app) as s:
        status, _, r = request(s.port, "POST", "/v1/completions", completion(densest, max_tokens=1))
        assert status == 200 and r["usage"]["prompt_tokens"] == n - 1, r
        assert counting.chars == len(densest)
        # per * (n - 1) characters could still be n - 1 tokens: tokenized (then refused: "x" is a token each)
        status, _, err = request(s.port, "POST", "/v1/completions", completion("x" * (per * (n - 1)), max_tokens=1))
        assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
        assert counting.chars == len(densest) + per * (n - 1)
        # one more character is at least n tokens: refused before the tokenizer sees it
        before = counting.chars
        status, _, err = request(s.port, "POST", "/v1/completions", completion("x" * (per * (n - 1) + 1)))
        assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
        assert err["error"]["param"] == "prompt" and "characters" in err["error"]["message"]
        assert counting.chars == before


def test_the_bound_on_other_tokenizer_pipelines():
    """A byte-level BPE trained here: every text has at least ceil(chars / bound) tokens; a
    pipeline that can drop or compose characters has no bound (None)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog " * 20, "über straße — 中文字符 😀 " * 20]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    per = guard.chars_per_token(tok)
    assert per is not None and per > 1
    rng = random.Random(1)
    for _ in range(200):
        text = "".join(rng.choice(["the ", "quick", " lazy dog", "straße", "中文", "😀", "\x00", "zz"])
                       for _ in range(rng.randint(1, 30)))
        assert len(tok.encode(text).ids) >= -(-len(text) // per), text
    tok.normalizer = normalizers.NFC()  # "e\u0301" -> "é": fewer characters than were sent
    assert guard.chars_per_token(tok) is None
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the spaces
    assert guard.chars_per_token(tok) is None


# -- nobody stalls -------------------------------------------------------------------------------
def probe_while(port: int, busy: threading.Event) -> dict:
    """/health in a loop and one short completion, on their own connections, while `busy` is set."""
    out = {"health": []}
    t = time.perf_counter()
    out["status"] = request(port, "POST", "/v1/completions", completion(), timeout=10)[0]
    out["completion"] = time.perf_counter() - t
    while busy.is_set() or not out["health"]:
        t = time.perf_counter()
        assert request(port, "GET", "/health", timeout=10)[0] == 200
        out["health"].append(time.perf_counter() - t)
    return out


def _big_and_probes(port: int, body: bytes, chunked: bool) -> tuple[dict, dict]:
    busy = threading.Event()
    busy.set()
    got = {}

    def big() -> None:
        got.update(send_big(port, body, chunked))
        busy.clear()

    t = threading.Thread(target=big)
    t.start()
    probes = probe_while(port, busy)
    t.join(60)
    return got, probes


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_20mb_request_is_refused_at_once_and_stalls_nobody(open_server, chunked):
    got, probes = _big_and_probes(open_server.port, json_body(BIG), chunked)
    assert got.get("status") == 413 and got["seconds"] < 1, got
    assert probes["status"] == 200 and probes["completion"] < 1, probes
    assert max(probes["health"]) < 1, probes


def test_a_20mb_prompt_under_a_raised_limit_is_refused_before_tokenizing_and_stalls_nobody(model):
    """With --max-body-bytes above 20 MB the body is read and parsed (off the event loop), and the
    prompt refused by its length in characters, not tokenized (that took 34 s on the loop before)."""
    app = create_app(model, name=NAME, max_batch=2, max_body_bytes=32 * 1024 * 1024)
    app.state.served.tokenizer = counting = CountingTokenizer(model.tokenizer)
    with BackgroundServer(app) as s:
        got, probes = _big_and_probes(s.port, json_body(BIG), chunked=False)
    assert got.get("status") == 400 and got["body"]["error"]["code"] == "context_length_exceeded", got
    assert got["seconds"] < 5, got
    assert counting.chars < 100  # only the probes' prompts were tokenized
    assert probes["status"] == 200 and probes["completion"] < 1, probes
    assert max(probes["health"]) < 1, probes
