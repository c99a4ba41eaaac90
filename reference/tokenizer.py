"""The 65,536-token tokenizer layout of the seed checkpoints ("bvv241-2-3", SPEC 4), and its builders.

The layout is fixed: a code point is its own id, special tokens sit at 0xE000, n-grams fill the
surrogate block 0xD800-0xDFFF and then the private-use block from 0xE100. Only the list of n-grams
differs between tokenizers, so `build_tokenizer(ngrams)` holds the layout once and two builders feed
it: `build_bvv241` (the author's n-gram file) and `build_corpus_tokenizer` (a corpus's own n-grams,
for the demo model). No torch here: the runtime and tools use this without the exporter's stack.

The bvv241-2-3 tokenizer is committed, built once by `build_bvv241` (`BVV241_DIR`, read with
`load_bvv241()`): the n-gram file it comes from is data outside the repository (TABLEFREE_DATA,
reference/data.py), and a clone must be able to test itself without it. The one test that
rebuilds it from the n-gram file and compares is in tests/test_tokenizer.py. To rebuild it:
`TABLEFREE_DATA=DIR python -c "from reference.tokenizer import *; save_tokenizer(build_bvv241(), BVV241_DIR)"`.
"""
from __future__ import annotations

import ast
import json
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import BPE

from .data import shared_data_file

VOCAB_SIZE = 65536
SPECIAL_TOKENS = (
    "<pad>", "<s>", "</s>", "<unk>", "<think>", "</think>", "<emotions>", "</emotions>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "[INST]", "[/INST]", "[EOT]",
    "[USER]", "[ASSISTANT]", "[FIM_PREFIX]", "[FIM_MIDDLE]", "[FIM_SUFFIX]", "[FIM_PAD]", "[REPO_NAME]",
    "[FILE_SEP]",
)
SPECIAL_START, SPECIAL_END = 0xE000, 0xE0FF  # inclusive
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0xE000, 0xE001, 0xE002, 0xE003
# Where n-grams go, in order: the surrogate block (never a valid code point) then private use.
NGRAM_RANGES = ((0xD800, 0xDFFF), (0xE100, 0xF8FF))
NGRAM_CAPACITY = sum(hi - lo + 1 for lo, hi in NGRAM_RANGES)
BVV241_LANGS = (
    "en ru fr de zh he it es ar pt ko hu sa la ja el sv nl pl vi fa no tr fi cs hy da bn az ka hi id".split()
)
BVV241_PER_LIST = 338
BVV241_FILE = "bvv241/ngrams-2-3.txt"  # relative to the data folder (TABLEFREE_DATA)
BVV241_DIR = Path(__file__).resolve().parent / "bvv241"  # the committed tokenizer files
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def is_code_point_token(cp: int) -> bool:
    """Code points that are their own token: 0x0000-0xD7FF and 0xF900-0xFFFE."""
    return 0 <= cp <= 0xD7FF or 0xF900 <= cp <= 0xFFFE


def _ngram_ids() -> list[int]:
    return [i for lo, hi in NGRAM_RANGES for i in range(lo, hi + 1)]


