"""A checkpoint whose tokenizer is code in the folder: shipped as a checked tokenizer.json, or said to run on ids.

The seed loads its tokenizer with `AutoTokenizer.from_pretrained(repo, trust_remote_code=True)`,
so a folder's tokenizer may be a Python class (`auto_map` in tokenizer_config.json, a
tokenization_*.py) rather than a tokenizer.json. The runtime reads tokenizer.json with the
`tokenizers` library only (no transformers, no folder code), so such a tokenizer must become a
tokenizer.json at export time, and only one that gives what the folder's code gives: otherwise
the artifact would turn a user's text into other ids than the model was trained on, silently.

With `--trust-remote-code` the folder's tokenizer is loaded through transformers and each
candidate tokenizer.json (the fast tokenizer's own `backend_tokenizer`; transformers'
`convert_slow_tokenizer`; a BPE built from the slow tokenizer's vocab and merges, by code points
with byte fallback or GPT-2 byte-level) is checked on TEST_STRINGS plus the tokenizer's special
tokens: ids with and without special tokens, and decoded text with and without skipping them,
must all equal the folder's code. The first candidate that passes ships; when none does, the
artifact has no tokenizer.json, runs on ids, and the manifest says why. Without the flag nothing
of the folder runs, and the build says which file/class would be needed (`note`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG = "tokenizer_config.json"
# The fixed test set (one place): ASCII, whitespace runs, tabs, newlines, CR, non-Latin scripts
# (CJK, Cyrillic, Arabic, Devanagari, Hebrew, Greek, Korean), combining marks, emoji with skin
# tones and ZWJ sequences, flags, and the empty string. The tokenizer's special tokens are added
# (alone and inside text) by `check_strings`.
TEST_STRINGS: tuple[str, ...] = (
    "Hello, world!",
    "the other thermometer: 3.14159 + 2 = 5?",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "  two leading spaces, three   inside, trailing  ",
    "\ttab\tseparated\t\tcolumns\t",
    "line one\nline two\n\n\nthree newlines\r\nand CRLF",
    " \n\t \u00a0mixed whitespace\u3000ideographic space",
    "中文分词测试，以及日本語のテキスト。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "שלום עולם, Καλημέρα κόσμε, 한국어 문장입니다.",
    "café naïve Größe e\u0301 (combining acute)",
    "emoji 👍 👍🏽 ❤️ 🇺🇦",
    "family 👨\u200d👩\u200d👧\u200d👦 and 🏳️\u200d🌈 (ZWJ sequences)",
    "<>[]{}|\\/~`@#$%^&*_-+=\"'",
    "",
)
CONVERTERS = ("backend_tokenizer", "convert_slow_tokenizer", "bpe from vocab (code points)",
              "bpe from vocab (byte-level)")


@dataclass
class TokenizerCode:
    """Where a folder says its tokenizer is code: the class (module.Class) and which file says so."""

    ref: str
    declared_in: str
    has_tokenizer_json: bool

    def describe(self) -> str:
        return f"{self.ref} ({self.declared_in})"


@dataclass
class RemoteTokenizer:
    """What the conversion found; `tokenizer_json` is None when the artifact runs on ids."""

    code: TokenizerCode
    tokenizer_class: str = ""
    tokenizer_json: str | None = None
    converter: str | None = None
    strings: int = 0
    first_difference: str | None = None
    line: str = ""  # the one line the build printed
    tried: dict[str, str] = field(default_factory=dict)  # converter -> why it did not ship

    @property
    def runs_on(self) -> str:
        return "text" if self.tokenizer_json is not None else "ids"

    def manifest(self) -> dict[str, Any]:
        """manifest.json -> tokenizer (docs/artifact.md)."""
        out: dict[str, Any] = {"source": "remote_code", "code": self.code.ref, "declared_in": self.code.declared_in,
                               "class": self.tokenizer_class, "runs_on": self.runs_on,
                               "file": "tokenizer.json" if self.tokenizer_json is not None else None,
                               "converter": self.converter,
                               "check": {"strings": self.strings, "passed": self.tokenizer_json is not None,
                                         "compared": "ids with and without special tokens; decoded text with and "
                                                     "without skipping special tokens",
                                         "first_difference": self.first_difference}}
        if self.tokenizer_json is None:
            out["reason"] = self.line.removeprefix("[export] ")
            out["tried"] = self.tried
        return out


def tokenizer_code(folder: Path) -> TokenizerCode | None:
    """The folder's tokenizer class when it is code (AutoTokenizer in an auto_map, or a
    tokenization_*.py named by tokenizer_class); None when the folder's tokenizer is files only."""
    folder = Path(folder)
    has_json = (folder / "tokenizer.json").is_file()
    for name in (TOKENIZER_CONFIG, "config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        ref = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        refs = [r for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if isinstance(r, str) and r]
        if refs:
            return TokenizerCode(", ".join(refs), f"auto_map in {name}", has_json)
    files = sorted(p.name for p in folder.glob("tokenization_*.py"))
    if files:
        return TokenizerCode(files[0], "a tokenization_*.py file", has_json)
    return None


def note(folder: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Without --trust-remote-code: one line naming the code and the flag; the manifest entry when the
    artifact will run on ids because of it (no tokenizer.json to ship)."""
    code = tokenizer_code(folder)
    if code is None:
        return None
    if code.has_tokenizer_json:
        log(f"[export] note: {folder.name}'s tokenizer is code, {code.describe()}, which was not run; its tokenizer.json "
            "ships as it is. Pass --trust-remote-code to check that tokenizer.json against the code")
        return None
    line = (f"note: {folder.name}'s tokenizer exists only as code, {code.describe()}, which was not run: the artifact "
            "will run on token ids only. Pass --trust-remote-code to convert it to a tokenizer.json (checked "
            f"against the code on {len(TEST_STRINGS)} strings and the special tokens)")
    log(f"[export] {line}")
    return {"source": "remote_code", "code": code.ref, "declared_in": code.declared_in, "runs_on": "ids",
            "file": None, "reason": line}


def check_strings(tok) -> list[str]:
    """TEST_STRINGS, then each special token alone and two inside text."""
    specials = [s for s in dict.fromkeys(getattr(tok, "all_special_tokens", []) or []) if isinstance(s, str) and s]
    out = list(TEST_STRINGS) + specials
    if specials:
        out.append(f"{specials[0]}the start, {specials[-1]} and the end{specials[0]}")
        out.append("".join(specials) + " " + " ".join(specials))
    return out


def _hf(tok, s: str) -> tuple[list[int], list[int]]:
    return list(tok(s, add_special_tokens=True)["input_ids"]), list(tok(s, add_special_tokens=False)["input_ids"])


def _first_difference(tok, cand, strings: list[str]) -> tuple[int, str] | None:
    """(index, what differs) of the first string on which `cand` (a tokenizers.Tokenizer) and the
    folder's tokenizer `tok` part; None when they agree on all."""
    for i, s in enumerate(strings):
        want, want_plain = _hf(tok, s)
        try:
            got, got_plain = cand.encode(s).ids, cand.encode(s, add_special_tokens=False).ids
        except Exception as e:  # a candidate that cannot encode this text
            return i, f"encoding raised {type(e).__name__}"
        if got != want:
            return i, f"ids {got[:8]} instead of {want[:8]}"
        if got_plain != want_plain:
            return i, f"ids without special tokens {got_plain[:8]} instead of {want_plain[:8]}"
        for skip in (False, True):
            text = tok.decode(want, skip_special_tokens=skip)
            back = cand.decode(want, skip_special_tokens=skip)
            if back != text:
                return i, f"decodes to {back[:40]!r} instead of {text[:40]!r}" + (" (skipping special tokens)" if skip else "")
    return None


def _special_template(tok):
    """A TemplateProcessing that adds what the folder's code adds around one sequence, or None."""
    from tokenizers import processors

    marker = -12345
    built = list(tok.build_inputs_with_special_tokens([marker])) if hasattr(tok, "build_inputs_with_special_tokens") else [marker]
    if built == [marker] or built.count(marker) != 1:
        return None
    at = built.index(marker)
    names = {i: tok.convert_ids_to_tokens(i) for i in built if i != marker}
    pieces = [names[i] for i in built[:at]] + ["$A"] + [names[i] for i in built[at + 1:]]
    return processors.TemplateProcessing(single=" ".join(pieces), special_tokens=[(n, i) for i, n in names.items()])


def _added_tokens(cand, tok) -> None:
    from tokenizers import AddedToken

    for i, t in sorted(getattr(tok, "added_tokens_decoder", {}).items()):
        content = getattr(t, "content", str(t))
        flags = {k: getattr(t, k, False) for k in ("lstrip", "rstrip", "single_word")}
        if getattr(t, "special", True):
            cand.add_special_tokens([AddedToken(content, special=True, normalized=False, **flags)])
        else:
            cand.add_tokens([AddedToken(content, normalized=False, **flags)])
        if cand.token_to_id(content) != i:
            raise ValueError(f"added token {content!r} would take id {cand.token_to_id(content)}, the folder's is {i}")


def _merges(tok) -> list[tuple[str, str]]:
    ranks = getattr(tok, "bpe_ranks", None)
    if isinstance(ranks, dict):
        return [tuple(p) for p, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    merges = getattr(tok, "merges", None) or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _from_vocab(tok, byte_level: bool):
    """A BPE over the slow tokenizer's own vocab and merges (no normalizer, whole text one word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = dict(tok.get_vocab())  # with the added tokens at their ids: the model keeps every id in place
    unk = tok.unk_token if getattr(tok, "unk_token", None) in vocab else None
    if byte_level:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        if not set(bytes_to_unicode().values()) <= set(vocab):
            raise ValueError("the vocab does not hold GPT-2's 256 byte characters")
        model = models.BPE(vocab=vocab, merges=_merges(tok), unk_token=unk)
        cand = Tokenizer(model)
        cand.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        cand.decoder = decoders.ByteLevel()
    else:
        fallback = all(f"<0x{b:02X}>" in vocab for b in range(256))
        cand = Tokenizer(models.BPE(vocab=vocab, merges=_merges(tok), unk_token=unk, byte_fallback=fallback))
        cand.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()]) if fallback else decoders.Fuse()
    _added_tokens(cand, tok)
    template = _special_template(tok)
    if template is not None:
        cand.post_processor = template
    return cand


def _candidates(tok):
    """(converter name, tokenizers.Tokenizer or the reason there is none), in order of preference."""
    from tokenizers import Tokenizer

    for name in CONVERTERS:
        try:
            if name == "backend_tokenizer":
                backend = getattr(tok, "backend_tokenizer", None)
                if backend is None:
                    raise ValueError("not a fast tokenizer")
                yield name, Tokenizer.from_str(backend.to_str())
            elif name == "convert_slow_tokenizer":
                if getattr(tok, "backend_tokenizer", None) is not None:
                    raise ValueError("a fast tokenizer: its backend was tried")
                from transformers.convert_slow_tokenizer import convert_slow_tokenizer

                yield name, Tokenizer.from_str(convert_slow_tokenizer(tok).to_str())
            else:
                yield name, _from_vocab(tok, byte_level="byte-level" in name)
        except Exception as e:  # a converter that does not apply to this class
            first = (str(e).strip().splitlines() or [""])[0]
            yield name, f"{type(e).__name__}: {first[:160]}"


def load_folder_tokenizer(folder: Path, code: TokenizerCode):
    """The folder's tokenizer through transformers with its code; errors made readable."""
    from .errors import ExportError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    except Exception as e:  # the folder's code can raise anything
        first = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"--trust-remote-code: transformers could not load the tokenizer code {code.describe()} in "
                          f"{folder} ({type(e).__name__}: {first[:240]}); fix the folder's tokenizer code") from None


def convert(folder: Path, vocab_size: int, log: Callable[[str], None]) -> RemoteTokenizer | None:
    """With --trust-remote-code: the folder's tokenizer code as a checked tokenizer.json (None when the
    folder's tokenizer is files only). Logs one line either way."""
    folder = Path(folder)
    code = tokenizer_code(folder)
    if code is None:
        return None
    tok = load_folder_tokenizer(folder, code)
    strings = check_strings(tok)
    out = RemoteTokenizer(code=code, tokenizer_class=type(tok).__name__, strings=len(strings))
    best: tuple[int, str, str] | None = None  # (index of the first differing string, converter, what differs)
    for name, cand in _candidates(tok):
        if isinstance(cand, str):
            out.tried[name] = cand
            continue
        top = max(cand.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= vocab_size:
            out.tried[name] = f"token ids up to {top}, the model's vocab_size is {vocab_size}"
            continue
        diff = _first_difference(tok, cand, strings)
        if diff is None:
            out.tokenizer_json, out.converter = cand.to_str(), name
            out.line = (f"[export] tokenizer: {folder.name}'s tokenizer code {code.ref} ships as tokenizer.json "
                        f"({name}), equal to the code on all {len(strings)} test strings (ids and decoded text)")
            log(out.line)
            return out
        out.tried[name] = f"string {diff[0]} {strings[diff[0]][:40]!r}: {diff[1]}"
        if best is None or diff[0] > best[0]:
            best = (diff[0], name, diff[1])
    if best is not None:
        i, name, what = best
        out.first_difference = strings[i]
        where = f"on test string {i} {strings[i][:40]!r} the closest conversion ({name}) gives {what}"
    else:
        where = "no conversion applies (" + "; ".join(f"{k}: {v}" for k, v in out.tried.items()) + ")"
    out.line = (f"[export] tokenizer: {folder.name}'s tokenizer code {code.ref} has no exact tokenizer.json: {where}. "
                "The artifact runs on token ids only: encode prompts with the folder's tokenizer and pass ids, or "
                "give the checkpoint a tokenizer.json that matches its code")
    log(out.line)
    return out


def tokenizer_stage(folder: Path, vocab_size: int, trust_remote_code: bool,
                    log: Callable[[str], None]) -> tuple[RemoteTokenizer | None, dict[str, Any] | None]:
    """The load stage's tokenizer step, before tracing: with the flag the folder's tokenizer code
    converted and checked (`convert`), without it the note (`note`); and the manifest's `tokenizer`
    entry (None when the folder's tokenizer is files only, or its tokenizer.json ships unchecked)."""
    if trust_remote_code:
        remote = convert(folder, vocab_size, log)
        return remote, remote.manifest() if remote is not None else None
    return None, note(folder, log)


def shipped_config(tc: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json for an artifact that ships the converted tokenizer.json: the folder's
    class and auto_map point at code the artifact does not have, so transformers (and every front end
    that reads the folder) is sent to PreTrainedTokenizerFast over tokenizer.json instead."""
    out = {k: v for k, v in tc.items() if k not in ("auto_map", "tokenizer_file")}
    out["tokenizer_class"] = "PreTrainedTokenizerFast"
    return out


__all__ = ["TEST_STRINGS", "TokenizerCode", "RemoteTokenizer", "tokenizer_code", "note", "convert", "tokenizer_stage", "shipped_config",
           "check_strings"]
