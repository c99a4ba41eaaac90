"""The shipped tokenizer.json in a form onnxruntime-genai's tokenizer reads the same way `tokenizers` does.

Why a second form: onnxruntime-genai (0.18, through onnxruntime-extensions) has two BPE encoders,
picked from tokenizer.json (operators/tokenizer/bpe_kernels.cc, JsonFastTokenizer::Load):
- by default the GPT-2 byte-level one: every UTF-8 byte is mapped to a GPT-2 "byte character"
  before the vocab lookup, and the text is pre-split with the GPT-2 regex. The bvv241 vocab holds
  code points, so a space becomes id 288 ('Ġ'), 'é' two ids, and merges never cross the regex's
  word boundaries: `encode("ROMEO:")` gives [58002, 55797, 58] instead of [55841, 55712].
- the SentencePiece-style one, chosen when the decoder is a Sequence with a
  `Replace("▁" -> " ")` step (LoadSpmModelParams). It looks characters up as they are (UTF-8 of
  one code point, or a `<0xXX>` byte token) and runs the merges on ids, which is what a
  code-point BPE needs; but it turns every space into '▁' first (the id of the vocab string "▁"),
  and pre-splits the text with its Llama regex unless the pre-tokenizer is a top-level `Split`
  with a `Regex` pattern, which it then uses instead.

So the genai form is the same tokenizer with three changes that `tokenizers` undoes exactly:
1. the strings ' ' and '▁' trade places in every vocab entry and merge (the ids stay), and a
   normalizer swaps the two characters in the input (U+FFFF is the temporary; an input U+FFFF,
   which has no token and encodes as <unk>, is first sent to U+10FFFF, also <unk>); the decoder
   swaps them back, then fuses;
2. a pre-tokenizer `Split` on `[\\s\\S]+` (the whole text is one piece: the same as no
   pre-tokenizer for `tokenizers`, and it keeps genai off its Llama regex);
3. `<0x80>` ... `<0xFF>` byte tokens plus 3 merges chains so that a character without a token
   (emoji and other code points above U+FFFF, private-use characters, U+FFFF) falls back to its
   UTF-8 bytes in genai and those bytes merge back into ONE <unk>, as `tokenizers` gives. The byte
   tokens and their partial merges get ids from `vocab_size` up (never produced by the model,
   never reached by `tokenizers`, whose initial symbols are whole characters), and the complete
   sequences map to the <unk> id.

Known differences that remain (all inside genai; `tokenizers` is exact on every input):
- genai's merge loop (bpe_tokenizer_model.hpp, PerformBPE) applies the lowest-ranked pair at every
  place in one pass, as GPT-2's Python code does; `tokenizers` pops (rank, position) from a heap,
  so a pair that a merge has just formed goes first if it ranks lower. bvv241's merges rank
  3-grams before 2-grams, so on "XYXY" where "XYX" is a token they differ:
  `encode("erer")` is [er, er] in genai, [ere, r] in `tokenizers` (also "emem", "inin", "ENEN",
  " a a"). No tokenizer.json can change this without changing what `tokenizers` gives. Measured on
  3,000 random 1-400 character slices of tinyshakespeare: 43 differ for bvv241, 92 for the demo
  model's tokenizer; the fixed test set of tests/test_frontend_genai.py and its prompts agree.
  Exact prompts: encode with `tokenizers` (runtime.load(folder).encode) and give genai the ids
  (`generator.append_tokens(ids)`); genai's decoding is right.
- U+2581 '▁' in the input encodes as a space (genai maps both to one id before the lookup), and
  id 9601 decodes to ' ' in genai.
- genai looks the whole text up first, so a prompt that is exactly one vocab string the merges do
  not reach (e.g. a lone "<unused_55400>") gives that id.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

SPACE, SPM_SPACE = " ", "\u2581"
TEMP, SINK = "\uffff", "\U0010ffff"  # U+FFFF and U+10FFFF have no token in a bvv241 vocab: both encode as <unk>
WHOLE_TEXT = r"[\s\S]+"


class TokenizerFormError(ValueError):
    pass


def _swap(s: str) -> str:
    return s.translate({ord(SPACE): SPM_SPACE, ord(SPM_SPACE): SPACE})


def _replace(a: str, b: str) -> dict[str, Any]:
    return {"type": "Replace", "pattern": {"String": a}, "content": b}


def _byte(b: int) -> str:
    return f"<0x{b:02X}>"


def genai_tokenizer_json(tok: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The genai form (see the module docstring) of a bvv241-style tokenizer.json (as a dict).

    Refuses, with the reason, a tokenizer it was not made for: not BPE, a normalizer or
    pre-tokenizer already there, a decoder other than Fuse, byte_fallback, or `<0xXX>` tokens.
    `vocab_size` is the model's (the first id the helper tokens may take).
    """
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerFormError(f"tokenizer model {model.get('type')!r} is not BPE; the genai form is for code-point BPE tokenizers")
    for key in ("normalizer", "pre_tokenizer"):
        if tok.get(key) is not None:
            raise TokenizerFormError(f"tokenizer.json has a {key} ({tok[key].get('type')}); the genai form expects none (bvv241 style)")
    dec = tok.get("decoder")
    if dec is not None and dec.get("type") != "Fuse":
        raise TokenizerFormError(f"tokenizer.json decoder {dec.get('type')!r}: the genai form expects none or Fuse")
    if model.get("byte_fallback"):
        raise TokenizerFormError("tokenizer.json uses byte_fallback; the genai form expects characters without a token to become <unk>")
    vocab: dict[str, int] = model["vocab"]
    unk = model.get("unk_token")
    if unk not in vocab:
        raise TokenizerFormError(f"unk_token {unk!r} is not in the vocab; the genai form maps unknown characters to it")
    if any(_byte(b) in vocab for b in range(256)):
        raise TokenizerFormError("the vocab already has <0xXX> byte tokens; the genai form adds its own")
    if TEMP in "".join(vocab) or SINK in "".join(vocab):
        raise TokenizerFormError("the vocab holds U+FFFF or U+10FFFF, which the genai form uses as placeholders")
    unk_id = vocab[unk]

    out = copy.deepcopy(tok)
    m = out["model"]
    new_vocab = {_swap(s): i for s, i in vocab.items()}
    if any(not isinstance(p, list) for p in m["merges"]):
        raise TokenizerFormError("merges in the 'a b' string form are ambiguous for tokens with spaces; save with tokenizers >= 0.20")
    merges = [[_swap(a), _swap(b)] for a, b in m["merges"]]

    # byte tokens: one id per UTF-8 role, chains lead + continuations -> <unk>
    nxt = max(vocab_size, max(vocab.values()) + 1)
    ids = {}
    for role in ("cont", "lead2", "lead3", "lead4", "lead3+1", "lead4+1", "lead4+2"):
        ids[role] = nxt
        nxt += 1
    for b in range(0x80, 0x100):
        role = ("cont" if b < 0xC0 else "lead2" if 0xC2 <= b < 0xE0 else "lead3" if 0xE0 <= b < 0xF0
                else "lead4" if 0xF0 <= b < 0xF5 else None)
        new_vocab[_byte(b)] = ids[role] if role else unk_id
    c = _byte(0x80)
    l2, l3, l4 = _byte(0xC2), _byte(0xE0), _byte(0xF0)
    chain = [(l2, c, unk_id), (l3, c, ids["lead3+1"]), (l3 + c, c, unk_id),
             (l4, c, ids["lead4+1"]), (l4 + c, c, ids["lead4+2"]), (l4 + c + c, c, unk_id)]
    for a, b, target in chain:
        new_vocab[a + b] = target
        merges.append([a, b])
    m["vocab"] = new_vocab
    m["merges"] = merges
    out["normalizer"] = {"type": "Sequence", "normalizers": [
        _replace(TEMP, SINK), _replace(SPM_SPACE, TEMP), _replace(SPACE, SPM_SPACE), _replace(TEMP, SPACE)]}
    out["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": WHOLE_TEXT}, "behavior": "Isolated", "invert": False}
    out["decoder"] = {"type": "Sequence", "decoders": [
        _replace(SPACE, TEMP), _replace(SPM_SPACE, SPACE), _replace(TEMP, SPM_SPACE), {"type": "Fuse"}]}
    return out


def write_genai_tokenizer(folder: str | Path, vocab_size: int) -> bool:
    """Rewrite `folder/tokenizer.json` in the genai form, in place (temp file + rename).

    For the exporter's staging folder, after the tokenizer files are copied and before the
    manifest hashes them. Returns False (file untouched) when the tokenizer is not the kind this
    form is for, so other tokenizers ship as they came.
    """
    path = Path(folder) / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    try:
        new = genai_tokenizer_json(tok, vocab_size)
    except TokenizerFormError:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(new, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return True


__all__ = ["genai_tokenizer_json", "write_genai_tokenizer", "TokenizerFormError"]
