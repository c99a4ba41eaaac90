"""Stop strings on the server: bounded in number and length (protocol.MAX_STOP, MAX_STOP_CHARS),
refused past the bounds with one 400 naming `stop` and the limit, and matched by stops.StopScanner,
whose answers are checked against runtime/loop.py's own (`str.find` over the new text's window,
`held_back`) on random texts cut into random pieces, and whose cost per token is checked not to grow
with the stops' length. A request at both limits is served, and ends as `Model.generate` does."""
from __future__ import annotations

import random
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")

import runtime  # noqa: E402
from runtime.loop import held_back  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.background import BackgroundServer  # noqa: E402
from runtime.serve.protocol import MAX_STOP, MAX_STOP_CHARS  # noqa: E402
from runtime.serve.stops import StopScanner  # noqa: E402

NAME = "demo"


def _oracle(pieces: list[str], stops: list[str]) -> tuple[int | None, int | None, int]:
    """(piece index, cut) where generate's text tracker stops, and held_back of the text at the
    end (or after the last piece fed), as runtime/loop.py computes them."""
    text, longest = "", max(len(s) for s in stops)
    for n, piece in enumerate(pieces):
        start = max(0, len(text) - longest + 1)
        text += piece
        hits = [k for k in (text.find(s, start) for s in stops) if k >= 0]
        if hits:
            return n, min(hits), 0
    return None, None, held_back(text, stops)


@pytest.mark.parametrize("alphabet", ["ab", "ab\n", "a"])
def test_the_scanner_agrees_with_the_generate_loop(alphabet):
    rng = random.Random(alphabet)
    for _ in range(3000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4))]
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 12))]
        want_piece, want_cut, want_held = _oracle(pieces, stops)
        scan = StopScanner(stops)
        for n, piece in enumerate(pieces):
            cut = scan.feed(piece)
            if cut is not None:
                break
        got = (n, cut) if cut is not None else (None, None)
        assert got == (want_piece, want_cut), (stops, pieces)
        if cut is None:
            assert scan.held == want_held, (stops, pieces)


def test_the_scanners_cost_per_token_does_not_grow_with_the_stops_length():
    """The case that cost held_back 1.6-7 ms a token: long stops over text made of their own
    characters. Per 4-character piece, MAX_STOP stops of MAX_STOP_CHARS and of 100 times that cost alike."""
    rng = random.Random(0)

    def per_piece(length: int) -> float:
        stops = ["".join(rng.choice("ab ") for _ in range(length)) for _ in range(MAX_STOP)]
        text = "".join(rng.choice("ab ") for _ in range(4000))
        scan = StopScanner(stops)
        t0 = time.perf_counter()
        for i in range(0, len(text), 4):
            if scan.feed(text[i : i + 4]) is not None:
                scan = StopScanner(stops)
            scan.held
        return (time.perf_counter() - t0) / (len(text) / 4)

    short, long = min(per_piece(MAX_STOP_CHARS) for _ in range(3)), min(per_piece(100 * MAX_STOP_CHARS) for _ in range(3))
    assert long < 3 * short + 20e-6, (short, long)
    assert short < 500e-6, short  # (about 10 us per 4 stops here; held_back took ~300 us for 4 at this size)


def test_an_empty_stop_is_refused_before_the_scheduler():
    with pytest.raises(ValueError, match="empty stop"):
        StopScanner(["x", ""])


@pytest.fixture(scope="module")
def model():
    from demo import demo_artifact

    return runtime.load(demo_artifact("arith"), provider="cpu", graph="kv", threads=1)


@pytest.fixture(scope="module")
def client(model):
    with BackgroundServer(create_app(model, name=NAME, max_batch=2)) as s:
        yield openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("stop,says", [
    (["x"] * (MAX_STOP + 1), f"stop has {MAX_STOP + 1} strings; this server takes at most {MAX_STOP}"),
    (["x", "y" * (MAX_STOP_CHARS + 1)], f"stop string 1 has {MAX_STOP_CHARS + 1} characters; this server takes "
                                        f"at most {MAX_STOP_CHARS}"),
    ("z" * 3000, f"stop string 0 has 3000 characters; this server takes at most {MAX_STOP_CHARS}"),
], ids=["count", "length", "one-string"])
def test_too_many_or_too_long_stops_get_one_400_naming_the_field(client, stop, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=4, stop=stop)
    err = e.value.body
    assert err["param"] == "stop" and err["type"] == "invalid_request_error", err
    assert says in err["message"] and "\n" not in err["message"], err
    assert client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=2).choices[0].finish_reason == "length"


def test_a_request_at_both_limits_is_served_and_stops_as_generate_does(client, model):
    p = "ROMEO:"
    full = model.generate(p, max_new_tokens=40).text
    stop = full[12:15]  # a piece in the middle of the greedy text (may span tokens)
    stops = [("q" * MAX_STOP_CHARS)[: MAX_STOP_CHARS - len(stop)] + stop] * (MAX_STOP - 2)
    stops += [stop + "Q" * (MAX_STOP_CHARS - len(stop)), stop]  # a long one that begins like the match: held back
    assert len(stops) == MAX_STOP and max(map(len, stops)) == MAX_STOP_CHARS
    want = model.generate(p, max_new_tokens=40, stop=stops)
    assert want.finish_reason == "stop" and stop not in want.text
    r = client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0, stop=stops)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0, stop=stops, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"
