"""`python -m runtime serve`: an OpenAI-compatible HTTP server with continuous batching.

Needs the `serve` extra (fastapi, uvicorn, prometheus_client): pip install 'tablefree-onnx[serve]';
Ray Serve scale-out needs `serve-ray`. Nothing here is imported by `import runtime`.

    slots.py      the B-slot shared-buffer KV cache on model.kv.onnx (the one file that knows the Model)
    engine.py     the scheduler thread: admission, prefill, batched decode step, sampling
    request.py    one request (GenRequest) and its events: what a chosen token becomes (text, stop strings, finish)
    stops.py      stop strings matched as text arrives, at a cost per character (KMP)
    protocol.py   the request schema and OpenAI-style errors
    app.py        the FastAPI app: routes, error handlers, lifespan
    completion.py one completion once routed: checks, GenRequests, submit, the JSON or SSE answer
    guard.py      safe to expose: the API key, the body limit (ASGI middleware), the startup warning, prompt length before tokenizing
    chat.py       /v1/chat/completions: the artifact's chat template, the chat request and shapes
    metrics.py    Prometheus metrics
    background.py a server in a thread of this process (tests, benchmarks)
    options.py    the `serve` flags and the ServeOptions they become (one object for the process or each Ray replica)
    cli.py        the `serve` subcommand (uvicorn, or Ray Serve with --ray)
    ray_app.py    the Ray Serve deployment
"""
