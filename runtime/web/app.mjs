// The page's glue: load the artifact served under /model/ with onnxruntime-web (WASM, served
// under /ort/ from a local install), then stream continuations. Tokenizer and generation loop
// live in tablefree.mjs, shared with the Node tests. After each run the page records
// window.lastResult and sets <body data-state="done"> so tests can read it.
import * as ort from '/ort/ort.wasm.min.mjs';
import { BPETokenizer, Generator } from '/tablefree.mjs';

const $ = (id) => document.getElementById(id);
const status = (text, error = false) => { $('status').textContent = text; $('status').className = error ? 'error' : ''; };
const fetchJSON = async (url) => { const r = await fetch(url); if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`); return r.json(); };

ort.env.wasm.wasmPaths = '/ort/';
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

const generators = {};
let config, tokenizer, about, stopRequested = false;

async function generator(graph) { // one session at a time: the weights of a large model fill WASM memory
  if (!generators[graph]) {
    for (const [other, gen] of Object.entries(generators)) { await gen.session.release(); delete generators[other]; }
    status(`loading ${graph}…`);
    const session = await ort.InferenceSession.create(`/model/${graph}`, {
      executionProviders: ['wasm'],
      externalData: [{ path: about.data_file, data: `/model/${about.data_file}` }],
    });
    generators[graph] = new Generator(ort, session, config);
  }
  return generators[graph];
}

async function run() {
  const greedy = document.querySelector('input[name=mode]:checked').value === 'greedy';
  const opts = {
    maxNewTokens: Number($('max').value),
    temperature: greedy ? 0 : Number($('temperature').value),
    topK: Number($('topk').value),
    seed: $('seed').value === '' ? undefined : Number($('seed').value),
  };
  const prompt = $('prompt').value, graph = $('graph').value;
  document.body.dataset.state = 'running';
  $('go').disabled = true; $('stop').disabled = false; stopRequested = false;
  const out = $('output');
  out.textContent = '';
  const p = document.createElement('span'); p.className = 'prompt'; p.textContent = prompt;
  const g = document.createElement('span'); g.className = 'gen';
  out.append(p, g);
  const result = { prompt_ids: tokenizer.encode(prompt), ids: [], text: '', graph, greedy };
  try {
    const gen = await generator(graph);
    const t0 = performance.now();
    let first = null;
    for await (const token of gen.generate(result.prompt_ids, opts)) {
      first ??= performance.now();
      result.ids.push(token);
      if (!gen.eos.includes(token)) g.textContent += tokenizer.decode([token]); // decoding is concatenation
      const n = result.ids.length, dt = (performance.now() - first) / 1000;
      status(`${n} tokens · ${n > 1 ? ((n - 1) / dt).toFixed(1) : '–'} tokens/s · ${graph} · ${greedy ? 'greedy' : `sampled (T ${opts.temperature}, top-k ${opts.topK}, seed ${opts.seed})`}`);
      if (stopRequested) break;
    }
    result.text = g.textContent;
    result.ms = performance.now() - t0;
  } catch (e) {
    result.error = String(e && e.message || e);
    status(result.error, true);
  }
  window.lastResult = result;
  $('go').disabled = false; $('stop').disabled = true;
  document.body.dataset.state = 'done';
}

async function main() {
  try {
    [about, config, tokenizer] = await Promise.all([
      fetchJSON('/artifact.json'),
      fetchJSON('/model/config.json'),
      fetchJSON('/model/tokenizer.json').then((j) => new BPETokenizer(j)),
    ]);
    const manifest = await fetchJSON('/model/manifest.json').catch(() => ({}));
    for (const f of about.graphs) { // the shared-buffer graph first: it decodes faster
      $('graph').append(new Option(f === 'model.onnx' ? `${f} (SPEC 3)` : `${f} (shared KV buffer)`, f));
    }
    $('model').textContent = [
      about.name,
      `${config.num_hidden_layers} layers · d ${config.hidden_size} · V ${config.vocab_size} · context ${config.max_position_embeddings}`,
      manifest.lift && `lift ${manifest.lift.mode}`,
      manifest.precision && `${manifest.precision}`,
      `onnxruntime-web ${ort.env.versions?.web ?? ''} (WASM, ${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? 's' : ''})`,
    ].filter(Boolean).join(' · ');
    await generator($('graph').value);
    status('ready');
    $('go').disabled = false;
    document.body.dataset.state = 'ready';
  } catch (e) {
    status(`cannot load the artifact: ${e && e.message || e}`, true);
    document.body.dataset.state = 'error';
  }
}

$('go').addEventListener('click', run);
$('stop').addEventListener('click', () => { stopRequested = true; });
$('prompt').addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !$('go').disabled) run(); });
main();
