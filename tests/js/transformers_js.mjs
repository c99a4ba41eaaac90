// transformers.js (@huggingface/transformers, Node) loads an artifact folder and generates
// greedily from text, offline. The folder's model_type ("tablefree") is unknown to transformers.js,
// so the documented `config` option hands it the folder's own config.json with a model_type whose
// decoder-only path and key names ours follow (gpt_neox: num_hidden_layers, num_attention_heads,
// hidden_size; the graph's SPEC 3 interface does the rest); `subfolder: ''` because the graphs sit
// at the folder's root, not in onnx/.
// usage: node transformers_js.mjs DIR MAX_NEW_TOKENS PROMPT [PROMPT...]
// prints one JSON line: a list of {"prompt_ids": [...], "ids": [...], "text": "..."}, one per prompt
import fs from 'node:fs';
import path from 'node:path';
import { AutoModelForCausalLM, AutoTokenizer, env } from '@huggingface/transformers';

env.allowRemoteModels = false; // a local folder only: never reach for the hub

const [dir, maxNew, ...prompts] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
const model = await AutoModelForCausalLM.from_pretrained(dir, { config: { ...config, model_type: 'gpt_neox' }, subfolder: '' });
const tokenizer = await AutoTokenizer.from_pretrained(dir);
const results = [];
for (const prompt of prompts) {
  const inputs = tokenizer(prompt);
  const out = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
  const promptIds = Array.from(inputs.input_ids.data, Number);
  const ids = Array.from(out.data, Number).slice(promptIds.length);
  results.push({ prompt_ids: promptIds, ids, text: tokenizer.decode(ids, { skip_special_tokens: true }) });
}
console.log(JSON.stringify(results));
