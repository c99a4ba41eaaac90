"""Calibrated int4 weights (GPTQ) in ONNX Runtime's MatMulNBits layout.

Why our own and not ORT's `GPTQWeightOnlyQuantConfig` (the vendored Intel Neural Compressor
`gptq_quantize`, onnxruntime 1.32): it runs one full-model session over all calibration data per
distinct MatMul input (128 full-model passes for the 0.47B model), keeps float64 Hessians, and
after GPTQ's fake quantization re-quantizes the result with min/max per block (`quant_tensor`),
which need not land on the grid GPTQ chose (a block's later rows move after its scale is fixed).
Here the Hessians of every MatMul input come from text sampled once from the fp32 graph and one
prompt pass over it; GPTQ returns the integer levels, scales and zero points it used, and
`pack_nbits` writes exactly those, so the session runs the same MatMulNBits kernel as
round-to-nearest at the same block size and symmetry.

The grid is ORT's (MLAS) round-to-nearest grid, computed from the block's current weights when
GPTQ reaches the block's first row: asymmetric scale = (max(0, hi) - min(0, lo)) / 15 with an
integer zero point; symmetric scale = (the signed value of largest |w|) / -8, zero point 8.
With an identity Hessian and no error feedback this is bit-for-bit ORT's own RTN (tested).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

MAXQ = 15  # 4-bit levels 0..15


def block_grid(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per column of `w` [rows of one block, N], as MLAS's 4-bit quantizer sets them."""
    if symmetric:
        idx = np.abs(w).argmax(0)
        vmax = w[idx, np.arange(w.shape[1])]
        scale = vmax / -8.0
        zp = np.full(w.shape[1], 8.0, np.float32)
    else:
        lo = np.minimum(w.min(0), 0.0)
        hi = np.maximum(w.max(0), 0.0)
        scale = (hi - lo) / MAXQ
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale != 0, np.clip(np.round(-lo / np.where(scale != 0, scale, 1)), 0, MAXQ), 0.0)
    return scale.astype(np.float32), zp.astype(np.float32)


