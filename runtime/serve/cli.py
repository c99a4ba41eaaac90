"""`python -m runtime serve --model DIR`: the OpenAI-compatible server on uvicorn, or on Ray Serve
with --ray (N replicas, each its own model and scheduler, behind Ray's HTTP proxy)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import MissingDependencyError
from .guard import DEFAULT_MAX_BODY_BYTES, exposure_warning, resolve_api_key


HELP = "OpenAI-compatible HTTP server (needs tablefree-onnx[serve])"
DESCRIPTION = ("Serve an artifact over HTTP with OpenAI's completions API (/v1/completions, /v1/models, "
               "/health, /metrics), batching concurrent requests continuously on model.kv.onnx.")


def add_flags(sp: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's flags (runtime/cli.py's COMMANDS table)."""
    sp.add_argument("--model", required=True, help="artifact folder written by `python -m export build`")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sp.add_argument("--max-batch", type=int, default=8, help="cache slots = requests decoded at once (default 8)")
    sp.add_argument("--max-queue", type=int, default=256,
                    help="requests that may wait for a slot; more are refused with 429 (default 256)")
    sp.add_argument("--max-len", type=int, default=None,
                    help="cache length per slot (prompt + max_tokens); default the model's context")
    sp.add_argument("--max-prefill-tokens", type=int, default=None,
                    help="prompt tokens prefilled between two decode steps at most (a longer prompt goes in "
                         "pieces); lower: running streams stall less when requests arrive, new ones wait longer; "
                         "0: every waiting request that has a slot (default 2 x --max-batch: about what a "
                         "step decodes, which held p99 inter-token latency under 3 steps in serve_bench)")
    sp.add_argument("--no-prefix-cache", action="store_true",
                    help="prefill every prompt whole (default: a prompt that starts like an earlier one copies "
                         "that start's keys and values, in blocks of 64 tokens, and prefills only the rest)")
    sp.add_argument("--prefix-cache-mb", type=float, default=1024.0,
                    help="memory the prefix cache may hold, least recently used out first (default 1024)")
    sp.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
    sp.add_argument("--provider", default="cpu", choices=("auto", "cpu", "cuda"),
                    help="execution provider of model.kv.onnx (default cpu)")
    sp.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    sp.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGINT/SIGTERM, seconds running requests get to finish before they are cancelled")
    sp.add_argument("--api-key", default=None,
                    help="every request but /health and /metrics must send `Authorization: Bearer KEY` (401 "
                         "otherwise); default $TABLEFREE_API_KEY, else none (the flag wins over the variable)")
    sp.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                    help="larger request bodies get 413 before they are read (default 4 MiB: a 1024-token "
                         "context is at most ~18 KB of JSON, a 3-character token \\u-escaped being 18 bytes, so "
                         "this holds it 200 times over and parses in ~0.25 s at worst; 0: no limit)")
    sp.add_argument("--ray", action="store_true", help="deploy on Ray Serve (needs tablefree-onnx[serve-ray])")
    sp.add_argument("--replicas", type=int, default=2, help="with --ray: replicas, each one scheduler (default 2)")


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"`serve` needs {module}: pip install 'tablefree-onnx[{extra}]'") from None


def prefill_budget(args: argparse.Namespace) -> int | None:
    """--max-prefill-tokens: None (no bound) for 0, 2 x --max-batch when not given."""
    if args.max_prefill_tokens is None:
        return 2 * args.max_batch
    return args.max_prefill_tokens or None


def prefix_cache_bytes(args: argparse.Namespace) -> int:
    """--no-prefix-cache / --prefix-cache-mb: the prefix cache's bound in bytes, 0 for none."""
    if args.prefix_cache_mb < 0:
        raise SystemExit(f"error: --prefix-cache-mb must be >= 0 (got {args.prefix_cache_mb}); 0 or "
                         "--no-prefix-cache turns prefix reuse off")
    return 0 if args.no_prefix_cache else int(args.prefix_cache_mb * (1 << 20))


def serve(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status."""
    for m in ("fastapi", "uvicorn", "prometheus_client"):
        _need(m, "serve")
    if args.max_batch < 1 or args.max_queue < 0:
        raise SystemExit("error: --max-batch must be >= 1 and --max-queue >= 0")
    if args.max_body_bytes < 0:
        raise SystemExit("error: --max-body-bytes must be >= 0 (0: no limit)")
    args.api_key = resolve_api_key(args.api_key)
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr)
    if args.ray:
        _need("ray.serve", "serve-ray")
        from .ray_app import run_ray

        return run_ray(args)
    import uvicorn

    from .. import load
    from .app import create_app

    model = load(args.model, provider=args.provider, threads=args.threads, graph="kv")
    app = create_app(model, name=args.served_model_name, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_len=args.max_len, max_prefill_tokens=prefill_budget(args), api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes or None, prefix_cache_bytes=prefix_cache_bytes(args))
    print(f"[serve] {args.model} on {model.provider}: {args.max_batch} slots, model id "
          f"{app.state.served.name!r}, prefix cache {prefix_cache_bytes(args) >> 20} MiB", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
