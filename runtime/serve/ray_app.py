"""The server on Ray Serve: N replicas of the same app behind Ray's HTTP proxy, each replica its
own Model, slot cache and scheduler (one scheduler per replica, as on a single machine).

Three ways to run it:
- `python -m runtime serve --model DIR --ray --replicas 2 [--port 8000]` (starts a local Ray, or
  joins the cluster named by RAY_ADDRESS);
- `serve run runtime.serve.ray_app:build_app model=DIR replicas=2 max_batch=8` (Ray's own CLI,
  the "app builder" form; every key is optional but `model`);
- from Python: `serve.run(deployment(...))`, as tests/test_serve_ray.py does.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from ray import serve

from .guard import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class TableFreeServer:
    """One replica: loads the artifact and serves create_app's app (its lifespan starts the scheduler)."""

    def __init__(self, model: str, max_batch: int = 8, max_queue: int = 256, max_len: int | None = None,
                 threads: int | None = None, name: str | None = None, provider: str = "cpu",
                 max_prefill_tokens: int | None = None, api_key: str | None = None,
                 max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES):
        import runtime

        from .app import create_app

        # attribute names of our own: Ray's ingress wrapper has an `app` property
        self._tablefree_model = runtime.load(model, provider=provider, threads=threads, graph="kv")
        self._tablefree_app = create_app(self._tablefree_model, name=name, max_batch=max_batch, max_queue=max_queue,
                                         max_len=max_len, max_prefill_tokens=max_prefill_tokens,
                                         api_key=api_key, max_body_bytes=max_body_bytes)

    def __serve_build_asgi_app__(self) -> Any:
        return self._tablefree_app


def deployment(model: str, replicas: int = 2, cpus_per_replica: float = 0, **kw: Any) -> Any:
    """The bound application: `replicas` copies of TableFreeServer(model, **kw)."""
    if replicas < 1:
        raise ValueError(f"replicas = {replicas} must be >= 1")
    return TableFreeServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica}).bind(
        model, **kw)


def build_app(args: dict[str, str]) -> Any:
    """`serve run runtime.serve.ray_app:build_app model=DIR [replicas=2] [max_batch=8] [threads=N] [name=ID]
    [api_key=KEY] [max_body_bytes=N]`; the key defaults to $TABLEFREE_API_KEY of the process that builds."""
    if "model" not in args:
        raise ValueError("pass model=DIR (the artifact folder) to serve run")
    ints = {k: int(args[k]) for k in ("max_batch", "max_queue", "max_len", "threads", "max_prefill_tokens",
                                      "max_body_bytes") if k in args}
    return deployment(args["model"], replicas=int(args.get("replicas", 2)), name=args.get("name"),
                      provider=args.get("provider", "cpu"),
                      api_key=args.get("api_key") or os.environ.get(API_KEY_ENV) or None, **ints)


def run_ray(args: argparse.Namespace) -> int:
    """`python -m runtime serve --ray`: deploy, then wait for SIGINT/SIGTERM and shut down."""
    from pathlib import Path

    import ray

    from .cli import prefill_budget

    done = threading.Event()

    def on_signal(*_: Any) -> None:
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # (again below: ray.init installs its own)
        signal.signal(sig, on_signal)
    root = str(Path(__file__).resolve().parents[2])  # so replicas import this checkout's runtime
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env)
    else:
        ray.init(include_dashboard=False, runtime_env=env)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(str(Path(args.model).resolve()), replicas=args.replicas, max_batch=args.max_batch,
                             max_queue=args.max_queue, max_len=args.max_len, threads=args.threads,
                             max_prefill_tokens=prefill_budget(args), api_key=args.api_key,
                             max_body_bytes=args.max_body_bytes or None,
                             name=args.served_model_name or Path(args.model).name, provider=args.provider),
                  name="tablefree", route_prefix="/")
        print(f"[serve] {args.model} on Ray Serve: {args.replicas} replicas at http://{args.host}:{args.port}",
              file=sys.stderr)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        done.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
