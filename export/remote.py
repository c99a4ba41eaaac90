"""`--trust-remote-code`: run the checkpoint folder's own model code and make the reference agree with it.

The real checkpoint ships its modeling code and never published its lift conventions or block
choices (SPEC 1.1, 1.2). The adapter reads its weights without running that code; this module is
the one place that runs it, and only when the user asked for it. The folder's model is loaded
through `transformers` (`auto_map` in config.json), both models compute logits on the same probe
ids, and when they differ the models are compared stage by stage (export/stages.py: the lift, each
block's attention and MLP, the final norm, the logits), and the fields that can move the first
differing stage are searched for the combination under which the reference computes what the
folder's code computes: a few combinations per step, never the product of every field. The build
then exports with that combination; no match means no export, because an artifact that disagrees
with its own source is worse than none, and the refusal names the stage where the two part.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stages
from .errors import ExportError
from .floors import FP32_REL_TOL

# the fields SPEC 1.1 / 1.2 leave open, and the published decoder variants, with where they live
CODE_FIELDS = ("bit_order", "values", "tiling", "scale")  # in ModelConfig.code
BLOCK_FIELDS = ("norm_type", "rope_pairing", "rotary_dim", "rope_theta", "hidden_act", "parallel_residual",
                "parallel_norms")  # in ModelConfig
SEARCH_FIELDS = CODE_FIELDS + BLOCK_FIELDS
# which fields can move the first differing stage of each kind (export/stages.py): the search
# tries these first, as one small product, instead of the product of every field
STAGE_FIELDS = {
    stages.LIFT: CODE_FIELDS,
    stages.ATTN_IN: ("norm_type",),
    stages.ATTN: ("rope_pairing", "rotary_dim", "rope_theta"),
    stages.MLP_IN: ("parallel_residual", "parallel_norms", "norm_type"),
    stages.MLP: ("hidden_act",),
    stages.OUT: ("parallel_residual", "parallel_norms"),
    stages.FINAL_NORM: ("norm_type",),
    stages.LOGITS: (),
}
THETAS = (10000.0, 500000.0, 1000000.0)  # the RoPE bases published decoders use, besides the config's own
NO_TRANSFORMERS = ("--trust-remote-code needs the transformers package, which is not installed; "
                   "pip install 'tablefree-onnx[remote]', or export without the flag (the adapter reads "
                   "the weights without running the folder's code)")
PROBE_SEED = 20605  # fixed: the same probes every build, so reports are comparable
PROBE_ROWS, PROBE_LEN = 2, 12


@dataclass
class RemoteCheck:
    """What the comparison found; stored in the manifest under source.remote_code."""

    model_class: str
    conventions: dict[str, Any]
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    max_rel_diff: float = float("inf")
    combinations_tried: int = 0
    stages: dict[str, Any] = field(default_factory=dict)  # StageReport.to_dict() of the final combination
    steps: list[dict[str, Any]] = field(default_factory=list)  # what each search step looked at and found
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model_class": self.model_class, "conventions": self.conventions,
                "changed": {k: {"was": a, "now": b} for k, (a, b) in self.changed.items()},
                "max_rel_diff": self.max_rel_diff, "tolerance": FP32_REL_TOL,
                "combinations_tried": self.combinations_tried, "search_steps": self.steps,
                "stages": self.stages, "seconds": round(self.seconds, 3)}


def current_conventions(cfg) -> dict[str, Any]:
    """The searched fields' values in `cfg`; rotary_dim as a number (the whole head when unset)."""
    out = {k: getattr(cfg.code, k) for k in CODE_FIELDS}
    out.update({k: getattr(cfg, k) for k in BLOCK_FIELDS})
    out["scale"], out["rope_theta"], out["rotary_dim"] = float(out["scale"]), float(out["rope_theta"]), cfg.rope_dim
    return out


