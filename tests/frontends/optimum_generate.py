"""Run in the optimum venv (PYTHONPATH = the project root, for `runtime.hf`): greedy generation through
optimum's ORTModelForCausalLM, with io binding off and on, by `.generate()` and by
`pipeline("text-generation")`.

Usage: python optimum_generate.py MODEL_DIR PROMPTS.json MAX_NEW_TOKENS
Prints one JSON object: per io-binding setting and prompt, the prompt ids, the new ids of
`.generate()` and the pipeline's continuation text.
"""
import json
import sys
import warnings

import runtime.hf  # noqa: F401  (registers model_type "tablefree" with transformers)
import optimum.onnxruntime
import transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer, pipeline

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
folder, prompts_path, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.loads(open(prompts_path, encoding="utf-8").read())
tok = AutoTokenizer.from_pretrained(folder)
out = {"transformers": transformers.__version__, "optimum_onnx": getattr(optimum.onnxruntime, "__version__", "?"),
       "runs": {}}
for io_binding in (False, True):
    model = ORTModelForCausalLM.from_pretrained(folder, file_name="model.onnx", use_io_binding=io_binding,
                                                provider="CPUExecutionProvider")
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    rows = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=max_new, do_sample=False)[0].tolist()
        n = enc["input_ids"].shape[1]
        text = pipe(prompt, max_new_tokens=max_new, do_sample=False, return_full_text=False)[0]["generated_text"]
        rows.append({"prompt": prompt, "prompt_ids": ids[:n], "ids": ids[n:], "pipeline_text": text})
    out["runs"]["io_binding" if io_binding else "plain"] = rows
print(json.dumps(out, ensure_ascii=False))