def build_tokenizer(ngrams: list[str]) -> Tokenizer:
    """The SPEC 4 layout around any n-gram list: one place for ids, specials, merges and decoding.

    `ngrams` are sorted here (longer first, then by string), so the caller's order does not matter.
    """
    ordered = sorted(set(ngrams), key=lambda s: (-len(s), s))
    if len(ordered) > NGRAM_CAPACITY:
        raise ValueError(f"{len(ordered)} n-grams do not fit the {NGRAM_CAPACITY} n-gram ids; pass fewer")
    vocab: dict[str, int] = {}
    for cp in range(VOCAB_SIZE):
        if is_code_point_token(cp):
            vocab[chr(cp)] = cp
    for i in range(SPECIAL_START, SPECIAL_END + 1):
        k = i - SPECIAL_START
        vocab[SPECIAL_TOKENS[k] if k < len(SPECIAL_TOKENS) else f"<special_token_{i}>"] = i
    for tid, gram in zip(_ngram_ids(), ordered):
        if gram in vocab:
            raise ValueError(f"n-gram {gram!r} is already a token (id {vocab[gram]}); n-grams need >= 2 code points")
        vocab[gram] = tid
    used = set(vocab.values())
    for i in range(VOCAB_SIZE):
        if i not in used:
            vocab[f"<unused_{i}>"] = i
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    merges = [(g[:i], g[i:]) for g in ordered for i in range(1, len(g)) if g[:i] in vocab and g[i:] in vocab]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=False, byte_fallback=False))
    # Without a decoder, `tokenizers` joins tokens with spaces; Fuse is plain concatenation (SPEC 4).
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def load_bvv241_ngrams(ngrams_path: str | Path | None = None) -> list[str]:
    """The n-grams SPEC 4 selects: first 338 of each n's list for each of the 32 languages."""
    path = Path(ngrams_path) if ngrams_path is not None else shared_data_file(BVV241_FILE)
    data = ast.literal_eval(path.read_text(encoding="utf-8"))  # a Python literal; never eval
    by_lang = {entry["lang"]: entry for entry in data}
    missing = [lang for lang in BVV241_LANGS if lang not in by_lang]
    if missing:
        raise ValueError(f"{path}: languages {missing} are missing; this is not the bvv241 n-gram file")
    grams: list[str] = []
    for lang in BVV241_LANGS:
        for n in (2, 3):
            grams += [g for g, _count in by_lang[lang]["top_ngrams"][n][:BVV241_PER_LIST]]
    return grams


def build_bvv241(ngrams_path: str | Path | None = None) -> Tokenizer:
    """bvv241-2-3, the seed checkpoints' tokenizer, rebuilt from the n-gram file (TABLEFREE_DATA)."""
    return build_tokenizer(load_bvv241_ngrams(ngrams_path))


def load_bvv241() -> Tokenizer:
    """The committed bvv241-2-3 tokenizer (no data folder needed)."""
    return load_tokenizer(BVV241_DIR)


def corpus_ngrams(text: str, n2: int = 1024, n3: int = 2048, min_count: int = 2) -> list[str]:
    """The corpus's most frequent 2- and 3-grams of code points the layout covers (ties by string)."""
    out: list[str] = []
    for n, k in ((2, n2), (3, n3)):
        counts = Counter(text[i:i + n] for i in range(len(text) - n + 1))
        ok = [(g, c) for g, c in counts.items() if c >= min_count and all(is_code_point_token(ord(ch)) for ch in g)]
        ok.sort(key=lambda gc: (-gc[1], gc[0]))
        out += [g for g, _ in ok[:k]]
    return out


def build_corpus_tokenizer(text: str, n2: int = 1024, n3: int = 2048, min_count: int = 2) -> Tokenizer:
    """A tokenizer in the bvv241 layout whose n-grams are this corpus's most frequent ones."""
    return build_tokenizer(corpus_ngrams(text, n2, n3, min_count))


def unknown_chars(tok: Tokenizer, text: str) -> list[str]:
    """Characters of text that have no token of their own (they would become <unk>)."""
    return sorted(ch for ch in set(text) if tok.token_to_id(ch) is None)


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids; characters outside the vocab become <unk> with a warning instead of an error."""
    bad = unknown_chars(tok, text)
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" + (f" {c!r}" if c.isprintable() else "") for c in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        warnings.warn(f"{len(bad)} character(s) outside the tokenizer's vocab become <unk>: {shown}{more}",
                      stacklevel=2)
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> str:
    """Concatenation of the token strings (SPEC 4)."""
    return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; tokenizer files are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int | None = None) -> None:
    """tokenizer.json plus the two configs transformers and transformers.js read, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    _write_atomic(folder / TOKENIZER_FILE, tok.to_str())
    _write_atomic(folder / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    _write_atomic(folder / SPECIAL_TOKENS_MAP_FILE, json.dumps(specials, indent=2) + "\n")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint or artifact folder (its tokenizer.json)."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json; copy the checkpoint's tokenizer files into {folder}")
    return Tokenizer.from_file(str(path))


__all__ = [
    "build_tokenizer", "build_bvv241", "load_bvv241", "BVV241_DIR", "build_corpus_tokenizer", "corpus_ngrams", "load_bvv241_ngrams",
    "save_tokenizer", "load_tokenizer", "encode", "decode", "unknown_chars", "is_code_point_token",
    "VOCAB_SIZE", "SPECIAL_TOKENS", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID",
]
