// Encodes texts with the page's BPE (runtime/web/tablefree.mjs) and with transformers.js's
// tokenizer, and decodes them back, so tests/test_frontend_js.py can compare both with the Python
// `tokenizers` library. usage: node tokenize.mjs DIR < texts.json (a JSON list of strings)
// prints one JSON line: {"bpe": [[ids]...], "bpe_decoded": [...], "transformers": [[ids]...], "transformers_decoded": [...]}
import fs from 'node:fs';
import path from 'node:path';
import { AutoTokenizer, env } from '@huggingface/transformers';
import { BPETokenizer } from '../../runtime/web/tablefree.mjs';

env.allowRemoteModels = false;
const dir = process.argv[2];
const texts = JSON.parse(fs.readFileSync(0, 'utf8'));
const bpe = new BPETokenizer(JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8')));
const hf = await AutoTokenizer.from_pretrained(dir);
const a = texts.map((t) => bpe.encode(t));
const b = texts.map((t) => hf.encode(t, { add_special_tokens: false }));
console.log(JSON.stringify({
  bpe: a, bpe_decoded: a.map((ids) => bpe.decode(ids)),
  transformers: b, transformers_decoded: b.map((ids) => (ids.length ? hf.decode(ids) : "")),
}));
