"""The OpenAI-compatible HTTP app (FastAPI) in front of one Scheduler: its routes, its error
handlers and its lifespan. What one completion request goes through once routed (checked into
GenRequests, submitted, answered as JSON or server-sent events) is completion.py's.

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
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatRequest, Shape, completion_of, no_template
from .completion import Served, complete
from .engine import Scheduler
from .guard import Guard, check_chars, parse_body
from .metrics import Metrics
from .options import AppOptions, ServeOptions
from .prefix import PrefixCache
from .protocol import APIError, CompletionRequest, bad


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
    served = Served(model, o.name or model.info.folder.name, scheduler, metrics)

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
        return await complete(served, completion_of(body, ids), request, Shape(chat=True))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(served, await parse_body(CompletionRequest, request), request)

    return app
