"""Where two models part: the reference's stages, found by value among what the folder's model computes.

`--trust-remote-code` runs a checkpoint's own code beside the reference. When the logits differ,
"they differ" is no help to a user; this module says where. The reference is cut into stages on
the probe ids (the lift = the input to the first block; per block the attention's input, the
attention branch, the MLP's input, the MLP branch, the block's output; the final norm; the
logits). The folder's model is run once with a hook on every module, keeping every input and
output of shape [batch, seq, d]. A reference stage *agrees* when some recorded folder tensor equals
it within the fp32 parity bound (relative to the stage's max |value|).

Why by value and not by module name: the folder's names and module boundaries are its author's
(nanoGPT, GPT-NeoX, anything), and a stage such as "the MLP's input" is a tensor the folder may
compute inline. Every published block exposes its branches as module outputs and its norms'
outputs as module inputs, so by-value matching finds them wherever they are. A stage the folder
computes but never passes through a module boundary cannot be seen, and is reported as differing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .floors import FP32_REL_TOL

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays cheap
    import torch

LIFT, ATTN_IN, ATTN, MLP_IN, MLP, OUT, FINAL_NORM, LOGITS = (
    "lift", "attn_in", "attn", "mlp_in", "mlp", "out", "final_norm", "logits")

# what a first difference at each kind of stage means, after the search tried its fields
HINTS = {
    LIFT: "the input vectors are not the lift under any bit order, value map, tiling and scale tried "
          "(another code width, a position-dependent input, or a learned table?)",
    ATTN_IN: "the attention does not read a norm of the block input (norm type tried: layernorm, rmsnorm); "
             "the block is not pre-LN (post-LN?)",
    ATTN: "the attention differs on the same input (RoPE pairing, rotary dim and base tried; "
          "another score scale, ALiBi or learned positions?)",
    MLP_IN: "the residual layout is not sequential pre-LN, nor parallel with one or two norms",
    MLP: "the MLP differs on the same input (activations tried: gelu, gelu_tanh; a gated MLP or another activation?)",
    OUT: "both branches agree but their sum does not: the residual layout is not x + attn + mlp "
         "(post-LN, or a scaled residual?)",
    FINAL_NORM: "the final norm differs (norm type tried: layernorm, rmsnorm)",
    LOGITS: "the head differs (tied to another tensor, a bias, or a logit scale?)",
}
_KIND_WORDS = {ATTN_IN: "attention input", ATTN: "attention", MLP_IN: "MLP input", MLP: "MLP", OUT: "output"}


@dataclass
class Stage:
    """One reference stage: its name for a person, its kind (which fields can move it) and value."""

    name: str
    kind: str
    layer: int | None
    value: torch.Tensor


def stage_name(kind: str, layer: int | None) -> str:
    if kind == LIFT:
        return "the lift"
    if kind == FINAL_NORM:
        return "the final norm"
    if kind == LOGITS:
        return "the logits"
    return f"layers.{layer}'s {_KIND_WORDS[kind]}"


def _first_tensor(args: Any, kwargs: dict | None = None) -> torch.Tensor | None:
    import torch

    for a in (*(args if isinstance(args, (tuple, list)) else (args,)), *((kwargs or {}).values())):
        if isinstance(a, torch.Tensor):
            return a
    return None


def reference_stages(lm, ids: torch.Tensor, on_stage: Callable[[Stage], None] | None = None) -> list[Stage]:
    """The reference's stages on `ids`, in the order the model computes them (hooks on its own modules).

    `on_stage` sees each stage as soon as it exists; it may raise to stop the forward pass there."""
    import torch

    rec: list[Stage] = []
    handles = []

    def add(stage: Stage) -> None:
        rec.append(stage)
        if on_stage is not None:
            on_stage(stage)

    def grab(kind: str, layer: int | None, inputs: bool) -> Callable:
        def hook(module, args, out=None):
            t = _first_tensor(args) if inputs else _first_tensor(out)
            add(Stage(stage_name(kind, layer), kind, layer, t.detach().float().clone()))
        return hook

    try:
        handles.append(lm.layers[0].register_forward_pre_hook(grab(LIFT, None, True)))
        for i, layer in enumerate(lm.layers):
            handles.append(layer.attn.register_forward_pre_hook(grab(ATTN_IN, i, True)))
            handles.append(layer.attn.register_forward_hook(grab(ATTN, i, False)))
            handles.append(layer.mlp.register_forward_pre_hook(grab(MLP_IN, i, True)))
            handles.append(layer.mlp.register_forward_hook(grab(MLP, i, False)))
            handles.append(layer.register_forward_hook(grab(OUT, i, False)))
        handles.append(lm.ln_f.register_forward_hook(grab(FINAL_NORM, None, False)))
        with torch.no_grad():
            logits = lm(ids)[0]
    finally:
        for h in handles:
            h.remove()
    add(Stage("the logits", LOGITS, None, logits.detach().float()))
    return rec


def stage_count(lm) -> int:
    """The lift, five stages per block, the final norm, the logits."""
    return 1 + 5 * len(lm.layers) + 2


@dataclass
class FolderRun:
    """What the folder's model computed on the probe ids: its logits and every [B, T, d] module tensor."""

    logits: torch.Tensor
    hidden: torch.Tensor  # [N, B*T*d]: every distinct [B, T, d] module input/output, flattened


