// The JavaScript half of the runtime: a tokenizer and a generation loop for a tablefree-onnx
// artifact folder, on any ONNX Runtime JavaScript binding (onnxruntime-web in the page,
// onnxruntime-node in tests/js). One module for both, so the code the browser runs is the code
// the Node tests check against the Python runtime.
//
// Why a tokenizer of our own: the artifact's tokenizer (SPEC 4, "bvv241") is a `tokenizers` BPE
// over Unicode code points; its merges join whole n-grams. The exporter ships it in the form
// onnxruntime-genai also reads (export/tokenizer_files.py): string Replace steps in the normalizer
// and decoder that swap ' ' and '\u2581', and a whole-text Split that splits nothing. Those are
// the only steps this module accepts. That is 60 lines here, needs no download and no bundler, and tests/js checks it
// against the Python `tokenizers` encoding.

const WHOLE_TEXT = '[\\s\\S]+';

/** [from, to] pairs of a normalizer or decoder made of string Replace steps (a Fuse decoder ends it). */
function replaceSteps(step, listKey, what) {
  if (!step) return [];
  const steps = step.type === 'Sequence' ? step[listKey] : [step];
  const out = [];
  for (const st of steps) {
    if (st.type === 'Replace' && st.pattern && typeof st.pattern.String === 'string') out.push([st.pattern.String, st.content]);
    else if (!(what === 'decoder' && st.type === 'Fuse')) {
      throw new Error(`tokenizer.json has a ${what} step (${st.type}) this small BPE does not run; only string Replace steps`);
    }
  }
  return out;
}

/** BPE over code points, as `tokenizers` runs it for a tokenizer.json with no pre-tokenizer:
 * special (added) tokens are split out first, every other code point is a symbol (or <unk>),
 * and the lowest-ranked merge applies first (the leftmost of equal ranks). */
export class BPETokenizer {
  constructor(json) {
    const model = json.model;
    if (!model || model.type !== 'BPE') throw new Error(`tokenizer.json: model type ${model && model.type} is not BPE`);
    this.normalize = replaceSteps(json.normalizer, 'normalizers', 'normalizer');
    this.decodeSteps = replaceSteps(json.decoder, 'decoders', 'decoder');
    const pre = json.pre_tokenizer;
    if (pre && !(pre.type === 'Split' && pre.pattern && pre.pattern.Regex === WHOLE_TEXT)) {
      throw new Error(`tokenizer.json has a pre-tokenizer (${pre.type}) this small BPE does not run; only a whole-text Split`);
    }
    this.vocab = new Map(Object.entries(model.vocab));
    this.tokens = [];
    for (const [s, id] of this.vocab) this.tokens[id] = s;
    this.added = (json.added_tokens || []).map((t) => [t.content, t.id]).sort((a, b) => b[0].length - a[0].length);
    for (const [s, id] of this.added) this.tokens[id] = s;
    this.unk = model.unk_token != null ? this.vocab.get(model.unk_token) : undefined;
    this.fuseUnk = !!model.fuse_unk;
    this.merges = new Map(); // "leftId rightId" -> [rank, newId]
    model.merges.forEach((m, rank) => {
      const [a, b] = Array.isArray(m) ? m : m.split(' ');
      const left = this.vocab.get(a), right = this.vocab.get(b), merged = this.vocab.get(a + b);
      if (left === undefined || right === undefined || merged === undefined) throw new Error(`tokenizer.json: merge ${JSON.stringify(m)} names a token outside the vocab`);
      this.merges.set(`${left} ${right}`, [rank, merged]);
    });
  }

  encode(text) {
    const out = [];
    let start = 0;
    for (let i = 0; i < text.length;) {
      const hit = this.added.find(([s]) => text.startsWith(s, i));
      if (hit) {
        if (i > start) this._bpe(text.slice(start, i), out);
        out.push(hit[1]);
        i += hit[0].length;
        start = i;
      } else {
        i += 1;
      }
    }
    if (start < text.length) this._bpe(text.slice(start), out);
    return out;
  }

