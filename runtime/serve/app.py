"""The OpenAI-compatible HTTP app (FastAPI) in front of one Scheduler.

Endpoints: POST /v1/completions (JSON or server-sent events), GET /v1/models, GET /health,
GET /metrics (Prometheus), and POST /v1/chat/completions: served when the artifact's
tokenizer_config.json has a chat template (chat.py), else a 400 that names /v1/completions (a base
model has none). Every refusal is OpenAI's error JSON; a bad request is
refused before it reaches the scheduler, so it never costs another request anything.

The app is built by `create_app(model, ...)` and owns its scheduler through the app's lifespan
(started on startup, stopped on shutdown), so uvicorn and Ray Serve run it the same way.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import RuntimeArtifactError
from ..sampling import SamplingConfig
from .chat import ChatRequest, ChatTemplate, Shape, completion_of, no_template
from .engine import Event, GenRequest, QueueFullError, Scheduler, ShuttingDownError
from .guard import Guard, chars_per_token, check_chars, parse_body
from .logprobs import prompt_entries
from .metrics import Metrics
from .options import AppOptions, ServeOptions
from .prefix import PrefixCache
from .protocol import APIError, CompletionRequest, bad, check_options

DISCONNECT_POLL_S = 0.05


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}: this server does not take it", loc[0] if loc else None
    if e.get("type") == "missing":
        return f"missing required field {'.'.join(loc)!r}", loc[0] if loc else None
    # a union reports each alternative; the field name is the first element
    field = loc[0] if loc else None
    return f"{field}: {e.get('msg', 'invalid value')} (got {e.get('input')!r:.80})", field


class _Served:
    """What the endpoints need: the scheduler, the model's tokenizer and names, the metrics."""

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


def build_server(options: ServeOptions) -> tuple[Any, FastAPI]:
    """(model, app): the artifact loaded on model.kv.onnx as `options` say, and create_app's app
    serving it; what the single process (cli.py) and each Ray replica (ray_app.py) run alike."""
    from .. import load

    model = load(options.model, provider=options.provider, threads=options.threads, graph="kv")
    return model, create_app(model, options.app)


def create_app(model: Any, options: AppOptions | None = None, **kw: Any) -> FastAPI:
    """An app serving `model` (a loaded runtime Model with a model.kv.onnx session) with `options`
    (options.AppOptions: one object, so the CLI and every Ray replica configure it alike), or with
    AppOptions' fields as keywords (`create_app(model, name="demo", max_batch=4)`), which override."""
    o = dataclasses.replace(options or AppOptions(), **kw)
    metrics = Metrics(o.max_batch)
    prefix = PrefixCache(o.prefix_block, o.prefix_cache_bytes) if o.prefix_cache_bytes > 0 else None
    scheduler = Scheduler(model, max_batch=o.max_batch, max_queue=o.max_queue, max_len=o.max_len, metrics=metrics,
                          max_prefill_tokens=o.max_prefill_tokens, prefix_cache=prefix)
    served = _Served(model, o.name or model.info.folder.name, scheduler, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        await asyncio.to_thread(scheduler.ready.wait)  # uvicorn accepts connections after the warm-up
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="tablefree-onnx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.add_middleware(Guard, api_key=o.api_key, max_body_bytes=o.max_body_bytes,
                       on_refuse=lambda status: metrics.rejected.labels(status=str(status)).inc())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (429, 503):
            metrics.rejected.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(bad(message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail))).body(),
                            status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.error:
            return JSONResponse({"status": "error", "error": scheduler.error}, status_code=503)
        return JSONResponse({"status": "ok", "active": scheduler.active, "waiting": scheduler.waiting})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": served.name, "object": "model", "created": served.created, "owned_by": "tablefree-onnx",
            "max_model_len": served.max_len}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if served.chat_template is None:
            raise no_template(served.name)
        body = await parse_body(ChatRequest, request)
        served.check_model(body.model)
        if served.tokenizer is None:
            raise bad("this artifact has a chat template but no tokenizer.json to encode it", "messages")

        def encode() -> list[int]:
            text = served.chat_template.render(body.messages)
            check_chars(text, served.chars_per_token, served.max_len, "rendered messages", "messages")
            return served.tokenizer.encode(text, add_special_tokens=False).ids

        ids = await asyncio.to_thread(encode)  # off the event loop: other clients are served meanwhile
        if not ids:
            raise bad("the messages render to an empty prompt", "messages")
        return await _complete(served, completion_of(body, ids), request, Shape(chat=True))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(served, await parse_body(CompletionRequest, request), request)

    return app


def _requests(served: _Served, body: CompletionRequest, rows: list[list[int]]) -> list[GenRequest]:
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

    def __init__(self, index: int, served: _Served, req: GenRequest, echo: str):
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


async def _complete(served: _Served, body: CompletionRequest, request: Request, shape: Shape = Shape(chat=False)) -> Response:
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