def capture_folder(model, ids: torch.Tensor, width: int, logits_of: Callable[[Any], torch.Tensor]) -> FolderRun:
    """Run the folder's model once with hooks on every module, keeping [B, T, width] inputs and outputs."""
    import torch

    B, T = ids.shape
    seen: dict[int, torch.Tensor] = {}
    alive: list[torch.Tensor] = []

    def keep(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.shape == (B, T, width) and obj.is_floating_point() and id(obj) not in seen:
                seen[id(obj)] = obj.detach().float().clone()
                alive.append(obj)  # held until the run ends, so no later tensor reuses its id
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                keep(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                keep(o)

    def pre(module, args, kwargs):
        keep(args)
        keep(kwargs)

    def post(module, args, kwargs, out):
        keep(out)

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        logits = logits_of(model)
    finally:
        for h in handles:
            h.remove()
    hidden = torch.stack([t.reshape(-1) for t in seen.values()]) if seen else torch.zeros(0, B * T * width)
    return FolderRun(logits=logits.float(), hidden=hidden)


def rel_diff(stage: Stage, run: FolderRun) -> float:
    """The smallest max|diff| / max|stage| over the folder's tensors: 0 when the folder computes the stage."""
    want = stage.value
    scale = float(want.abs().max()) or 1.0
    if stage.kind == LOGITS:
        return float((run.logits - want).abs().max()) / scale if run.logits.shape == want.shape else float("inf")
    flat = want.reshape(-1)
    if run.hidden.shape[0] == 0 or run.hidden.shape[1] != flat.numel():
        return float("inf")
    return float((run.hidden - flat).abs().amax(dim=1).min()) / scale


@dataclass
class StageReport:
    """Stage by stage: (name, relative diff) up to and including the first stage that differs."""

    stages: list[tuple[str, str, float]]  # (name, kind, rel diff)
    first_bad: int | None  # index into stages; None when every stage agrees
    total: int  # how many stages the reference has

    @property
    def agrees(self) -> bool:
        return self.first_bad is None

    @property
    def score(self) -> int:
        """How far the models agree: the index of the first differing stage (total when none differs)."""
        return self.total if self.first_bad is None else self.first_bad

    @property
    def first_kind(self) -> str | None:
        return None if self.first_bad is None else self.stages[self.first_bad][1]

    def sentence(self) -> str:
        """'the lift and layers.0's attention input agree; layers.0's attention differs: <hint>'."""
        if self.first_bad is None:
            return f"all {self.total} stages agree (the lift, every block's attention, MLP and output, the final norm, the logits)"
        good = [n for n, _, _ in self.stages[: self.first_bad]]
        name, kind, diff = self.stages[self.first_bad]
        agree = f"{_summarise(good)} agree{'s' if len(good) == 1 else ''}; " if good else ""
        return f"{agree}{name} differs (max diff {diff:.1e} of its max|value|): {HINTS[kind]}"

    def to_dict(self) -> dict:
        return {"agree": self.first_bad is None, "stages_total": self.total,
                "first_difference": None if self.first_bad is None else self.stages[self.first_bad][0],
                "summary": self.sentence(),
                "max_rel_diff": {n: (d if d != float("inf") else None) for n, _, d in self.stages}}


def _summarise(names: list[str]) -> str:
    """Name agreeing stages briefly: whole blocks as 'layers.0-3', a partial block by its parts."""
    import re

    whole: list[int] = []
    parts: dict[int, list[str]] = {}
    other: list[str] = []
    for n in names:
        m = re.fullmatch(r"layers\.(\d+)'s (.+)", n)
        if not m:
            other.append(n)
            continue
        i = int(m.group(1))
        parts.setdefault(i, []).append(m.group(2))
        if m.group(2) == "output":
            whole.append(i)
    out = [o for o in other if o != "the final norm" and o != "the logits"]
    if whole:
        out.append(f"layers.{whole[0]}" if len(whole) == 1 else f"layers.{whole[0]}-{whole[-1]}")
    for i, ps in parts.items():
        if i not in whole:
            out.append(f"layers.{i}'s " + " and ".join(ps) if len(ps) <= 2 else f"layers.{i}'s {', '.join(ps[:-1])} and {ps[-1]}")
    out += [o for o in other if o in ("the final norm", "the logits")]
    return out[0] if len(out) == 1 else ", ".join(out[:-1]) + " and " + out[-1]


def compare(stages: list[Stage], run: FolderRun, tol: float = FP32_REL_TOL, stop_early: bool = True) -> StageReport:
    """Walk the reference's stages in order; the first one the folder does not compute is where they part."""
    out: list[tuple[str, str, float]] = []
    first_bad = None
    for i, st in enumerate(stages):
        d = rel_diff(st, run)
        out.append((st.name, st.kind, d))
        if d > tol and first_bad is None:
            first_bad = i
            if stop_early:
                break
    return StageReport(out, first_bad, len(stages))


class _Parted(Exception):
    """Raised inside the reference's forward pass at the first differing stage: the rest is not needed."""


def compare_model(lm, ids: torch.Tensor, run: FolderRun, tol: float = FP32_REL_TOL,
                  stop_early: bool = True) -> StageReport:
    """`compare(reference_stages(lm, ids), run)`, computed while the reference runs and, with
    `stop_early`, stopped at the first differing stage.

    Why: the search tries candidates that mostly part from the folder in the block it is fixing,
    often layers.0; stopping there costs a fraction of a forward pass (no later block, no head)."""
    out: list[tuple[str, str, float]] = []
    first_bad: list[int] = []

    def on_stage(st: Stage) -> None:
        d = rel_diff(st, run)
        out.append((st.name, st.kind, d))
        if d > tol and not first_bad:
            first_bad.append(len(out) - 1)
            if stop_early:
                raise _Parted

    try:
        reference_stages(lm, ids, on_stage)
    except _Parted:
        pass
    return StageReport(out, first_bad[0] if first_bad else None, stage_count(lm))