  _bpe(text, out) {
    for (const [from, to] of this.normalize) text = text.split(from).join(to);
    const ids = [];
    for (const ch of text) { // code points, as Rust's chars()
      const id = this.vocab.get(ch);
      if (id !== undefined) ids.push(id);
      else if (this.unk === undefined) throw new Error(`character U+${ch.codePointAt(0).toString(16)} is not in the vocab and the tokenizer has no unk token`);
      else if (!(this.fuseUnk && ids.length && ids[ids.length - 1] === this.unk)) ids.push(this.unk);
    }
    // a doubly linked list of symbols and a heap of candidate merges (rank, then position)
    const n = ids.length, prev = new Int32Array(n), next = new Int32Array(n), alive = new Uint8Array(n).fill(1);
    for (let i = 0; i < n; i++) { prev[i] = i - 1; next[i] = i + 1 < n ? i + 1 : -1; }
    const heap = new MinHeap();
    const offer = (i) => {
      const j = next[i];
      if (j < 0) return;
      const m = this.merges.get(`${ids[i]} ${ids[j]}`);
      if (m) heap.push([m[0], i, m[1]]);
    };
    for (let i = 0; i + 1 < n; i++) offer(i);
    while (heap.size) {
      const [, i, merged] = heap.pop();
      if (!alive[i] || next[i] < 0) continue;
      const j = next[i], m = this.merges.get(`${ids[i]} ${ids[j]}`);
      if (!m || m[1] !== merged) continue; // stale: a neighbour changed since this was queued
      ids[i] = merged;
      alive[j] = 0;
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      if (prev[i] >= 0) offer(prev[i]);
      offer(i);
    }
    for (let i = 0; i < n; i++) if (alive[i]) out.push(ids[i]);
  }

  /** Decoding is the concatenation of the token strings (the Fuse decoder; SPEC 4). */
  decode(ids) {
    return ids.map((id) => {
      let piece = this.tokens[id] ?? '';
      for (const [from, to] of this.decodeSteps) piece = piece.split(from).join(to);
      return piece;
    }).join('');
  }
}

class MinHeap { // of [rank, position, id] arrays, ordered by rank then position
  constructor() { this.a = []; }
  get size() { return this.a.length; }
  static less(x, y) { return x[0] < y[0] || (x[0] === y[0] && x[1] < y[1]); }
  push(v) {
    const a = this.a;
    a.push(v);
    for (let i = a.length - 1; i > 0;) {
      const p = (i - 1) >> 1;
      if (!MinHeap.less(a[i], a[p])) break;
      [a[i], a[p]] = [a[p], a[i]];
      i = p;
    }
  }
  pop() {
    const a = this.a, top = a[0], last = a.pop();
    if (a.length) {
      a[0] = last;
      for (let i = 0; ;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < a.length && MinHeap.less(a[l], a[m])) m = l;
        if (r < a.length && MinHeap.less(a[r], a[m])) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m], a[i]];
        i = m;
      }
    }
    return top;
  }
}

