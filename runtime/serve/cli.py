"""`python -m runtime serve --model DIR`: the OpenAI-compatible server on uvicorn, or on Ray Serve
with --ray (N replicas, each its own model and scheduler, behind Ray's HTTP proxy)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import MissingDependencyError
from .guard import exposure_warning
from .options import ServeOptions, add_flags, prefill_budget, prefix_cache_bytes

__all__ = ["HELP", "DESCRIPTION", "add_flags", "prefill_budget", "prefix_cache_bytes", "serve"]


HELP = "OpenAI-compatible HTTP server (needs tablefree-onnx[serve])"
DESCRIPTION = ("Serve an artifact over HTTP with OpenAI's completions API (/v1/completions, /v1/models, "
               "/health, /metrics), batching concurrent requests continuously on model.kv.onnx.")


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"`serve` needs {module}: pip install 'tablefree-onnx[{extra}]'") from None


def serve(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status. The flags become one ServeOptions
    (options.py), which this process or every Ray replica builds its app from."""
    for m in ("fastapi", "uvicorn", "prometheus_client"):
        _need(m, "serve")
    options = ServeOptions.from_args(args)
    warning = exposure_warning(args.host, options.app.api_key)
    if warning:
        print(warning, file=sys.stderr)
    if args.ray:
        _need("ray.serve", "serve-ray")
        from .ray_app import run_ray

        return run_ray(args, options)
    import uvicorn

    from .app import build_server

    model, app = build_server(options)
    print(f"[serve] {args.model} on {model.provider}: {options.app.max_batch} slots, model id "
          f"{app.state.served.name!r}, prefix cache {options.app.prefix_cache_bytes >> 20} MiB", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=options.shutdown_timeout)
    return 0
