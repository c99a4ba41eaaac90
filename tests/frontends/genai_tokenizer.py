"""Run in the onnxruntime-genai venv: encode and decode texts with genai's tokenizer and with `tokenizers`.

Usage: python genai_tokenizer.py MODEL_DIR TEXTS.json [ORIGINAL_TOKENIZER.json]
Prints one JSON object: per text the ids of genai, of `tokenizers` on the shipped file, of
`tokenizers` on ORIGINAL_TOKENIZER.json when given, and genai's decoding of its own ids.
"""
import json
import sys

import onnxruntime_genai as og
from tokenizers import Tokenizer

folder, texts_path = sys.argv[1], sys.argv[2]
texts = json.loads(open(texts_path, encoding="utf-8").read())
gtok = og.Tokenizer(og.Model(folder))
shipped = Tokenizer.from_file(f"{folder}/tokenizer.json")
original = Tokenizer.from_file(sys.argv[3]) if len(sys.argv) > 3 else None
out = []
for t in texts:
    g = [int(i) for i in gtok.encode(t)]
    row = {"text": t, "genai": g, "tokenizers": shipped.encode(t, add_special_tokens=False).ids,
           "genai_decoded": gtok.decode(g) if g else "", "tokenizers_decoded": shipped.decode(g) if g else ""}
    if original is not None:
        row["original"] = original.encode(t, add_special_tokens=False).ids
    out.append(row)
print(json.dumps({"version": og.__version__, "rows": out}, ensure_ascii=False))
