"""Continuous batching: one scheduler thread owns the slot cache and runs every request in it.

Each loop: drop the requests that were cancelled (their client went away), admit waiting
requests into free slots (prefill, first token; at most max_prefill_tokens prompt tokens per
loop, a long prompt in pieces over several loops), then one decode step for all active slots at
once. A request that finishes (end token, stop string, max_tokens) or is cancelled leaves its
slot before the next step; the highest active slot moves into the hole (SlotCache.move), so a
step runs exactly the active rows. Tokens are chosen per request with the runtime's own
sampling (runtime/sampling.py, each request with its own generator, as `Model.generate` seeds a
single prompt) and turned into text with the runtime's incremental detokenizer, with text that
could be the start of a stop string held back, as `Model.stream` does.

A request with `prompt_logprobs` (echo with logprobs) is prefilled on its own row through
`SlotCache.extend_all` in pieces of at most `logits_rows` positions (every position's logits, cut
down at once to the prompt token's log-probability and the top N), under the same admission and
prefill budget as any other prompt; then it decodes in the batch like any other (max_tokens 0: it
ends after the prompt).

The HTTP side never touches ONNX Runtime: it `submit`s a GenRequest whose `emit` callback gets
events from this thread (and must hand them over thread-safely), and `cancel`s it on disconnect.
What a request is and what it makes of each token chosen for it (its text, stop strings, finish,
events) is request.py's; this file decides when and in which row it runs.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any

import numpy as np

from ..detok import IncrementalDetokenizer
from ..sampling import choose
from .logprobs import prompt_logprobs
from .prefix import Hit, PrefixCache
from .request import Event, GenRequest, QueueFullError, ShuttingDownError
from .slots import SlotCache

__all__ = ["Event", "GenRequest", "QueueFullError", "Scheduler", "ShuttingDownError"]  # (request.py's: their old home)


class Scheduler:
    """Owns a SlotCache; `start()` runs the loop in a daemon thread, `stop()` ends it."""

    logits_rows = 128  # positions per Run of a prompt_logprobs prefill: 128 x V float32 (32 MB at V = 65536)

    def __init__(self, model: Any, max_batch: int = 8, max_queue: int = 256, max_len: int | None = None,
                 metrics: Any = None, max_prefill_tokens: int | None = None, warm_up: bool = True,
                 prefix_cache: PrefixCache | None = None):
        """max_prefill_tokens: prompt tokens prefilled between two decode steps at most (a longer
        prompt goes in pieces, SlotCache.extend): a bound on how long arrivals stall the running
        streams; None: every waiting request that has a slot, whole.
        warm_up: run every batch size once before the first request (SlotCache.warm_up).
        prefix_cache: where prompts' whole blocks are kept once prefilled, and looked up at
        admission: a hit copies the prefix into the slot and only the rest is prefilled (prefix.py).
        None: every prompt is prefilled whole."""
        self.warm_up = warm_up
        self.ready = threading.Event()  # set once warmed up (or failed)
        self.model = model
        self.cache = SlotCache.from_model(model, max_batch, max_len)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.max_len = self.cache.max_len
        self.tokenizer = model.tokenizer
        eos = model.info.token_id("eos_token_id")
        self.end_ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        self.metrics = metrics
        self.prefix = prefix_cache
        self._cond = threading.Condition()
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._active: list[GenRequest] = []  # index == slot
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.error: str | None = None
        self._ids = itertools.count()

    # -- the HTTP side -------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is not None:  # a second lifespan startup (e.g. a re-used app) is a no-op
            return self
        self._thread = threading.Thread(target=self._loop, name="tablefree-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if self._stopping or self.error:
                raise ShuttingDownError(self.error or "the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are waiting (the queue holds {self.max_queue}); retry later")
            req.t_submit = time.perf_counter()
            self._pending.append(req)
            self._cond.notify()
        self._gauges()

    def cancel(self, req: GenRequest) -> None:
        """The owner went away: the request leaves at the scheduler's next loop (its slot too)."""
        with self._cond:
            req.cancelled = True
            waiting = req in self._pending
            if waiting:  # it never ran: it leaves the queue now (and frees its place there)
                self._pending.remove(req)
            self._cond.notify()
        if waiting:
            self._end(req, "cancelled", leave=False)
            self._gauges()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, cancel the waiting and running ones, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # -- the scheduler thread ------------------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))
            self.metrics.active_slots.set(len(self._active))

    def _loop(self) -> None:
        try:
            if self.warm_up:
                self.cache.warm_up()
            self.ready.set()
            while True:
                with self._cond:
                    while not (self._stopping or self._pending or self._active):
                        self._cond.wait()
                    if self._stopping:
                        break
                self._drop_cancelled()
                budget = self.max_prefill_tokens or 0  # 0: no bound
                spent = 0
                for req in [r for r in self._active if r._fed < len(r.prompt_ids)]:  # long prompts, going on
                    if budget and spent >= budget:
                        break
                    left = len(req.prompt_ids) - req._fed
                    n = min(left, budget - spent) if budget else left
                    self._extend(req, n)
                    spent += n
                with self._cond:  # whole prompts that fit the budget, then the start of one that does not
                    admit, chunked = [], None
                    while self._pending and len(self._active) + len(admit) < self.max_batch:
                        n = self._to_prefill(self._pending[0])
                        if not budget or spent + n <= budget:
                            admit.append(self._pending.popleft())
                            spent += n
                        else:
                            if spent < budget:
                                chunked = self._pending.popleft()
                            break
                live = []
                for req in admit:
                    if req.cancelled:
                        self._end(req, "cancelled", leave=False)
                    else:
                        live.append(req)
                if live:
                    self._prefill(live)
                if chunked is not None:
                    self._prefill([chunked], budget - spent)
                for req in [r for r in self._active if r.finish is not None]:  # done after one token
                    self._end(req, req.finish)
                self._gauges()
                if any(r._fed == len(r.prompt_ids) for r in self._active):
                    self._step()
                    self._gauges()
        except Exception as e:  # a bug or an ORT failure: fail every request, refuse new ones
            self.error = f"the scheduler stopped: {type(e).__name__}: {e}"
        self.ready.set()
        with self._cond:
            self._stopping = True
            rest = self._active + list(self._pending)
            self._active, self._pending = [], collections.deque()
        for req in rest:
            self._end(req, "error" if self.error else "cancelled", leave=False)
        self._gauges()

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._active if r.cancelled]:
            self._end(req, "cancelled")

    def _to_prefill(self, req: GenRequest) -> int:
        """Prompt tokens the request needs prefilled: what the prefix cache does not hold (its
        hit, looked up now, is the one `_prefill` copies in)."""
        use = self.prefix is not None and not req.prompt_logprobs
        req._hit = self.prefix.match(req.prompt_ids) if use else None
        return len(req.prompt_ids) - (req._hit.tokens if req._hit else 0)

    def _save_prefix(self, req: GenRequest) -> None:
        """The request's prompt is all in its row: keep its whole blocks for later requests."""
        if self.prefix is not None:
            self.prefix.save(self.cache, req.slot, req.prompt_ids)
            if self.metrics is not None:
                self.metrics.prefix_bytes.set(self.prefix.bytes)

    def _prefill(self, reqs: list[GenRequest], first: int | None = None) -> None:
        """New requests into the next free rows, prefilled as one batch, and their first tokens; or
        (first = n) one request's first n tokens to prefill, the rest to follow in `_extend`.
        A request with a prefix hit gets its own row after the others: the hit is copied in and
        the rest goes in with `_extend` (a chunk after a past is batch 1 in GroupQueryAttention).
        Prompt-logprobs requests come last, each on its own row (`_feed_scored`): they never take a
        hit, since every prompt position's logits is what they return."""
        scored = [r for r in reqs if r.prompt_logprobs]
        hits = [r for r in reqs if not r.prompt_logprobs and r._hit is not None and r._hit.tokens]
        fresh = [r for r in reqs if r not in hits and r not in scored]
        reqs = fresh + hits + scored  # the fresh prompts' rows first, contiguous
        if self.prefix is not None:
            reused = sum(r._hit.tokens for r in hits)
            self.prefix.queries += len(reqs) - len(scored)
            self.prefix.hits += len(hits)
            self.prefix.tokens_reused += reused
            if self.metrics is not None:
                self.metrics.prefix_queries.inc(len(reqs) - len(scored))
                self.metrics.prefix_hits.inc(len(hits))
                self.metrics.prefix_tokens.inc(reused)
        start = len(self._active)
        for i, req in enumerate(reqs):
            req.slot = start + i
            self._active.append(req)
            if req.sampling.do_sample and not req.sampling.greedy:
                req._rng = np.random.default_rng(req.seed)
            if self.tokenizer is not None:
                req._detok = IncrementalDetokenizer(self.tokenizer)
        for req in scored:
            self._feed_scored(req, first if first is not None else len(req.prompt_ids))
        for req in hits:
            hit: Hit = req._hit
            self.prefix.load(self.cache, req.slot, hit)
            req._fed = req.cached = hit.tokens
            req._hit = None
            self._extend(req, len(req.prompt_ids) - hit.tokens if first is None else first)
        if first is not None and fresh:
            req = reqs[0]
            self.cache.prefill_rows(start, [req.prompt_ids[:first]])
            req._fed = first
            return
        if not fresh:
            return
        logits = self.cache.prefill_rows(start, [r.prompt_ids for r in fresh])
        for i, req in enumerate(fresh):
            req._fed = len(req.prompt_ids)
            self._save_prefix(req)
            self._first(req, logits[i : i + 1])

    def _extend(self, req: GenRequest, n: int) -> None:
        """The next n prompt tokens of a request admitted in pieces; its first token after the last."""
        if req.prompt_logprobs:
            self._feed_scored(req, n)
            return
        logits = self.cache.extend(req.slot, req.prompt_ids[req._fed : req._fed + n])
        req._fed += n
        if req._fed == len(req.prompt_ids):
            self._save_prefix(req)
            self._first(req, logits[None])

    def _feed_scored(self, req: GenRequest, n: int) -> None:
        """The next n prompt tokens of a prompt_logprobs request, `logits_rows` positions per Run,
        each Run's logits reduced before the next; after the last token the "prompt" event, then
        the first generated token (or the end, for max_tokens 0)."""
        ids, end = req.prompt_ids, req._fed + n
        logits = None
        while req._fed < end:
            c = min(self.logits_rows, end - req._fed)
            logits = self.cache.extend_all(req.slot, ids[req._fed : req._fed + c])  # [c, V]
            scored = min(c, len(ids) - 1 - req._fed)  # position i predicts token i + 1; the last predicts none
            lp, top = prompt_logprobs(logits[:scored], ids[req._fed + 1 : req._fed + 1 + scored], req.logprobs or 0)
            req._plp += lp
            req._ptop += top
            req._fed += c
        if req._fed < len(ids):
            return
        req.emit(Event("prompt", prompt_logprobs=req._plp, prompt_top=req._ptop))
        self._save_prefix(req)
        self._first(req, logits[-1:].copy())

    def _first(self, req: GenRequest, logits: np.ndarray) -> None:
        """The prompt is in: its first token, or (max_tokens 0, echo: the prompt alone) its end."""
        if req.max_tokens == 0:
            req.finish = "length"
        else:
            self._take(req, logits)

    def _step(self) -> None:
        """One decode step of every active row. A row whose prompt is still going in (in pieces)
        rides along with a dummy token written at its next position, which its next piece
        overwrites (its length is put back); its logits are not read."""
        t0 = time.perf_counter()
        feeding = [i for i, r in enumerate(self._active) if r._fed < len(r.prompt_ids)]
        tokens = np.asarray([r.ids[-1] if r.ids else 0 for r in self._active], np.int64)
        logits = self.cache.step(tokens)
        self.cache.lengths[feeding] -= 1
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(tokens) - len(feeding))
        decoding = [i for i, r in enumerate(self._active) if r._fed == len(r.prompt_ids)]
        greedy = [i for i in decoding if self._active[i]._rng is None]
        best = logits[greedy].argmax(-1) if greedy else ()
        for i, t in zip(greedy, best):
            self._take(self._active[i], logits[i : i + 1], int(t))
        for i in decoding:
            r = self._active[i]
            if r._rng is not None:
                self._take(r, logits[i : i + 1])
        for r in [r for r in self._active if r.finish is not None]:
            self._end(r, r.finish)
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - t0)

    def _take(self, req: GenRequest, logits: np.ndarray, token: int | None = None) -> None:
        """Choose the request's next token from its logits [1, V] (unless given: greedy rows are
        chosen for the whole batch at once), time it, and hand it to the request."""
        if token is None:
            token = int(choose(logits, None, req.sampling, req._rng)[0])
        now = time.perf_counter()
        if self.metrics is not None:
            if req.t_first is None:
                self.metrics.ttft.observe(now - req.t_submit)
            else:
                self.metrics.itl.observe(now - req.t_last)
            self.metrics.generation_tokens.inc()
        if req.t_first is None:
            req.t_first = now
        req.t_last = now
        req.add_token(token, logits, self.end_ids, self.max_len)

    def _end(self, req: GenRequest, finish: str, leave: bool = True) -> None:
        """Free the request's slot (moving the last active request into it) and tell its owner."""
        if leave and req in self._active:
            slot = self._active.index(req)
            last = len(self._active) - 1
            if slot != last:
                mover = self._active[last]
                self.cache.move(last, slot)
                mover.slot = slot
                self._active[slot] = mover
            self._active.pop()
            self.cache.free(last)
        if finish in ("cancelled", "error") or req.finish is None:
            req.finish = finish
        if self.metrics is not None:
            self.metrics.requests.labels(finish=req.finish).inc()
        req.emit(Event("done", finish=req.finish, error=self.error if finish == "error" else None))