/** A small seeded generator (mulberry32), so a sampled run can be repeated in the page. */
export function seededRandom(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The next token from one row of logits: the argmax (first of equal maxima, as numpy's) when
 * greedy, else a draw after temperature and top-k (the runtime's order: temperature, then top-k). */
export function chooseToken(logits, { temperature = 0, topK = 0, random = Math.random } = {}) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (!(temperature > 0)) return best;
  const V = logits.length;
  let floor = -Infinity;
  if (topK > 0 && topK < V) floor = Float32Array.from(logits).sort()[V - topK]; // keep ties at the boundary
  const max = logits[best] / temperature;
  const cum = new Float64Array(V);
  let total = 0;
  for (let i = 0; i < V; i++) {
    if (logits[i] >= floor) total += Math.exp(logits[i] / temperature - max);
    cum[i] = total;
  }
  const u = random() * total;
  let lo = 0, hi = V - 1;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (cum[mid] > u) hi = mid; else lo = mid + 1; }
  return lo;
}

/** One artifact's graph in an ONNX Runtime session, batch 1. Either graph of the folder works:
 * model.onnx (SPEC 3: attention_mask, position_ids, past -> present) or model.kv.onnx (one cache
 * buffer per layer of max_len positions; seqlens_k and total_sequence_length say where the new
 * tokens go, graphs/gqa.py). */
export class Generator {
  /** shareBuffers (kv graph): bind each cache buffer as past AND preallocated present, so ORT writes
   * the new positions in place (as runtime/model.py's _SharedCache does). onnxruntime-node 1.30
   * does (tests/js/ort_node.mjs). onnxruntime-web 1.30 (WASM) copies a preallocated CPU output into
   * its heap, runs, and hands back the caller's tensor without copying the result out (its run() in
   * ort.wasm.mjs), so the page leaves this off and feeds the returned presents back (a copy of the
   * cache per step). */
  constructor(ort, session, config, { shareBuffers = false } = {}) {
    this.ort = ort;
    this.session = session;
    this.layers = config.num_hidden_layers;
    this.heads = config.num_attention_heads;
    this.headSize = config.hidden_size / config.num_attention_heads;
    this.vocab = config.vocab_size;
    this.context = config.max_position_embeddings;
    const eos = config.eos_token_id;
    this.eos = eos == null ? [] : [].concat(eos);
    this.kv = session.inputNames.includes('seqlens_k');
    this.share = this.kv && shareBuffers;
    this.hasKeep = session.inputNames.includes('logits_to_keep');
  }

  _ids(values) { return new this.ort.Tensor('int64', BigInt64Array.from(values, BigInt), [1, values.length]); }

  _cache(len) {
    const feeds = {};
    for (let i = 0; i < this.layers; i++) {
      for (const kind of ['key', 'value']) {
        feeds[`past_key_values.${i}.${kind}`] = new this.ort.Tensor('float32', new Float32Array(this.heads * len * this.headSize), [1, this.heads, len, this.headSize]);
      }
    }
    return feeds;
  }

  /** Yield up to maxNewTokens token ids after promptIds (stopping after an end token). */
  async *generate(promptIds, { maxNewTokens = 64, temperature = 0, topK = 0, seed = undefined } = {}) {
    const S = promptIds.length;
    if (S < 1) throw new Error('empty prompt: give at least one token');
    if (S + maxNewTokens > this.context) throw new Error(`prompt (${S} tokens) + ${maxNewTokens} new tokens exceeds the model's context of ${this.context}`);
    const random = seed === undefined ? Math.random : seededRandom(seed);
    const keep = this.hasKeep ? { logits_to_keep: new this.ort.Tensor('int64', BigInt64Array.from([1n]), [1]) } : {};
    let cache = this.kv ? this._cache(S + maxNewTokens) : this._cache(0);
    let feeds = { input_ids: this._ids(promptIds), ...keep, ...cache };
    if (this.kv) {
      feeds.seqlens_k = new this.ort.Tensor('int32', Int32Array.from([S - 1]), [1]);
      feeds.total_sequence_length = new this.ort.Tensor('int32', Int32Array.from([S]), []);
    } else {
      feeds.attention_mask = this._ids(new Array(S).fill(1));
      feeds.position_ids = this._ids([...Array(S).keys()]);
    }
    // shared: the presents are the pasts' own memory; otherwise the presents become the next pasts
    // (on the kv graph the whole max_len buffers, their new positions written)
    const fetches = this.share ? { logits: null } : undefined;
    if (this.share) for (const name of Object.keys(cache)) fetches[name.replace('past_key_values.', 'present.')] = cache[name];
    for (let step = 0, P = S; ; step++, P++) {
      const out = await (fetches ? this.session.run(feeds, fetches) : this.session.run(feeds));
      const logits = out.logits.data, n = out.logits.dims[1];
      const last = logits.subarray((n - 1) * this.vocab, n * this.vocab);
      const token = chooseToken(last, { temperature, topK, random });
      yield token;
      if (this.eos.includes(token) || step + 1 >= maxNewTokens) return;
      if (!this.share) {
        cache = {};
        for (let i = 0; i < this.layers; i++) {
          for (const kind of ['key', 'value']) cache[`past_key_values.${i}.${kind}`] = out[`present.${i}.${kind}`];
        }
      }
      feeds = { input_ids: this._ids([token]), ...cache };
      if (this.kv) {
        feeds.seqlens_k = new this.ort.Tensor('int32', Int32Array.from([P]), [1]);
        feeds.total_sequence_length = new this.ort.Tensor('int32', Int32Array.from([P + 1]), []);
      } else {
        feeds.attention_mask = this._ids(new Array(P + 1).fill(1));
        feeds.position_ids = this._ids([P]);
      }
    }
  }
}
