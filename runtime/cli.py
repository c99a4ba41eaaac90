"""`python -m runtime generate|score|serve|web`: the runtime from a shell (text on stdout, the rest on stderr).

Each subcommand is one entry of COMMANDS: (help, a function that adds its flags, a function that
runs it). Every TableFreeRuntimeError becomes one `error:` line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from .artifact import DEFAULT_VERIFY, VERIFY_MODES
from .errors import TableFreeRuntimeError
from .serve import cli as serve_cli  # flags only: FastAPI and uvicorn are imported when serving
from .speculative import MODES as SPECULATIVE_MODES

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


def add_model_flags(sp: argparse.ArgumentParser) -> None:
    """The flags of every subcommand that loads an artifact (see `load_model`)."""
    sp.add_argument("--model", required=True, help="artifact folder written by `python -m export build`")
    sp.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"),
                    help="execution provider; auto uses CUDA when onnxruntime-gpu works, else the CPU (default auto)")
    sp.add_argument("--threads", type=int, default=None, help="intra-op threads, >= 1 (default: ONNX Runtime's choice)")
    sp.add_argument("--graph", default="auto", choices=("auto", "kv", "spec"),
                    help="auto: model.kv.onnx (shared KV cache) on the CPU when the artifact has it, else "
                         "model.onnx; spec: model.onnx only; kv: model.kv.onnx or an error")
    sp.add_argument("--verify", default=DEFAULT_VERIFY, choices=VERIFY_MODES,
                    help="artifact check before loading: sha256 of every file (default; remembered per file "
                         "stamp, so only a first load reads every byte), sizes only, or none")


def load_model(args: argparse.Namespace) -> Any:
    from . import load

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        model = load(args.model, provider=args.provider, threads=args.threads, verify=args.verify, graph=args.graph)
    print(f"[runtime] {args.model} on {model.provider}", file=sys.stderr)
    return model


def _generate_flags(g: argparse.ArgumentParser) -> None:
    add_model_flags(g)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="end tokens are banned before this many (default 0)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy); implies sampling")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off); implies sampling")
    g.add_argument("--top-p", type=float, help="nucleus: keep the most likely tokens holding mass p; implies sampling")
    g.add_argument("--seed", type=int, help="random seed >= 0, for reproducible sampling; implies sampling")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); the output ends before it")
    g.add_argument("--speculative", default="off", choices=SPECULATIVE_MODES,
                   help="prompt_lookup: draft tokens from earlier text and check them in one step; the same "
                        "output, faster when the text repeats itself (default off)")


def _generate(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise SystemExit("error: empty prompt: pass --prompt with some text")
    model = load_model(args)
    do_sample = any(getattr(args, f) is not None for f in SAMPLING_FLAGS)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample,
              temperature=1.0 if args.temperature is None else args.temperature,
              top_k=0 if args.top_k is None else args.top_k, top_p=1.0 if args.top_p is None else args.top_p,
              repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
              stop=args.stop or None, seed=args.seed, speculative=args.speculative)
    if args.stream:
        for piece in model.stream(args.prompt, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        r = model.generate(args.prompt, **kw)
        print(r.text)
        print(f"[runtime] {len(r.ids)} tokens, finish: {r.finish_reason}", file=sys.stderr)


def _score_flags(s: argparse.ArgumentParser) -> None:
    add_model_flags(s)
    s.add_argument("--file", required=True, type=Path, help="UTF-8 text file to score")
    s.add_argument("--tokens", action="store_true", help="also print every token's log-probability")


def _score(args: argparse.Namespace) -> None:
    model = load_model(args)
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read {args.file} as UTF-8 text ({e})")
    r = model.score(text)
    if args.tokens:
        for t, lp in zip(r.scored_ids, r.token_logprobs):
            print(f"{t}\t{model.decode([t])!r}\t{lp:.6f}")
    print(f"tokens {len(r.token_logprobs)}  nll {r.nll:.6f}  perplexity {r.perplexity:.6f}")


def _web_flags(w: argparse.ArgumentParser) -> None:
    w.add_argument("--model", required=True, help="artifact folder written by `python -m export build`")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    w.add_argument("--ort-dir", help="folder with onnxruntime-web's dist files (default: the `make setup-js` install)")


def _web(args: argparse.Namespace) -> None:
    from .web import serve

    serve(args.model, args.host, args.port, args.ort_dir)


def _serve(args: argparse.Namespace) -> None:
    from .serve.cli import serve

    raise SystemExit(serve(args))


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
COMMANDS: dict[str, Command] = {
    "generate": ("continue a prompt",
                 "Continue a prompt. Greedy unless a sampling flag (--temperature, --top-k, --top-p, --seed) "
                 "is given. The generated text goes to stdout.", _generate_flags, _generate),
    "score": ("token log-probabilities and perplexity of a text file",
              "Score a UTF-8 text file: mean negative log-likelihood and perplexity on stdout.", _score_flags, _score),
    "serve": (serve_cli.HELP, serve_cli.DESCRIPTION, serve_cli.add_flags, _serve),
    "web": ("serve a page that runs the artifact in the browser (onnxruntime-web)",
            "Serve a page that generates with the artifact in the browser (onnxruntime-web, WASM).", _web_flags, _web),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Run an exported tablefree-onnx artifact folder with ONNX Runtime (no torch needed).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_, description, add_flags, _) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_, description=description))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command][3](args)
    except TableFreeRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130
    return 0
