"""A tokenizer that exists only as code (no tokenizer.json), written apart from export/.

Characters of a small alphabet, four merges applied lowest rank first (leftmost on ties), and the
UTF-8 bytes `<0xXX>` of every other character. tests/test_tokenizer_remote.py uses it as the oracle:
a tokenizer.json can say exactly this (a BPE with byte fallback), so the export must ship one that
encodes and decodes as this code does.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t", "é", "ж"]
MERGES = [("t", "h"), ("th", "e"), ("e", "r"), (" ", "t")]


def _byte(b: int) -> str:
    return f"<0x{b:02X}>"


class CharBPETokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs):
        tokens = SPECIALS + [_byte(b) for b in range(256)] + ALPHABET + [a + b for a, b in MERGES]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {pair: r for r, pair in enumerate(MERGES)}
        for key, value in (("pad_token", "<pad>"), ("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def _tokenize(self, text: str) -> list[str]:
        symbols: list[str] = []
        for ch in text:
            symbols += [ch] if ch in self.encoder else [_byte(b) for b in ch.encode("utf-8")]
        while len(symbols) > 1:
            ranked = [(self.bpe_ranks.get((a, b), len(MERGES)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(ranked)
            if rank == len(MERGES):
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder["<unk>"])

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder.get(index, "<unk>")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        for t in tokens:
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                out.append(int(t[3:5], 16))
            else:
                out += t.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()
