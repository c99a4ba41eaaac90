"""Run in the onnxruntime-genai venv: greedy generation from text with genai's own tokenizer.

Usage: python genai_generate.py MODEL_DIR PROMPTS.json MAX_NEW_TOKENS
Prints one JSON object: per prompt the prompt ids genai's tokenizer made, the new ids and the
continuation text genai decodes (token by token through its streaming decoder, as an app would).
"""
import json
import sys

import onnxruntime_genai as og

folder, prompts_path, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = og.Model(folder)
tok = og.Tokenizer(model)
rows = []
for prompt in json.loads(open(prompts_path, encoding="utf-8").read()):
    ids = [int(i) for i in tok.encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    stream = tok.create_stream()
    new, text = [], ""
    while not gen.is_done():
        gen.generate_next_token()
        t = int(gen.get_next_tokens()[0])
        new.append(t)
        text += stream.decode(t)
    rows.append({"prompt": prompt, "prompt_ids": ids, "ids": new, "text": text, "decoded": tok.decode(new)})
print(json.dumps({"version": og.__version__, "rows": rows}, ensure_ascii=False))
