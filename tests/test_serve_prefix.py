"""Prefix reuse in the server (runtime/serve/prefix.py) against its oracles: every request that
copies a cached prompt start gets the tokens and text of `Model.generate` on its prompt alone and of
a scheduler without the cache; the index's bookkeeping (blocks, partial blocks, LRU by bytes) is
checked against hand-computed values on a small fake row store."""
from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")

import runtime  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.background import BackgroundServer  # noqa: E402
from runtime.serve.engine import GenRequest, Scheduler  # noqa: E402
from runtime.serve.prefix import PrefixCache  # noqa: E402
from runtime.serve.slots import SlotCache  # noqa: E402

# about 150 tokens of the demo's tokenizer: several 16-token blocks, two 64-token ones, and a tail
PREFIX = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
          "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\nAll:\nWe know't, "
          "we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n\n")
SUFFIXES = ["ROMEO:", "Second Citizen:\nOne word, good citizens.", "All:", "MENENIUS:\nWhy, masters, my good friends",
            "O", "JULIET:\nWherefore art thou", "First Citizen:\nWe are accounted poor citizens", "KING:"]
NEW = 24


@pytest.fixture(scope="module")
def model():
    from demo import demo_artifact

    return runtime.load(demo_artifact("arith"), provider="cpu", graph="kv", threads=1)


@pytest.fixture(scope="module")
def solo(model):
    """`generate` on each prompt alone (the oracle), memoised: ids -> (tokens, text)."""
    memo: dict[tuple[int, ...], tuple[list[int], str]] = {}

    def get(ids: list[int]) -> tuple[list[int], str]:
        if tuple(ids) not in memo:
            r = model.generate(ids, max_new_tokens=NEW)
            memo[tuple(ids)] = (list(r.ids), r.text)
        return memo[tuple(ids)]
    return get


