"""`python -m export build ...`: the exporter's command line. Errors: one line, exit status 2."""
from __future__ import annotations

import argparse
import signal
import sys

from runtime.interface import LIFT_MODES, PRECISIONS

DESCRIPTION = """\
Export a table-free language model checkpoint to a verified ONNX artifact folder:
model.onnx + model.onnx.data (the lift - token id -> fixed binary code - is inside the graph),
config.json, generation_config.json, tokenizer files, genai_config.json and manifest.json with
the parity report. The artifact runs with onnxruntime alone."""

EPILOG = """\
lift modes (--code MODE):
  bitwise  BitShift + BitwiseAnd on the id; smallest graph; ONNX Runtime runs these on the CPU provider only
  arith    integer Div/Mod on the id; runs on every execution provider (use it for cuda)
  lookup   Gather from a constant table of the V recoded K-bit codes (V*K bits), then unpack; every provider
  table    only for checkpoints WITH an input embedding table (the paper's learned-table baseline; chosen
           automatically for them): Gather from that [V, d] table; the "no V x d table" check is waived

precisions (--precision):
  fp32     exact: logits within 1e-4 of max|logit|, greedy token-exact, checked by the parity gate
  fp16     half the size, meant for CUDA; LayerNorm/softmax/residual kept in fp32; float16 cache
  int8     weight-only 8-bit MatMulNBits (block 128, int8 compute); held to the int8 quality floor
  int4     weight-only 4-bit MatMulNBits, GPTQ-calibrated (--quantizer); smallest; held to the int4 quality floor

lift conventions (SPEC 1.1; defaults come from the checkpoint's config.json):
  --bit-order lsb_first|msb_first, --values zero_one|plus_minus_one, --tiling repeat|interleave, --scale X
  override them at export; the artifact records what it used.

exit status: 0 written and verified; 2 bad input or failed parity gate (nothing replaced at --out).
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", metavar="build")
    b = sub.add_parser("build", help="export a checkpoint to an artifact folder", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--model", metavar="PATH|HUB_ID",
                   help="checkpoint folder (config.json + *.safetensors + tokenizer files) or a Hugging Face hub id "
                        "OWNER/NAME (fetched without pickles; needs network). Default: the embedded demo model models/shakespeare")
    b.add_argument("--out", metavar="DIR", help="artifact folder to write, outside the model folder. "
                   "Default: artifacts/<model-name>-<lift mode>-<precision>")
    b.add_argument("--code", dest="lift_mode", choices=(*LIFT_MODES, "table"), default="bitwise",
                   help="the lift mode: how the graph computes the lift (see below). Default: bitwise")
    b.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weight precision (see below). Default: fp32")
    b.add_argument("--quantizer", choices=("gptq", "rtn"), default=None,
                   help="--precision int4 only: gptq (default) chooses the 4-bit levels against the activations of "
                        "text sampled from the fp32 model (block 256 symmetric, head 4-bit too: the fastest setting "
                        "that passes the int4 floor; about 4 minutes more build at 0.47B); rtn rounds each block to "
                        "nearest (block 32 asymmetric, 8-bit head: what passes the floor without calibration)")
    b.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="execution provider the artifact targets and is verified on (cuda: verified there when "
                        "onnxruntime-gpu is installed, else on cpu with a warning). Default: cpu")
    b.add_argument("--opset", type=int, default=None, help="ONNX opset (18..23). Default: 21, loads in onnxruntime >= 1.17")
    b.add_argument("--trust-remote-code", action="store_true",
                   help="run the checkpoint folder's own model code (auto_map in config.json, through transformers: "
                        "pip install 'tablefree-onnx[remote]'), compare it with the reference stage by stage on probe ids, and "
                        "where they part search the fields that can change that stage (the code's bit order, values, "
                        "tiling, scale; norm; RoPE pairing, rotary dim, base; GELU form; parallel residual) for the "
                        "combination that matches; export with it, or refuse naming the first stage that differs. "
                        "Never done without the flag")
    b.add_argument("--key-map", metavar="FILE", help="JSON object mapping the checkpoint's tensor names to ours (SPEC 2), for foreign checkpoints")
    b.add_argument("--force", action="store_true", help="replace an existing --out (only after the new artifact passed the gate)")
    b.add_argument("--no-verify", action="store_true", help="skip the parity gate (the manifest then says it was skipped)")
    b.add_argument("--no-kv-graph", action="store_true",
                   help="do not add model.kv.onnx, the second graph (same weights file) whose KV cache is one shared "
                        "buffer per layer (GroupQueryAttention): the runtime generates on it without "
                        "copying the cache each step. Without it every call runs on model.onnx")
    b.add_argument("--bit-order", choices=("lsb_first", "msb_first"), help="override the code's bit order")
    b.add_argument("--values", choices=("zero_one", "plus_minus_one"), help="override the code's value map")
    b.add_argument("--tiling", choices=("repeat", "interleave"), help="override how the K code values tile the width d")
    b.add_argument("--scale", type=float, help="override the code's scale factor")
    b.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command != "build":
        parser.print_help(sys.stderr)
        return 2
    from .build import build, stderr_log
    from .errors import ExportError

    try:
        build(args.model, args.out, lift_mode=args.lift_mode, precision=args.precision, provider=args.provider,
              opset=args.opset, force=args.force, verify=not args.no_verify, key_map=args.key_map,
              trust_remote_code=args.trust_remote_code, log=stderr_log, bit_order=args.bit_order,
              values=args.values, tiling=args.tiling, scale=args.scale, progress=True,
              kv_graph=not args.no_kv_graph, quantizer=args.quantizer)
    except ExportError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("error: interrupted; nothing was written to --out", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
