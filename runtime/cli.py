"""`python -m runtime generate|score|serve`: the runtime from a shell (text on stdout, the rest on stderr)."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import TableFreeRuntimeError

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Run an exported tablefree-onnx artifact folder with ONNX Runtime (no torch needed).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, help="artifact folder written by `python -m export build`")
        sp.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"),
                        help="execution provider; auto uses CUDA when onnxruntime-gpu works, else the CPU (default auto)")
        sp.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
        sp.add_argument("--graph", default="auto", choices=("auto", "kv", "spec"),
                        help="auto: model.kv.onnx (shared KV cache) on the CPU when the artifact has it, else "
                             "model.onnx; spec: model.onnx only; kv: model.kv.onnx or an error")
        sp.add_argument("--verify", default="size", choices=("size", "sha256", "none"),
                        help="artifact check before loading: file sizes (default), full sha256, or none")

    g = sub.add_parser("generate", help="continue a prompt",
                       description="Continue a prompt. Greedy unless a sampling flag (--temperature, --top-k, "
                                   "--top-p, --seed) is given. The generated text goes to stdout.")
    common(g)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="end tokens are banned before this many (default 0)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy); implies sampling")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off); implies sampling")
    g.add_argument("--top-p", type=float, help="nucleus: keep the most likely tokens holding mass p; implies sampling")
    g.add_argument("--seed", type=int, help="random seed, for reproducible sampling; implies sampling")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); the output ends before it")

    s = sub.add_parser("score", help="token log-probabilities and perplexity of a text file",
                       description="Score a UTF-8 text file: mean negative log-likelihood and perplexity on stdout.")
    common(s)
    s.add_argument("--file", required=True, type=Path, help="UTF-8 text file to score")
    s.add_argument("--tokens", action="store_true", help="also print every token's log-probability")
    from .serve.cli import add_parser  # the HTTP server lives in runtime/serve (the `serve` extra)

    add_parser(sub)
    return p


def _run(args: argparse.Namespace) -> None:
    from . import load

    if args.command == "serve":
        from .serve.cli import serve

        raise SystemExit(serve(args))
    if args.command == "generate" and not args.prompt:
        raise SystemExit("error: empty prompt: pass --prompt with some text")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        model = load(args.model, provider=args.provider, threads=args.threads, verify=args.verify, graph=args.graph)
    print(f"[runtime] {args.model} on {model.provider}", file=sys.stderr)
    if args.command == "score":
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read {args.file} as UTF-8 text ({e})")
        r = model.score(text)
        if args.tokens:
            for t, lp in zip(r.scored_ids, r.token_logprobs):
                print(f"{t}\t{model.decode([t])!r}\t{lp:.6f}")
        print(f"tokens {len(r.token_logprobs)}  nll {r.nll:.6f}  perplexity {r.perplexity:.6f}")
        return
    do_sample = any(getattr(args, f) is not None for f in SAMPLING_FLAGS)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample,
              temperature=1.0 if args.temperature is None else args.temperature,
              top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
              repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
              stop=args.stop or None, seed=args.seed)
    if args.stream:
        for piece in model.stream(args.prompt, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        r = model.generate(args.prompt, **kw)
        print(r.text)
        print(f"[runtime] {len(r.ids)} tokens, finish: {r.finish_reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
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
