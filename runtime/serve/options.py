"""The server's options in one place: the `serve` flags, and the ServeOptions they become.

A server process is configured by one ServeOptions (how to load the artifact, and the AppOptions
create_app serves it with), built by `ServeOptions.from_args` from the flags declared here, and
turned into a model and its app by `app.build_server`. The single process (cli.py) and every Ray
replica (ray_app.py, for `--ray` and for `serve run`'s key=value pairs alike) go through those
same two calls, so a flag cannot reach one and miss the other: before, ray_app.py listed the
options a second time, and --no-prefix-cache, --prefix-cache-mb and --shutdown-timeout never
reached the replicas.

Only the standard library (and prefix.py's constants) at import: runtime/cli.py reads the flags
for --help without FastAPI installed.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .guard import DEFAULT_MAX_BODY_BYTES, resolve_api_key
from .prefix import DEFAULT_BLOCK, DEFAULT_MAX_BYTES

# Flags that say where and how many servers run, not how one serves: the launcher's, not a replica's.
LAUNCH_FLAGS = ("host", "port", "ray", "replicas")


def add_flags(sp: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's flags (runtime/cli.py's COMMANDS table); ServeOptions.from_args reads
    every one but LAUNCH_FLAGS."""
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


@dataclass(frozen=True)
class AppOptions:
    """What create_app serves a loaded model with. The defaults are the Python API's (no prefill
    bound); the command line's differ where its flags say so (ServeOptions.from_args).

    name: the model id (None: the artifact folder's name); max_batch, max_queue, max_len,
    max_prefill_tokens: the Scheduler's; api_key / max_body_bytes: guard.Guard's (None: no key /
    no limit); prefix_cache_bytes: the prefix cache's bound (0: no prefix reuse), in blocks of
    prefix_block tokens (prefix.py)."""

    name: str | None = None
    max_batch: int = 8
    max_queue: int = 256
    max_len: int | None = None
    max_prefill_tokens: int | None = None
    api_key: str | None = None
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    prefix_cache_bytes: int = DEFAULT_MAX_BYTES
    prefix_block: int = DEFAULT_BLOCK


@dataclass(frozen=True)
class ServeOptions:
    """One server process: the artifact folder, how it is loaded (provider, threads), how long
    running requests get at shutdown, and the app's options. Frozen and picklable: Ray hands the
    same object to every replica."""

    model: str
    provider: str = "cpu"
    threads: int | None = None
    shutdown_timeout: float = 30.0
    app: AppOptions = field(default_factory=AppOptions)

    @classmethod
    def of(cls, model: str, **kw: Any) -> "ServeOptions":
        """ServeOptions(model) with keywords of either class (Python callers: ray_app.deployment)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"model", "app"}
        return cls(model, **{k: v for k, v in kw.items() if k in own},
                   app=AppOptions(**{k: v for k, v in kw.items() if k not in own}))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeOptions":
        """The `serve` flags (add_flags) as options, checked; SystemExit names a bad flag. The key is
        --api-key, else $TABLEFREE_API_KEY of this process (for Ray: the one that deploys)."""
        if args.max_batch < 1 or args.max_queue < 0:
            raise SystemExit("error: --max-batch must be >= 1 and --max-queue >= 0")
        if args.max_body_bytes < 0:
            raise SystemExit("error: --max-body-bytes must be >= 0 (0: no limit)")
        if args.shutdown_timeout < 0:
            raise SystemExit("error: --shutdown-timeout must be >= 0 (seconds)")
        app = AppOptions(name=args.served_model_name, max_batch=args.max_batch, max_queue=args.max_queue,
                         max_len=args.max_len, max_prefill_tokens=prefill_budget(args),
                         api_key=resolve_api_key(args.api_key), max_body_bytes=args.max_body_bytes or None,
                         prefix_cache_bytes=prefix_cache_bytes(args))
        # absolute: a Ray replica's working directory is not this one
        return cls(str(Path(args.model).resolve()), provider=args.provider, threads=args.threads,
                   shutdown_timeout=args.shutdown_timeout, app=app)
