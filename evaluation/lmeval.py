"""`tablefree-onnx`: an lm-evaluation-harness model that runs an exported artifact with ONNX Runtime.

Researchers compare the table-free model with its learned-table baseline on lm-eval tasks; this
class lets them do it on the artifact itself (what users ship), with no server and no PyTorch model:

    python -m evaluation --model tablefree-onnx --model_args path=ARTIFACT --tasks tablefree_mc

(`python -m evaluation` is lm-eval's own CLI after this module has registered the name: lm-eval
0.4.13 finds models only in its registry, not through package entry points.)

Scoring follows lm-eval's HFLM conventions, so numbers are comparable with `--model hf`: a request
is context + continuation cut to the last `max_length + 1` tokens, scored in one prefill pass of the
runtime's generation graph (all positions' logits; rows of similar length batched, right-padded, up
to `batch_tokens` tokens per pass); rolling loglikelihoods use lm-eval's disjoint windows of
`max_length` tokens (`get_rolling_token_windows`, context 1); an empty context is the BOS token
(lm-eval's `prefix_token_id`). Log-softmax in float64, as `runtime.Model.score` does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import lm_eval.models  # noqa: F401  (lm-eval loads its own models only while its registry is empty: load them first)
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

import runtime

LOGSOFTMAX_CHUNK = 64  # positions per float64 log-softmax (64 x 65,536 x 8 bytes = 32 MB)


def continuation_logprobs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, bool]:
    """log p(target_i) under logits[i] (float64 log-softmax) and whether every target is the argmax.

    logits [n, V] (any float type), targets [n] int; chunked so the float64 copy stays small."""
    out = np.empty(len(targets), np.float64)
    greedy = True
    for s in range(0, len(targets), LOGSOFTMAX_CHUNK):
        lg = logits[s:s + LOGSOFTMAX_CHUNK].astype(np.float64)
        t = targets[s:s + LOGSOFTMAX_CHUNK]
        greedy = greedy and bool((lg.argmax(-1) == t).all())
        lg = lg - lg.max(-1, keepdims=True)
        out[s:s + len(t)] = lg[np.arange(len(t)), t] - np.log(np.exp(lg).sum(-1))
    return out, greedy


@register_model("tablefree-onnx")
class TableFreeONNX(TemplateLM):
    """lm-eval's LM interface on `runtime.load(path)`.

    model_args: path (the artifact folder), provider (cpu/cuda/auto), threads, graph (auto/kv/spec),
    max_length (tokens per scored window; default the model's context), batch_tokens (tokens per
    prefill pass; the all-position logits are batch_tokens x V floats), max_gen_toks (default 256),
    verify (sha256/size/none). `history` keeps every scored (context ids, continuation ids,
    log-probability, is_greedy), so a test can check each against an independent model.
    """

    def __init__(self, path: str | None = None, provider: str = "cpu", threads: int | None = None,
                 graph: str = "auto", max_length: int | None = None, batch_tokens: int = 2048,
                 max_gen_toks: int = 256, verify: str = "sha256", batch_size: Any = None,
                 max_batch_size: Any = None, device: Any = None, **unused: Any):
        super().__init__()
        if not path:
            raise ValueError("tablefree-onnx needs the artifact folder: --model_args path=ARTIFACT")
        self.model = runtime.load(path, provider=provider, threads=None if threads is None else int(threads),
                                  graph=graph, verify=verify)
        if self.model.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer.json; lm-eval tasks are text, re-export the folder with one")
        C = self.model.context_length
        self._max_length = int(max_length) if max_length else C
        if not 1 <= self._max_length <= C:
            raise ValueError(f"max_length = {self._max_length} must be in [1, {C}] (the model's context)")
        self.batch_tokens = max(int(batch_tokens), self._max_length + 1)
        self.max_gen_toks = int(max_gen_toks)
        self._batch_rows = int(batch_size) if str(batch_size or "").isdigit() and int(batch_size) > 0 else 64
        bos = self.model.info.token_id("bos_token_id")
        self._eot = self.model.eos_token_ids[0] if self.model.eos_token_ids else self.model.pad_token_id
        self._prefix = int(bos) if isinstance(bos, int) else self._eot
        self.path = str(Path(path))
        self.history: list[tuple[list[int], list[int], float, bool]] = []

    # -- what TemplateLM asks for ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return None  # base models: lm-eval's plain prompts

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.model.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)

    def get_model_info(self) -> dict:
        m = self.model.info.manifest
        return {"artifact": self.path, "lift": (m.get("lift") or {}).get("mode"), "precision": m.get("precision"),
                "provider": self.model.provider}

    # -- scoring -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Each (cache key, context ids, continuation ids) -> (sum log p(continuation), greedy)."""
        L = self._max_length
        rows = []  # (request index, input ids, continuation ids)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("a loglikelihood request has an empty continuation (the task's target is empty)")
            whole = (list(ctx) + list(cont))[-(L + 1):]
            rows.append((i, whole[:-1], list(cont)[-len(whole) + 1:] if len(cont) >= len(whole) else list(cont)))
        order = sorted(range(len(rows)), key=lambda j: -len(rows[j][1]))  # longest first: few pad columns
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        graph = self.model._generation_graph  # the graph `generate` and `score` run on
        start = 0
        while start < len(order):
            S = max(len(rows[order[start]][1]), 1)
            n = max(1, min(self._batch_rows, self.batch_tokens // S, len(order) - start))
            chunk = [rows[j] for j in order[start:start + n]]
            ids = np.full((n, S), self.model.pad_token_id, np.int64)
            lens = [len(r[1]) for r in chunk]
            for b, (_, inp, _) in enumerate(chunk):
                ids[b, :len(inp)] = inp
            logits = graph.new_cache(n, S).prefill(ids, lens, all_positions=True)  # [n, S, V]
            for b, (i, inp, cont) in enumerate(chunk):
                k = len(cont)
                logp, greedy = continuation_logprobs(logits[b, len(inp) - k:len(inp)], np.asarray(cont, np.int64))
                res = (float(logp.sum()), greedy)
                results[i] = res
                key, ctx, _ = requests[i]
                self.history.append((list(ctx), list(requests[i][2]), res[0], res[1]))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
            start += n
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over lm-eval's disjoint windows of max_length tokens."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length, context_len=1)]
            total = sum(x[0] for x in self._loglikelihood_tokens(windows, disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or seeded sampling when the task asks for a temperature) up to a stop string."""
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            do_sample = bool(kw.pop("do_sample", False)) or temperature > 0
            C = self.model.context_length
            max_new = max(1, min(max_new, C - 1))
            ids = self.tok_encode(context)[-(C - max_new):] or [self.prefix_token_id]
            res = self.model.generate(ids, max_new_tokens=max_new, do_sample=do_sample,
                                      temperature=temperature if do_sample else 1.0, stop=until or None,
                                      seed=1234 if do_sample else None)
            out.append(res.text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), res.text)
        return out
