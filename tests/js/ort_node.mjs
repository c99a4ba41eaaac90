// onnxruntime-node runs an artifact's graph greedily, through the same generation loop and
// tokenizer as the browser page (runtime/web/tablefree.mjs).
// usage: node ort_node.mjs DIR GRAPH(model.onnx|model.kv.onnx) MAX_NEW_TOKENS PROMPT [PROMPT...]
// prints one JSON line: {"inputs": [graph input names], "results": [{"prompt_ids": [...], "ids": [...]}, ...]}
import fs from 'node:fs';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { BPETokenizer, Generator } from '../../runtime/web/tablefree.mjs';

const [dir, graph, maxNew, ...prompts] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
const tokenizer = new BPETokenizer(JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8')));
const session = await ort.InferenceSession.create(path.join(dir, graph), { executionProviders: ['cpu'] });
const gen = new Generator(ort, session, config, { shareBuffers: true }); // see Generator
const results = [];
for (const prompt of prompts) {
  const promptIds = tokenizer.encode(prompt);
  const ids = [];
  for await (const t of gen.generate(promptIds, { maxNewTokens: Number(maxNew) })) ids.push(t);
  results.push({ prompt_ids: promptIds, ids });
}
console.log(JSON.stringify({ inputs: session.inputNames, results }));
