"""`--trust-remote-code`: run the checkpoint folder's own model code and make the reference agree with it.

The real checkpoint ships its modeling code and never published its lift conventions or block
choices (SPEC 1.1, 1.2). The adapter reads its weights without running that code; this module is
the one place that runs it, and only when the user asked for it. The folder's model is loaded
through `transformers` (`auto_map` in config.json), both models compute logits on the same probe
ids, and when they differ the convention fields are searched for the combination under which the
reference computes what the folder's code computes. The build then exports with that combination;
no match means no export, because an artifact that disagrees with its own source is worse than none.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExportError
from .floors import FP32_REL_TOL

# the fields SPEC 1.1 / 1.2 leave open, with where they live in ModelConfig
CODE_FIELDS = ("bit_order", "values", "tiling")
BLOCK_FIELDS = ("norm_type", "rope_pairing", "hidden_act")
SEARCH_FIELDS = CODE_FIELDS + BLOCK_FIELDS
NO_TRANSFORMERS = ("--trust-remote-code needs the transformers package, which is not installed; "
                   "pip install 'tablefree-onnx[remote]', or export without the flag (the adapter reads "
                   "the weights without running the folder's code)")
PROBE_SEED = 20605  # fixed: the same probes every build, so reports are comparable
PROBE_ROWS, PROBE_LEN = 2, 12


@dataclass
class RemoteCheck:
    """What the comparison found; stored in the manifest under source.remote_code."""

    model_class: str
    conventions: dict[str, str]
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    max_rel_diff: float = float("inf")
    combinations_tried: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"model_class": self.model_class, "conventions": self.conventions,
                "changed": {k: {"was": a, "now": b} for k, (a, b) in self.changed.items()},
                "max_rel_diff": self.max_rel_diff, "tolerance": FP32_REL_TOL,
                "combinations_tried": self.combinations_tried}


def current_conventions(cfg) -> dict[str, str]:
    return {**{k: getattr(cfg.code, k) for k in CODE_FIELDS}, **{k: getattr(cfg, k) for k in BLOCK_FIELDS}}


def candidates(start: dict[str, str]) -> list[dict[str, str]]:
    """Every combination of the open fields, the ones closest to `start` first.

    Why this order: the config's own values are the most likely answer, and when several
    combinations happen to agree (possible on degenerate weights) the one that changes the
    fewest fields is the least surprising report.
    """
    from reference.config import ACTIVATIONS, BIT_ORDERS, NORM_TYPES, ROPE_PAIRINGS, TILINGS, VALUE_MAPS

    choices = {"bit_order": BIT_ORDERS, "values": VALUE_MAPS, "tiling": TILINGS,
               "norm_type": NORM_TYPES, "rope_pairing": ROPE_PAIRINGS, "hidden_act": ACTIVATIONS}
    combos = [dict(zip(SEARCH_FIELDS, values)) for values in itertools.product(*(choices[f] for f in SEARCH_FIELDS))]
    return sorted(combos, key=lambda c: sum(c[f] != start[f] for f in SEARCH_FIELDS))


def probe_ids(vocab_size: int, max_len: int):
    """Seeded ids that cover the whole id range (both ends included), so every bit of the code moves."""
    import torch

    g = torch.Generator().manual_seed(PROBE_SEED)
    length = min(PROBE_LEN, max_len)
    ids = torch.randint(0, vocab_size, (PROBE_ROWS, length), generator=g)
    ids[0, 0], ids[1, 0] = 0, vocab_size - 1
    return ids


def folder_auto_map(folder: Path) -> dict:
    """config.json's auto_map (where a folder names its own model code); {} when there is none."""
    import json

    try:
        auto_map = json.loads((Path(folder) / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return {}
    return auto_map if isinstance(auto_map, dict) else {}


def remote_code_files(folder: Path) -> list[str]:
    """The folder's .py files that --trust-remote-code runs: the auto_map's modules and, transitively,
    the folder's modules they import (`from .x import`, `import x`, `from x import` with x.py in the folder).

    Read with `ast`, never imported, so it can be said before anything runs.
    """
    import ast

    folder = Path(folder)
    todo = []
    for ref in folder_auto_map(folder).values():
        for r in ref if isinstance(ref, list) else [ref]:
            if isinstance(r, str) and "." in r:
                todo.append(r.split("--")[-1].rsplit(".", 1)[0])  # "repo--modeling_x.Cls" -> modeling_x
    found: list[str] = []
    while todo:
        mod = todo.pop(0)
        name = mod.replace(".", "/") + ".py"
        path = folder / name
        if name in found or not path.is_file():
            continue
        found.append(name)
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                todo.append(node.module)
            elif isinstance(node, ast.ImportFrom):  # from . import x
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return found


def load_remote_model(folder: Path):
    """The folder's own model, fp32, eval, through transformers with its code; errors made readable."""
    try:
        import transformers
    except ImportError:
        raise ExportError(NO_TRANSFORMERS) from None
    auto_map = folder_auto_map(folder)
    if "AutoModelForCausalLM" not in auto_map and "AutoModel" not in auto_map:
        raise ExportError(f"--trust-remote-code: {folder}/config.json has no auto_map naming the folder's model code "
                          "(AutoModelForCausalLM), so there is no code to compare with; export without the flag")
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    loader = transformers.AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map else transformers.AutoModel
    try:
        model = loader.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # the folder's code can raise anything; the user needs to know it was that code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"--trust-remote-code: transformers could not load the model code in {folder} "
                          f"({type(e).__name__}: {first[:240]}); fix the folder's code or export without the flag") from None
    return model.eval()


def remote_logits(model, ids):
    """Logits from the folder's model, whatever it returns (ModelOutput, tuple or tensor)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.shape[:2] != ids.shape:
        raise ExportError("--trust-remote-code: the folder's model did not return logits [batch, seq, vocab] for "
                          f"input_ids {tuple(ids.shape)} (got {type(out).__name__}); it cannot be compared")
    return logits.float()


def _variant(lm, state: dict, conventions: dict[str, str]):
    """The reference with other conventions and the same weight tensors (no copy: meta + assign)."""
    import copy

    import torch

    from reference.model import TableFreeLM

    cfg = copy.deepcopy(lm.cfg)
    for k in CODE_FIELDS:
        setattr(cfg.code, k, conventions[k])
    for k in BLOCK_FIELDS:
        setattr(cfg, k, conventions[k])
    with torch.device("meta"):
        other = TableFreeLM(cfg)
    other.load_state_dict(state, strict=True, assign=True)
    return other.eval()


def check_remote(folder: Path, lm, log: Callable[[str], None]) -> RemoteCheck:
    """Compare the reference `lm` with the folder's own model; return the conventions that match.

    Raises ExportError when no combination of the open fields reproduces the folder's logits.
    """
    import torch

    remote = load_remote_model(folder)
    model_class = f"{type(remote).__module__.rsplit('.', 1)[-1]}.{type(remote).__name__}"
    ids = probe_ids(lm.cfg.vocab_size, lm.cfg.max_position_embeddings)
    want = remote_logits(remote, ids)
    del remote
    if want.shape[-1] != lm.cfg.vocab_size:
        raise ExportError(f"--trust-remote-code: the folder's model gives {want.shape[-1]} logits per position, "
                          f"the checkpoint's config says vocab_size {lm.cfg.vocab_size}; fix config.json")
    scale = float(want.abs().max()) or 1.0
    start = current_conventions(lm.cfg)
    state = lm.state_dict()
    best: tuple[float, dict[str, str]] = (float("inf"), start)
    tried = 0
    with torch.no_grad():
        for combo in candidates(start):
            model = lm if combo == start else _variant(lm, state, combo)
            diff = float((model(ids)[0] - want).abs().max()) / scale
            tried += 1
            if diff < best[0]:
                best = (diff, combo)
            if diff <= FP32_REL_TOL:
                break
    diff, combo = best
    if diff > FP32_REL_TOL:
        close = ", ".join(f"{k}={v}" for k, v in combo.items())
        raise ExportError(
            f"--trust-remote-code: the folder's own model ({model_class}) computes other logits than the reference "
            f"under all {tried} combinations of {', '.join(SEARCH_FIELDS)} (closest: {close}, max diff {diff:.2e} of "
            f"max|logit|, bound {FP32_REL_TOL:g}); its code does something SPEC 1 does not describe (a scale, another "
            "block layout, other weight names?), so nothing was exported")
    changed = {k: (start[k], combo[k]) for k in SEARCH_FIELDS if combo[k] != start[k]}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        log(f"[export] remote code: the folder's {model_class} matches the reference only with {what} "
            f"(max diff {diff:.1e} of max|logit|, {tried} combinations tried); exporting with these")
    else:
        log(f"[export] remote code: the folder's {model_class} matches the reference as configured "
            f"(max diff {diff:.1e} of max|logit|)")
    return RemoteCheck(model_class=model_class, conventions=combo, changed=changed, max_rel_diff=diff,
                       combinations_tried=tried)
