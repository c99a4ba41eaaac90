"""One completion request once routed, from body to answer: the prompts checked and tokenized
(Served), the options checked and turned into one GenRequest per prompt and choice, these
submitted to the scheduler, and its events (handed from its thread to the event loop by _Outbox)
answered as one JSON response or as server-sent events; a client that goes away cancels its
requests. app.py routes /v1/completions and /v1/chat/completions here (chat.Shape: which answer).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import RuntimeArtifactError
from ..sampling import SamplingConfig
from .chat import ChatTemplate, Shape
from .engine import Scheduler
from .guard import chars_per_token, check_chars
from .logprobs import prompt_entries
from .metrics import Metrics
from .protocol import APIError, CompletionRequest, bad, check_options
from .request import Event, GenRequest, QueueFullError, ShuttingDownError

DISCONNECT_POLL_S = 0.05


class Served:
    """What the endpoints need: the scheduler, the model's tokenizer and names, the metrics (one
    per app, as `app.state.served`)."""

    def __init__(self, model: Any, name: str, scheduler: Scheduler, metrics: Metrics):
        self.model, self.name, self.scheduler, self.metrics = model, name, scheduler, metrics
        self.tokenizer = model.tokenizer
        self.vocab_size = model.info.vocab_size
        self.max_len = scheduler.max_len
        self.created = int(time.time())
        self.chars_per_token = chars_per_token(self.tokenizer)  # a text longer than max_len * this cannot fit
        try:
            self.chat_template = ChatTemplate.of(model.info.tokenizer_config)
        except RuntimeError as e:  # a template that does not compile: say so at start, not per request
            raise RuntimeArtifactError(f"{model.info.folder}: {e}") from None

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.name!r} "
                           "(GET /v1/models)", "model", "model_not_found")

    def prompts(self, prompt: Any) -> list[list[int]]:
        """The request's prompt(s) as token rows, checked (empty, ids out of range, length)."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad("prompt is empty: give a string, a list of strings, or token ids", "prompt")
        rows = []
        for n, p in enumerate(items):
            what = "prompt" if len(items) == 1 else f"prompt {n}"
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise bad(f"this artifact has no tokenizer.json: send token ids as the {what}", "prompt")
                check_chars(p, self.chars_per_token, self.max_len, what, "prompt")
                p = self.tokenizer.encode(p).ids
            if not p:
                raise bad(f"{what} is empty (text that encodes to no tokens counts as empty)", "prompt")
            wrong = [t for t in p if not 0 <= t < self.vocab_size]
            if wrong:
                raise bad(f"token id {wrong[0]} of the {what} is outside [0, {self.vocab_size}); "
                          "use ids of this model's tokenizer", "prompt")
            rows.append(list(p))
        return rows

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=False)


