"""The server on Ray Serve: N replicas of the same app behind Ray's HTTP proxy, each replica its
own Model, slot cache and scheduler (one scheduler per replica, as on a single machine).

Every replica gets the one ServeOptions (options.py) the flags became, and builds its app with
app.build_server, as the single process does: the option set is declared once, so a flag the
single-process server honours reaches the replicas too (--shutdown-timeout becomes the
deployment's graceful_shutdown_timeout_s).

Three ways to run it:
- `python -m runtime serve --model DIR --ray --replicas 2 [--port 8000]` (starts a local Ray, or
  joins the cluster named by RAY_ADDRESS);
- `serve run runtime.serve.ray_app:build_app model=DIR replicas=2 max_batch=8` (Ray's own CLI,
  the "app builder" form: every `python -m runtime serve` flag as a key, `no_prefix_cache=true`);
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

from .options import LAUNCH_FLAGS, ServeOptions, add_flags

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
ALIASES = {"name": "served_model_name"}  # (the key `serve run` took before it took every flag)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class TableFreeServer:
    """One replica: loads the artifact and serves create_app's app (its lifespan starts the scheduler)."""

    def __init__(self, options: ServeOptions):
        from .app import build_server

        # attribute names of our own: Ray's ingress wrapper has an `app` property
        self._tablefree_model, self._tablefree_app = build_server(options)

    def __serve_build_asgi_app__(self) -> Any:
        return self._tablefree_app


def deployment(options: ServeOptions | str, replicas: int = 2, cpus_per_replica: float = 0, **kw: Any) -> Any:
    """The bound application: `replicas` copies of TableFreeServer(options); a folder and
    ServeOptions.of's keywords (`deployment(DIR, max_batch=8, threads=1)`) stand for ServeOptions.of(DIR, **kw)."""
    if replicas < 1:
        raise ValueError(f"replicas = {replicas} must be >= 1")
    if isinstance(options, str):
        options = ServeOptions.of(options, **kw)
    elif kw:
        raise TypeError(f"give options or keywords, not both (got {sorted(kw)})")
    return TableFreeServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                                   graceful_shutdown_timeout_s=options.shutdown_timeout).bind(options)


class _Keys(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit; `serve run` should say what is wrong
        raise ValueError(f"serve run runtime.serve.ray_app:build_app: {message} (keys are the flags of "
                         "`python -m runtime serve --help` with _ for -, e.g. max_batch=8 no_prefix_cache=true)")


def build_app(args: dict[str, str]) -> Any:
    """`serve run runtime.serve.ray_app:build_app model=DIR [replicas=2] [max_batch=8] [no_prefix_cache=true]
    ...`: the same flags, read by the same ServeOptions.from_args, as `python -m runtime serve --ray`; the key
    defaults to $TABLEFREE_API_KEY of the process that builds."""
    parser = _Keys(prog="build_app", add_help=False)
    add_flags(parser)
    switches = {k for k, v in vars(parser.parse_args(["--model", "."])).items() if v is False}
    argv = []
    for key, value in args.items():
        key = ALIASES.get(key, key)
        if key in LAUNCH_FLAGS and key != "replicas":
            raise ValueError(f"{key}={value!r}: `serve run` places the proxy and Ray itself; give only how a "
                             "replica serves (and replicas=N)")
        flag = "--" + key.replace("_", "-")
        if key not in switches:
            argv += [flag, value]
        elif str(value).lower() in TRUE:
            argv.append(flag)
        elif str(value).lower() not in FALSE:
            raise ValueError(f"{key}={value!r}: give true or false")
    ns = parser.parse_args(argv)
    try:
        options = ServeOptions.from_args(ns)
    except SystemExit as e:  # (from_args speaks to the command line)
        raise ValueError(str(e)) from None
    return deployment(options, replicas=ns.replicas)


def run_ray(args: argparse.Namespace, options: ServeOptions) -> int:
    """`python -m runtime serve --ray`: deploy `options` on args.replicas replicas, then wait for
    SIGINT/SIGTERM and shut down."""
    from pathlib import Path

    import ray

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
        serve.run(deployment(options, replicas=args.replicas), name="tablefree", route_prefix="/")
        print(f"[serve] {args.model} on Ray Serve: {args.replicas} replicas at http://{args.host}:{args.port}",
              file=sys.stderr)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        done.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