def run(sched: Scheduler, prompts: list[list[int]]) -> list[GenRequest]:
    """Submit the prompts together (admitted in the same loop when slots allow) and wait for all."""
    done = [threading.Event() for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]

    def emit(i: int):
        def on(ev) -> None:
            if ev.kind == "token":
                texts[i].append(ev.text)
            else:
                done[i].set()
        return on
    reqs = [GenRequest(prompt_ids=list(p), max_tokens=NEW, emit=emit(i)) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.submit(r)
    for d in done:
        assert d.wait(60), "a request did not finish"
    for r, t in zip(reqs, texts):
        assert r.finish in ("stop", "length"), r.finish
        r.text = "".join(t)  # type: ignore[attr-defined]
    return reqs


def scheduler(model, block: int | None = 16, **kw) -> Scheduler:
    cache = PrefixCache(block) if block else None
    return Scheduler(model, warm_up=False, prefix_cache=cache, **kw).start()


def check(reqs: list[GenRequest], solo) -> None:
    for r in reqs:
        assert (r.ids, r.text) == solo(r.prompt_ids), f"prompt of {len(r.prompt_ids)} tokens, {r.cached} reused"


# -- the index alone -------------------------------------------------------------------------------
def fake_rows(slots: int = 3, max_len: int = 32) -> SlotCache:
    """SlotCache's row storage without a session: 2 buffers [slots, 1 head, max_len, 2]."""
    c = SlotCache.__new__(SlotCache)
    c.buffers = [np.zeros((slots, 1, max_len, 2), np.float32) for _ in range(2)]
    c.max_len, c.lengths = max_len, np.zeros(slots, np.int32)
    return c


def test_index_blocks_partial_hits_and_lru_by_bytes_evicting_leaves_first():
    rows = fake_rows()
    for i, buf in enumerate(rows.buffers):
        buf[0] = np.arange(32 * 2).reshape(1, 32, 2) + 100 * i  # row 0: a recognisable prompt's cache
    block_bytes = 2 * 4 * 2 * 4  # 2 buffers x 4 positions x head 2 x float32
    pc = PrefixCache(block=4, max_bytes=3 * block_bytes)
    a = list(range(10))
    assert pc.save(rows, 0, a) == 2 and pc.bytes == 2 * block_bytes  # the 2 whole blocks of 10 tokens
    assert pc.match(a).tokens == 8
    assert pc.match(a[:8]).tokens == 7  # all cached: one token is left to prefill, a block used in part
    assert pc.match(a[:4] + [99] * 6).tokens == 4  # diverges in block 2
    assert pc.match([99] + a[1:]).tokens == 0 and pc.match([5]).tokens == 0
    hit = pc.match(a[:8])
    pc.load(rows, 2, hit)
    assert rows.lengths[2] == 7
    for buf in rows.buffers:
        np.testing.assert_array_equal(buf[2, :, :7], buf[0, :, :7])
        assert not buf[2, :, 7:].any()
    b = a[:4] + [50, 51, 52, 53]  # shares block 1 with a
    assert pc.save(rows, 0, b) == 1 and len(pc) == 3
    assert pc.save(rows, 0, [7, 7, 7, 7]) == 1  # a 4th block: over the bound, the oldest leaf goes
    assert len(pc) == 3 and pc.bytes == 3 * block_bytes and pc.evictions == 1
    assert pc.match(a).tokens == 4, "a's own second block (the least recent leaf) was evicted"
    assert pc.match(b + [0]).tokens == 8 and pc.match([7, 7, 7, 7, 0]).tokens == 4
    with pytest.raises(ValueError, match="do not fit"):
        rows.write_positions(1, 30, np.zeros((2, 1, 4, 2), np.float32))


# -- the scheduler ---------------------------------------------------------------------------------
def whole(ids: list[int], block: int = 16) -> int:
    """What a request reuses of a prompt seen before: its whole blocks, and one token left to prefill."""
    return min(len(ids) // block * block, len(ids) - 1)


def test_shared_prefix_sequential_and_concurrent_equal_generate_and_no_reuse(model, solo):
    """One request fills the cache; then the others, one at a time and then all at once, copy
    the prefix and prefill only their suffixes (one shorter than a block, one the same prompt as
    the first, one the cached prefix itself to its last whole block: all but one token copied):
    tokens and text are generate's alone and a cache-less scheduler's."""
    pre = model.encode(PREFIX)
    prompts = [pre + model.encode(s) for s in SUFFIXES[:7]] + [pre + model.encode(SUFFIXES[0])]
    assert len(model.encode(SUFFIXES[4])) < 16 and len(pre) % 16, "a short suffix and a partial block"
    on, off = scheduler(model, max_batch=8), scheduler(model, block=None, max_batch=8)
    try:
        seq = [run(on, [p])[0] for p in prompts]
        same = run(on, [pre[: len(pre) // 16 * 16]])[0]
        check(seq + [same], solo)
        assert seq[0].cached == 0 and all(r.cached >= len(pre) // 16 * 16 for r in seq[1:])
        assert seq[-1].cached == whole(prompts[-1]), "the first prompt again: its own whole blocks"
        assert same.cached == len(same.prompt_ids) - 1, "all cached: the last token is still prefilled"
        both = run(on, prompts), run(off, prompts)
        check(both[0], solo)
        assert [(r.ids, r.text) for r in both[0]] == [(r.ids, r.text) for r in both[1]]
        assert [r.cached for r in both[0]] == [whole(p) for p in prompts], "every prompt was seen before"
        assert all(r.cached == 0 for r in both[1]) and off.prefix is None
        assert on.prefix.hits == 7 + 1 + 8 and on.prefix.queries == 17
    finally:
        on.stop(), off.stop()


@pytest.mark.parametrize("budget", [None, 5])
def test_no_stale_rows_after_the_source_slot_is_reused(model, solo, budget):
    """One slot: the prefix's first request runs there, then unrelated prompts overwrite it (and the
    buffers are scribbled over besides); a later request with the prefix still gets generate's
    tokens, its copy coming from the cache's own blocks. With a prefill budget of 5 the rest of its
    prompt goes in pieces after the copied prefix."""
    pre = model.encode(PREFIX)
    sched = scheduler(model, max_batch=1, max_prefill_tokens=budget)
    try:
        first = run(sched, [pre + model.encode(SUFFIXES[1])])
        other = run(sched, [model.encode(SUFFIXES[3] + " " + SUFFIXES[6]) * 4])
        for buf in sched.cache.buffers:
            buf[...] = 7.0
        later = run(sched, [pre + model.encode(SUFFIXES[5]), pre + model.encode(SUFFIXES[1])])
        check(first + other + later, solo)
        assert later[0].cached == len(pre) // 16 * 16 and later[1].cached == whole(later[1].prompt_ids)
    finally:
        sched.stop()


# -- over HTTP -------------------------------------------------------------------------------------
def metric(base_url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(base_url + "/metrics", timeout=30).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_server_reuse_on_and_off_same_texts_and_metrics(model, solo):
    """The app's default prefix cache (64-token blocks) against --no-prefix-cache's app: the same
    greedy texts for 8 concurrent clients sharing a prefix, hits and reused tokens in /metrics."""
    pre = model.encode(PREFIX)
    prompts = [pre + model.encode(s) for s in SUFFIXES]
    want = [solo(p)[1] for p in prompts]
    got = {}
    for mb in (1024, 0):
        app = create_app(model, name="demo", max_batch=8, prefix_cache_bytes=mb << 20)
        with BackgroundServer(app) as s:
            c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

            def ask(p: list[int]) -> str:
                return c.completions.create(model="demo", prompt=p, max_tokens=NEW, temperature=0).choices[0].text
            first = ask(prompts[0])  # the prefix goes into the cache
            with ThreadPoolExecutor(8) as pool:
                got[mb] = [first] + list(pool.map(ask, prompts[1:]))
            hits = metric(s.base_url, "tablefree_prefix_cache_hits_total")
            reused = metric(s.base_url, "tablefree_prefix_cache_reused_tokens_total")
            held = metric(s.base_url, "tablefree_prefix_cache_bytes")
        if mb:
            assert hits == 7 and reused == 7 * (len(pre) // 64 * 64) and held > 0
        else:
            assert hits == reused == held == 0
    assert got[1024] == got[0] == want


def test_cli_flags_turn_the_prefix_cache_off_and_size_it():
    from runtime.cli import _parser
    from runtime.serve.cli import prefix_cache_bytes

    def parse(*flags: str) -> int:
        return prefix_cache_bytes(_parser().parse_args(["serve", "--model", str(Path("m")), *flags]))
    assert parse() == 1 << 30 and parse("--no-prefix-cache") == 0 and parse("--prefix-cache-mb", "2") == 2 << 20
    with pytest.raises(SystemExit, match="--prefix-cache-mb must be >= 0"):
        parse("--prefix-cache-mb", "-1")