def _levels(w: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    inv = np.where(scale != 0, 1.0 / np.where(scale != 0, scale, 1), 0.0).astype(np.float32)
    return np.clip(np.round(w * inv) + zp, 0, MAXQ)


def rtn(w: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest on ORT's grid: (levels [K, N] uint8, scales [K/block, N], zero points [K/block, N])."""
    K, N = w.shape
    q = np.empty((K, N), np.uint8)
    s = np.empty((K // block, N), np.float32)
    z = np.empty((K // block, N), np.float32)
    for b in range(K // block):
        rows = w[b * block:(b + 1) * block]
        s[b], z[b] = block_grid(rows, symmetric)
        q[b * block:(b + 1) * block] = _levels(rows, s[b], z[b])
    return q, s, z.astype(np.uint8)


def dequantize(q: np.ndarray, s: np.ndarray, z: np.ndarray, block: int) -> np.ndarray:
    """The weights MatMulNBits computes with: (level - zero point) * scale, per block of rows."""
    return ((q.astype(np.float32) - np.repeat(z.astype(np.float32), block, 0)) * np.repeat(s, block, 0)).astype(np.float32)


def gptq(w: np.ndarray, H: np.ndarray, block: int, symmetric: bool, percdamp: float = 0.01,
         lazy: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) of `w` [K, N] (y = x @ w) for inputs with Hessian H = X^T X [K, K].

    Rows (input channels) are quantized in order; each row's rounding error, weighted by the
    inverse Hessian's Cholesky factor, is pushed onto the rows not yet quantized, so the output
    error ||X w - X q|| shrinks instead of each weight's own error. A block's grid is fixed when
    its first row is reached. Returns (levels uint8 [K, N], scales [K/block, N], zero points uint8).
    """
    K, N = w.shape
    if K % block or lazy % block:
        raise ValueError(f"GPTQ needs K ({K}) and the lazy batch ({lazy}) to be multiples of the block ({block})")
    W = w.astype(np.float32).copy()
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(K)] += percdamp * np.mean(np.diag(H))
    L = np.linalg.cholesky(np.linalg.inv(H))  # H^-1 = L L^T; GPTQ's upper factor is L^T
    U = L.T.astype(np.float32)
    del H, L
    q = np.empty((K, N), np.uint8)
    s = np.empty((K // block, N), np.float32)
    z = np.empty((K // block, N), np.float32)
    for i1 in range(0, K, lazy):
        i2 = min(i1 + lazy, K)
        W1 = W[i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            if r % block == 0:
                s[r // block], z[r // block] = block_grid(W1[i:i + block], symmetric)
            b = r // block
            lv = _levels(W1[i], s[b], z[b])
            q[r] = lv
            err = (W1[i] - (lv - z[b]) * s[b]) / U1[i, i]
            W1[i + 1:] -= np.outer(U1[i, i + 1:], err)
            E1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ E1
    return q, s, z.astype(np.uint8)


def pack_nbits(q: np.ndarray, s: np.ndarray, z: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels [K, N] -> MatMulNBits' 4-bit initializers: B uint8 [N, K/block, block/2] (two levels a
    byte, the even row in the low nibble), scales [N, K/block], zero points uint8 [N, ceil(K/block / 2)]."""
    K, N = q.shape
    kb = K // block
    qt = q.T.reshape(N, kb, block)
    B = (qt[..., 0::2] & 0x0F) | ((qt[..., 1::2] & 0x0F) << 4)
    zt = z.T  # [N, kb]
    if kb % 2:
        zt = np.concatenate([zt, np.full((N, 1), 8, np.uint8)], 1)  # ORT pads with 8
    Z = (zt[:, 0::2] & 0x0F) | ((zt[:, 1::2] & 0x0F) << 4)
    return B.astype(np.uint8), np.ascontiguousarray(s.T, np.float32), Z.astype(np.uint8)


def unpack_nbits(B: np.ndarray, S: np.ndarray, Z: np.ndarray | None, K: int, block: int) -> np.ndarray:
    """MatMulNBits' 4-bit initializers -> the float weights [K, N] the kernel computes with
    (Z None: symmetric, zero point 8). The test's oracle for `pack_nbits`."""
    N = B.shape[0]
    kb = K // block
    B = B.reshape(N, kb, block // 2)
    lv = np.empty((N, kb, block), np.float32)
    lv[..., 0::2], lv[..., 1::2] = B & 0x0F, B >> 4
    if Z is None:
        zp = np.full((N, kb), 8.0, np.float32)
    else:
        Z = Z.reshape(N, -1)
        zp = np.stack([Z & 0x0F, Z >> 4], -1).reshape(N, -1)[:, :kb].astype(np.float32)
    w = (lv - zp[..., None]) * S.reshape(N, kb)[..., None]
    return w.reshape(N, K).T.copy()


# -- calibration: Hessians of MatMul inputs from text sampled from the fp32 model itself ------------

def _with_outputs(src: Path, names: list[str]) -> bytes:
    """The graph at `src`, also outputting the tensors `names`, as bytes whose weights stay in
    src's data file (the session reads them from src's folder; nothing is written)."""
    m = onnx.load(str(src), load_external_data=False)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    return m.SerializeToString()


def calibration_hessians(src: str | Path, inputs: list[str], n_seq: int = 16, seq_len: int = 128, seed: int = 20261130,
                         log: Callable[[str], None] = lambda m: None,
                         threads: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """H = X^T X for each tensor in `inputs`, over `n_seq` sequences of `seq_len` tokens sampled
    (temperature 1, numpy seed `seed`) from the fp32 graph at `src` itself. Why sampled: the build
    then needs no corpus and no reference model in memory, and the text follows the model's own
    distribution, like the gate's held-out text (sampled with another generator and seed, torch
    1234, so calibration never sees the gate's text). Returns (Hessians float32, tokens seen)."""
    import onnxruntime as ort

    from runtime.interface import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS

    src = Path(src)
    rng = np.random.default_rng(seed)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent.resolve()))
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(_with_outputs(src, inputs), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    presents = [o.name for o in sess.get_outputs() if o.name.startswith("present")]
    V = next(o.shape[-1] for o in sess.get_outputs() if o.name == LOGITS)
    if not isinstance(V, int):
        raise ValueError(f"{src}: the logits' vocabulary dimension is not static ({V}); calibration samples from it")
    H: dict[str, np.ndarray | None] = {n: None for n in inputs}

    def feed(ids, start, past=None):
        f = {INPUT_IDS: ids}
        if ATTENTION_MASK in names:
            f[ATTENTION_MASK] = np.ones((ids.shape[0], start + ids.shape[1]), np.int64)
        if POSITION_IDS in names:
            f[POSITION_IDS] = np.broadcast_to(np.arange(start, start + ids.shape[1]), ids.shape).astype(np.int64)
        if past is not None:
            f.update(zip([p.name for p in pasts], past))
        return f

    def sample(logits: np.ndarray) -> np.ndarray:
        x = logits.astype(np.float64)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        c = p.cumsum(-1)
        return (c < rng.random((len(p), 1)) * c[:, -1:]).sum(-1).clip(0, p.shape[-1] - 1)[:, None].astype(np.int64)

    t0 = time.perf_counter()
    seq = rng.integers(0, V, (n_seq, 1)).astype(np.int64)
    if pasts:  # sample one token a step through the cache, asking for the logits and cache only
        hs, heads = pasts[0].shape[-1], pasts[0].shape[1]
        past = [np.zeros((n_seq, heads, 0, hs), np.float32) for _ in pasts]
        for t in range(seq_len - 1):
            out = sess.run([LOGITS, *presents], feed(seq[:, -1:], t, past))
            past = out[1:]
            seq = np.concatenate([seq, sample(out[0][:, -1])], 1)
            if (t + 2) % 32 == 0:
                log(f"  calibration: sampled {t + 2}/{seq_len} tokens x {n_seq} sequences ({time.perf_counter() - t0:.0f} s)")
        del past, out
    else:  # a graph without a cache input: each token from a full forward
        for t in range(seq_len - 1):
            logits = sess.run([LOGITS], feed(seq, 0))[0]
            seq = np.concatenate([seq, sample(logits[:, -1])], 1)
    # then the activations, two sequences at a time as one prompt each: the sampling's cache is gone
    # before the Hessians exist (and a prompt pass is faster than collecting them step by step)
    empty = [np.zeros((2, heads, 0, hs), np.float32) for _ in pasts] if pasts else None
    for i in range(0, n_seq, 2):
        rows = seq[i:i + 2]
        acts = sess.run(inputs, feed(rows, 0, None if empty is None else [e[:len(rows)] for e in empty]))
        for n, a in zip(inputs, acts):
            x = a.reshape(-1, a.shape[-1]).astype(np.float32)
            H[n] = x.T @ x if H[n] is None else H[n] + x.T @ x
        del acts
    seen = int(seq.size)
    log(f"  calibration: {seq_len} tokens x {n_seq} sequences, Hessians of {len(inputs)} inputs "
        f"({time.perf_counter() - t0:.0f} s)")
    del sess
    return H, seen


__all__ = ["block_grid", "rtn", "dequantize", "gptq", "pack_nbits", "unpack_nbits", "calibration_hessians"]
