"""`python -m evaluation ARGS`: lm-eval's own CLI with the `tablefree-onnx` model registered.

lm-eval 0.4.13 looks models up in its registry only (no package entry points), so `lm_eval --model
tablefree-onnx` cannot find a model that no imported module registered; this wrapper imports the
registration, adds `--include_path evaluation/tasks` (the offline tasks) unless the caller passed
one, and hands the command line to `lm_eval.__main__.cli_evaluate` unchanged otherwise:

    python -m evaluation --model tablefree-onnx --model_args path=ARTIFACT \
        --tasks tablefree_mc tablefree_cloze tablefree_ppl
"""
from __future__ import annotations

import sys

from . import TASKS_DIR


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI (argv without the program name; default sys.argv[1:])."""
    import evaluation.lmeval  # noqa: F401  (registers "tablefree-onnx")
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    sub = args[:1] if args[:1] in (["run"], ["ls"], ["validate"]) else []
    rest = args[len(sub):]
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in rest):
        rest += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *sub, *rest]
    cli_evaluate()


if __name__ == "__main__":
    main()