def field_choices(name: str, start: dict[str, Any], cfg, has_ln2: bool) -> list[Any]:
    """The values an author would plausibly have picked for one field; the start value first."""
    from reference.config import ACTIVATIONS, BIT_ORDERS, NORM_TYPES, ROPE_PAIRINGS, TILINGS, VALUE_MAPS

    K, d, hs = cfg.code.bits, cfg.hidden_size, cfg.head_size
    fixed = {"bit_order": BIT_ORDERS, "values": VALUE_MAPS, "tiling": TILINGS, "norm_type": NORM_TYPES,
             "rope_pairing": ROPE_PAIRINGS, "hidden_act": ACTIVATIONS}
    if name in fixed:
        values = list(fixed[name])
    elif name == "scale":  # 1, and the normalisations of a K-bit code or a d-wide vector
        values = [1.0, 1 / math.sqrt(K), math.sqrt(K), math.sqrt(d / K), math.sqrt(K / d), 1 / math.sqrt(d),
                  math.sqrt(d)]
    elif name == "rotary_dim":  # whole head, half (Phi), a quarter (GPT-NeoX's default rotary_pct 0.25)
        values = [r for r in (hs, hs // 2, hs // 4) if r >= 2 and r % 2 == 0]
    elif name == "rope_theta":
        values = list(THETAS)
    elif name == "parallel_residual":
        values = [False, True] if has_ln2 else [True]
    elif name == "parallel_norms":  # one norm only when the weights hold no ln2 (then it is forced)
        values = [2] if has_ln2 else [1]
    else:
        raise KeyError(name)
    out = [start[name]]
    for v in values:
        if not any(_same(v, o) for o in out):
            out.append(v)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _combos(base: dict[str, Any], names: tuple[str, ...], cfg, has_ln2: bool) -> list[dict[str, Any]]:
    """Every combination of `names` (the others as in `base`), fewest changes first, `base` left out."""
    lists = [field_choices(n, base, cfg, has_ln2) for n in names]
    out = [{**base, **dict(zip(names, vals))} for vals in itertools.product(*lists)]
    out = [c for c in out if any(not _same(c[n], base[n]) for n in names)]
    return sorted(out, key=lambda c: sum(not _same(c[n], base[n]) for n in names))


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


MODEL_AUTO = ("AutoModelForCausalLM", "AutoModel")


def has_model_code(folder: Path) -> bool:
    """Whether config.json's auto_map names model code (an auto_map may name only a tokenizer)."""
    return any(k in folder_auto_map(folder) for k in MODEL_AUTO)


def remote_code_files(folder: Path) -> list[str]:
    """The folder's .py files that --trust-remote-code runs: the auto_map's modules and, transitively,
    the folder's modules they import (`from .x import`, `import x`, `from x import` with x.py in the folder).

    Read with `ast`, never imported, so it can be said before anything runs.
    """
    import ast

    import json

    folder = Path(folder)
    todo = []
    refs = list(folder_auto_map(folder).values())
    try:  # the tokenizer's code, named in tokenizer_config.json's auto_map (export/remote_tokenizer.py)
        tc_map = json.loads((folder / "tokenizer_config.json").read_text()).get("auto_map")
        refs += list(tc_map.values()) if isinstance(tc_map, dict) else []
    except (OSError, ValueError, AttributeError):
        pass
    for ref in refs:
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
    if not any(k in auto_map for k in MODEL_AUTO):
        raise ExportError(f"--trust-remote-code: {folder}/config.json has no auto_map naming the folder's model code "
                          "(AutoModelForCausalLM), and its tokenizer is no code either, so there is no code to run; "
                          "export without the flag")
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


def _variant(lm, state: dict, conventions: dict[str, Any]):
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


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items()) or "nothing"


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def search(lm, run: stages.FolderRun, ids) -> tuple[dict[str, Any], stages.StageReport, int, list[dict[str, Any]]]:
    """Move the first differing stage later, one step at a time, until every stage agrees or none moves.

    Each step searches the fields that can change the stage where the models part (STAGE_FIELDS:
    a few combinations), then, only if none of those moves it, every other block field alone. A
    lift difference is first checked on the lift alone (no forward pass). Returns the conventions,
    the stage report under them, how many combinations were tried, and a record of each step.
    """
    from reference.lift import lift

    cfg = lm.cfg
    state = lm.state_dict()
    has_ln2 = cfg.has_ln2
    start = current_conventions(cfg)

    def evaluate(conv: dict[str, Any]) -> stages.StageReport:
        model = lm if conv == start else _variant(lm, state, conv)
        return stages.compare_model(model, ids, run)

    def lift_agrees(conv: dict[str, Any]) -> bool:
        import copy

        code = copy.copy(cfg.code)
        for k in CODE_FIELDS:
            setattr(code, k, conv[k])
        value = lift(ids, code, cfg.hidden_size, lm.code.A, lm.code.b)
        return stages.rel_diff(stages.Stage("the lift", stages.LIFT, None, value), run) <= FP32_REL_TOL

    conv, rep, tried = start, evaluate(start), 1
    steps: list[dict[str, Any]] = []
    while not rep.agrees:
        kind, where = rep.first_kind, rep.stages[rep.first_bad][0]
        primary = STAGE_FIELDS[kind]
        groups = [primary] if kind in (stages.LIFT, stages.LOGITS) else \
            [primary, *((f,) for f in BLOCK_FIELDS if f not in primary)]
        best, searched = None, []
        for names in groups:
            if not names:
                continue
            searched += list(names)
            for c in _combos(conv, names, cfg, has_ln2):
                tried += 1
                if kind == stages.LIFT and not lift_agrees(c):
                    continue
                r = evaluate(c)
                if r.score > rep.score and (best is None or r.score > best[1].score):
                    best = (c, r)
                    if r.agrees:
                        break
            if best is not None:
                break
        if best is None:
            steps.append({"differs_at": where, "searched": searched, "changed": {}})
            break
        c, r = best
        steps.append({"differs_at": where, "searched": searched,
                      "changed": {k: {"was": conv[k], "now": c[k]} for k in SEARCH_FIELDS if not _same(c[k], conv[k])}})
        conv, rep = c, r
    return conv, rep, tried, steps


def check_remote(folder: Path, lm, log: Callable[[str], None]) -> RemoteCheck:
    """Compare the reference `lm` with the folder's own model; return the conventions that match.

    Raises ExportError when no combination reproduces the folder's model, naming the stage where
    the two part (export/stages.py).
    """
    t0 = time.perf_counter()
    remote = load_remote_model(folder)
    model_class = f"{type(remote).__module__.rsplit('.', 1)[-1]}.{type(remote).__name__}"
    ids = probe_ids(lm.cfg.vocab_size, lm.cfg.max_position_embeddings)
    run = stages.capture_folder(remote, ids, lm.cfg.hidden_size, lambda m: remote_logits(m, ids))
    del remote
    if run.logits.shape[-1] != lm.cfg.vocab_size:
        raise ExportError(f"--trust-remote-code: the folder's model gives {run.logits.shape[-1]} logits per position, "
                          f"the checkpoint's config says vocab_size {lm.cfg.vocab_size}; fix config.json")
    start = current_conventions(lm.cfg)
    conv, rep, tried, steps = search(lm, run, ids)
    changed = {k: (start[k], conv[k]) for k in SEARCH_FIELDS if not _same(conv[k], start[k])}
    if not rep.agrees:
        raise ExportError(
            f"--trust-remote-code: the folder's own model ({model_class}) computes other logits than the reference "
            f"under every combination tried ({tried}; closest: {_describe(changed)}). Stage by stage on the probe ids: "
            f"{rep.sentence()}. Nothing was exported")
    final = lm if not changed else _variant(lm, lm.state_dict(), conv)
    full = stages.compare_model(final, ids, run, stop_early=False)
    diff = full.stages[-1][2]
    if changed:
        log(f"[export] remote code: the folder's {model_class} matches the reference only with {_describe(changed)} "
            f"(max diff {diff:.1e} of max|logit|, {tried} combinations tried); exporting with these")
    else:
        log(f"[export] remote code: the folder's {model_class} matches the reference as configured "
            f"(max diff {diff:.1e} of max|logit|)")
    return RemoteCheck(model_class=model_class, conventions=conv, changed=changed, max_rel_diff=diff,
                       combinations_tried=tried, stages=full.to_dict(), steps=steps,
                       seconds=time.perf_counter() - t0)
