"""Seeded fuzz of checkpoint reading (issue 11): random damage to safetensors headers, config.json and
generation_config.json of a small checkpoint. Every outcome must be a successful load or one line of
the project's own error classes; any other exception (a traceback for the user) fails the test.

What runs per iteration is what `python -m export build` runs before tracing: `load_checkpoint`, then
on success the build's `load_reference` (overrides applied, model assembled on the meta device).
Deterministic: one seed, a fixed number of iterations (1,500: about 40 s on one core).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import struct
from pathlib import Path

import pytest

from reference.checkpoint import CheckpointError, load_checkpoint

SEED = 20261130
ITERATIONS = 1500

POOL = [0, 1, -1, 2, 7, 8, 31, 32, 64, 256, 1 << 31, 1 << 63, -(1 << 40), 0.0, 0.5, 1.0, -1.5, 256.0, 1e300,
        math.nan, math.inf, -math.inf, "", "32", "F32", "U8", "BF16", "F8", "nan", None, True, False, [], [0],
        [0, 0], [1, 0], [0, 1 << 62], [-256, 0], [32], [256, 32], [[1, 0], [0, 1]], {}, {"a": 1}, "layernorm",
        "rmsnorm", "gelu", "interleave", "msb_first", "plus_minus_one"]
CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "rope_theta", "layer_norm_eps", "hidden_act", "norm_type", "rope_pairing",
               "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id", "n_head", "n_embd", "block_size",
               "code", "code.bits", "code.scale", "code.bit_order", "code.values", "code.tiling", "code.A", "code.b"]
GEN_KEYS = ["eos_token_id", "bos_token_id", "max_length", "top_k", "top_p", "temperature", "do_sample"]
ENTRY_KEYS = ["dtype", "shape", "data_offsets"]


def pick(rng: random.Random):
    return rng.choice(POOL)


def mutate_header(rng: random.Random, path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                 and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    except (ValueError, AttributeError):
        return  # already damaged beyond a structured edit this iteration
    if len(names) < 2:
        return
    text: bytes | None = None
    kind = rng.randrange(6)
    if kind == 0:  # one field of one entry
        entry = header[rng.choice(names)]
        key = rng.choice(ENTRY_KEYS)
        if rng.random() < 0.2:
            entry.pop(key, None)
        else:
            entry[key] = pick(rng)
    elif kind == 1:  # offsets nudged by a little (the subtle case: overlap, gap, off by one)
        entry = header[rng.choice(names)]
        b, e = entry["data_offsets"]
        if isinstance(b, int) and isinstance(e, int):
            entry["data_offsets"] = [b + rng.randint(-8, 8), e + rng.randint(-8, 8)]
    elif kind == 2:  # a whole entry or the whole header replaced
        if rng.random() < 0.5:
            header[rng.choice(names + ["__metadata__"])] = pick(rng)
        else:
            header = pick(rng)
    elif kind == 3:  # offsets of two entries swapped
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif kind == 4:  # random bytes of the header text
        buf = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        text = bytes(buf)
    if text is None:
        text = json.dumps(header).encode()
    length = len(text)
    if kind == 5:  # the length prefix itself, or the file cut short
        length = rng.choice([0, 1, length - 1, length + 1, len(raw), 1 << 40])
        if rng.random() < 0.5:
            data = data[:rng.randrange(len(data) + 1)]
    path.write_bytes(struct.pack("<Q", length % (1 << 64)) + text + data)


def mutate_json(rng: random.Random, path: Path, keys: list[str]) -> None:
    d = json.loads(path.read_text())
    if not isinstance(d, dict):
        return
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(keys)
        obj, leaf = d, key
        if "." in key:
            parent, leaf = key.split(".")
            obj = d.get(parent)
            if not isinstance(obj, dict):
                continue
        if rng.random() < 0.15:
            obj.pop(leaf, None)
        else:
            obj[leaf] = pick(rng)
    path.write_text(json.dumps(d))


def one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


def test_random_damage_is_a_load_or_one_project_error(small_ckpt, tmp_path):
    from export.build import load_reference
    from export.errors import ExportError

    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    folder = tmp_path / "ckpt"
    for i in range(ITERATIONS):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(small_ckpt, folder)
        for _ in range(rng.randint(1, 2)):
            target = rng.random()
            if target < 0.5:
                mutate_header(rng, folder / "model.safetensors")
            elif target < 0.9:
                mutate_json(rng, folder / "config.json", CONFIG_KEYS)
            else:
                mutate_json(rng, folder / "generation_config.json", GEN_KEYS)
        try:
            load_checkpoint(folder)
        except CheckpointError as e:
            one_line(e)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"iteration {i}: {type(e).__name__}: {e}")
        try:
            load_reference(folder, None, {})
        except ExportError as e:
            one_line(e)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"iteration {i} (load_reference): {type(e).__name__}: {e}")
        outcomes["loaded"] += 1
    # the mutations reach both outcomes (a fuzz that only ever refuses tests little)
    assert outcomes["loaded"] > 10 and outcomes["refused"] > ITERATIONS // 2, outcomes
