"""A tokenizer whose code does what no tokenizer.json can: it reads the text backwards.

Written apart from export/. Each character of the reversed text is one token (or its UTF-8 bytes
`<0xXX>` when it has none), and decoding reverses the characters back, so the code round-trips
while every id sequence runs in the opposite order to a plain character tokenizer over the same
vocab. tests/test_tokenizer_remote.py expects the export to refuse to ship a tokenizer.json for it.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t"]


def _byte(b: int) -> str:
    return f"<0x{b:02X}>"


class MirrorTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs):
        tokens = SPECIALS + [_byte(b) for b in range(256)] + ALPHABET
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        for key, value in (("pad_token", "<pad>"), ("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def _tokenize(self, text: str) -> list[str]:
        out: list[str] = []
        for ch in reversed(text):
            out += [ch] if ch in self.encoder else [_byte(b) for b in ch.encode("utf-8")]
        return out

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
        return out.decode("utf-8", errors="replace")[::-1]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()
