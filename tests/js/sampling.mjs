// Draws from the page's sampler (chooseToken in runtime/web/tablefree.mjs) so
// tests/test_frontend_js.py can compare the frequencies with softmax(logits / T) after top-k.
// usage: node sampling.mjs < {"logits": [...], "temperature": T, "top_k": K, "n": N, "seed": S}
// prints one JSON line: the count of every token id
import fs from 'node:fs';
import { chooseToken, seededRandom } from '../../runtime/web/tablefree.mjs';

const { logits, temperature, top_k: topK, n, seed } = JSON.parse(fs.readFileSync(0, 'utf8'));
const x = Float32Array.from(logits), random = seededRandom(seed), counts = new Array(x.length).fill(0);
for (let i = 0; i < n; i++) counts[chooseToken(x, { temperature, topK, random })] += 1;
console.log(JSON.stringify(counts));