def _requests(served: Served, body: CompletionRequest, rows: list[list[int]]) -> list[GenRequest]:
    """The checked request as GenRequests, n per prompt row (refused here, before any is submitted)."""
    check_options(body)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    longest = max(len(r) for r in rows)
    if longest > served.max_len:
        raise bad(f"the prompt has {longest} tokens, more than this model's maximum context length of "
                  f"{served.max_len}: shorten the prompt (prompt logprobs are scored in one context window)",
                  "prompt", "context_length_exceeded")
    if longest + max_tokens > served.max_len:
        raise bad(f"this model's maximum context length is {served.max_len} tokens, but the prompt has {longest} "
                  f"and max_tokens is {max_tokens}: lower max_tokens to {max(served.max_len - longest, 0)} or "
                  "shorten the prompt", "max_tokens" if longest < served.max_len else "prompt",
                  "context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if stops and served.tokenizer is None:
        raise bad("stop strings need the artifact's tokenizer.json, which this one lacks", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    sampling = SamplingConfig(do_sample=temperature > 0, temperature=temperature, top_k=body.top_k or 0,
                              top_p=1.0 if body.top_p is None else body.top_p)
    n = body.n or 1
    out = []
    for row in rows:
        for j in range(n):
            seed = None if body.seed is None else body.seed + j  # n choices of one seed differ, reproducibly
            out.append(GenRequest(prompt_ids=row, max_tokens=max_tokens, emit=lambda e: None, sampling=sampling,
                                  seed=seed, stop=stops, logprobs=body.logprobs,
                                  prompt_logprobs=bool(body.echo) and body.logprobs is not None))
    return out


class _Choice:
    """Accumulates one choice's text, tokens and logprobs from scheduler events."""

    def __init__(self, index: int, served: Served, req: GenRequest, echo: str):
        self.index, self.served, self.req = index, served, req
        self.text = echo
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.offsets: list[int] = []
        self.finish: str | None = None

    def add(self, ev: Event) -> str:
        if ev.kind == "prompt":  # the echoed prompt's entries come first
            self.tokens, self.token_logprobs, self.top, self.offsets = prompt_entries(
                self.served.tokenizer, self.served.decode, self.req.prompt_ids, ev.prompt_logprobs or [],
                ev.prompt_top or [])
            return ""
        self.text += ev.text
        if self.req.logprobs is not None and ev.token is not None:
            self.offsets.append(len(self.text) - len(ev.text))
            self.tokens.append(self.served.decode([ev.token]))
            self.token_logprobs.append(ev.logprob)
            self.top.append({self.served.decode([t]): lp for t, lp in (ev.top or {}).items()})
        return ev.text

    def logprobs(self, start: int = 0) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}


async def complete(served: Served, body: CompletionRequest, request: Request,
                   shape: Shape = Shape(chat=False)) -> Response:
    """Answer one completions request (a chat one arrives as the completion it stands for, with
    Shape(chat=True)); every check runs before anything is submitted, so a refused request costs
    the scheduler nothing."""
    served.check_model(body.model)
    rows = await asyncio.to_thread(served.prompts, body.prompt)  # tokenizing: off the event loop
    reqs = _requests(served, body, rows)
    outbox = _Outbox.of(asyncio.get_running_loop())
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def emitter(i: int):
        return lambda ev: outbox.put(events, (i, ev))

    n = body.n or 1
    choices = []
    for i, r in enumerate(reqs):
        r.emit = emitter(i)
        echo = served.decode(rows[i // n]) if body.echo else ""
        choices.append(_Choice(i, served, r, echo))
    try:
        for r in reqs:
            served.scheduler.submit(r)
    except (QueueFullError, ShuttingDownError) as e:
        for r in reqs:
            served.scheduler.cancel(r)
        if isinstance(e, QueueFullError):
            raise APIError(429, f"the server is busy: {e}", code="queue_full", type="server_overloaded")
        raise APIError(503, f"the server cannot take requests: {e}", code="unavailable")
    served.metrics.prompt_tokens.inc(sum(len(r) for r in rows) * n)
    cid = f"{shape.id_prefix}{uuid.uuid4().hex}"
    created = int(time.time())
    usage_of = lambda: {"prompt_tokens": sum(len(r) for r in rows), "completion_tokens": sum(len(r.ids) for r in reqs),
                        "total_tokens": sum(len(r) for r in rows) + sum(len(r.ids) for r in reqs)}

    def cancel_all() -> None:
        for r in reqs:
            if r.finish is None:
                served.scheduler.cancel(r)

    if not body.stream:
        watcher = asyncio.create_task(_watch_disconnect(request, cancel_all))
        try:
            pending = len(reqs)
            while pending:
                i, ev = await events.get()
                if ev.kind == "done":
                    pending -= 1
                    choices[i].finish = ev.finish
                    if ev.finish == "error":
                        raise APIError(500, ev.error or "the scheduler failed")
                    if ev.finish == "cancelled":
                        raise APIError(503, "the request was cancelled: the server is shutting down",
                                       code="cancelled")
                else:
                    choices[i].add(ev)
        finally:
            watcher.cancel()
            cancel_all()
        return JSONResponse({
            "id": cid, "object": shape.object, "created": created, "model": served.name,
            "choices": [shape.choice(c.index, c.text, c.logprobs(), c.finish) for c in choices],
            "usage": usage_of()})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(c: _Choice, text: str, finish: str | None, lp: dict | None = None, first: bool = False) -> str:
        return "data: " + json.dumps({
            "id": cid, "object": shape.chunk_object, "created": created, "model": served.name,
            "choices": [shape.delta(c.index, text, lp, finish, first)]}) + "\n\n"

    async def sse() -> AsyncIterator[str]:
        try:
            for c in choices:
                if c.req.prompt_logprobs:  # the echo goes out with its logprobs, when they come
                    continue
                if c.text or shape.chat:  # echo; a chat stream opens each choice with the assistant's role
                    yield chunk(c, c.text, None, first=True)
            pending = len(reqs)
            while pending:
                batch = [await events.get()]
                while not events.empty():  # what arrived meanwhile goes out in one write
                    batch.append(events.get_nowait())
                out = []
                for i, ev in batch:
                    c = choices[i]
                    if ev.kind == "done":
                        pending -= 1
                        c.finish = ev.finish
                        if ev.finish in ("error", "cancelled"):
                            err = APIError(500 if ev.finish == "error" else 503,
                                           ev.error or "the request was cancelled: the server is shutting down")
                            yield "".join(out) + "data: " + json.dumps(err.body()) + "\n\n"
                            return
                        out.append(chunk(c, "", ev.finish))
                        continue
                    if ev.kind == "prompt":
                        c.add(ev)
                        out.append(chunk(c, c.text, None, c.logprobs(0), first=True))
                        continue
                    start = len(c.tokens)
                    text = c.add(ev)
                    # (an artifact without a tokenizer has no text: one empty chunk per token still
                    # tells the client that, and when, a token came)
                    if text or c.req.logprobs is not None or served.tokenizer is None:
                        out.append(chunk(c, text, None, c.logprobs(start)))
                if out:
                    yield "".join(out)
            if include_usage:
                yield "data: " + json.dumps({"id": cid, "object": shape.chunk_object, "created": created,
                                             "model": served.name, "choices": [], "usage": usage_of()}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): running requests leave their slots now
            cancel_all()

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Outbox:
    """Hands events from the scheduler thread to the event loop with one wake-up for all that
    arrive together (a decode step emits one event per active request)."""

    _by_loop: "dict[int, _Outbox]" = {}

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_Outbox":
        box = cls._by_loop.get(id(loop))
        if box is None or box.loop is not loop:
            box = cls._by_loop[id(loop)] = cls(loop)
        return box

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


async def _watch_disconnect(request: Request, on_disconnect) -> None:
    while True:
        if await request.is_disconnected():
            on_disconnect()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)
