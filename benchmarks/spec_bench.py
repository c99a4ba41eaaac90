"""Decode speed with and without prompt-lookup speculative decoding (issue 15, item 2), same run.

On the trained demo model (models/shakespeare, exported here with the arith lift, or --model DIR),
greedy, batch 1, two kinds of prompt:
  repeat     a well-known Shakespeare passage, a blank line, then its first line again: the
             continuation can repeat the passage, which is where prompt lookup should pay
  fresh      a speaker and a line or two that the prompt does not repeat
  sampled    the fresh prompts again, sampling (temperature 0.8, top-k 40, seeded): drafts are
             accepted less often than under greedy decoding
For every prompt, each round times `Model.generate` plain and with speculative="prompt_lookup"
back to back (the order alternating between rounds), checks that both return the same tokens,
and keeps the ratio plain / speculative of that round, in wall time and in this process's CPU
time; a prompt's figure is the median of its rounds, a kind's figure the geometric mean over its
prompts. The machine is shared with other work, so absolute tok/s move with the load and the
ratios of interleaved rounds are the figures to read; with --threads 1 ONNX Runtime computes on
the calling thread, and CPU time counts the work done whatever else the machine runs (wall time
also counts the waits for a core). A separate untimed run per prompt counts drafted / accepted
tokens and Runs.

    .venv/bin/python benchmarks/spec_bench.py [--model DIR] [--rounds 7] [--max-new-tokens 96] [--threads 2]

Writes benchmarks/results/spec.json and prints a table.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

from common import CACHE, RESULTS, ROOT, THREADS, log, markdown_table, text_table, write_json

import runtime
from runtime.speculative import DRAFT_TOKENS, PROMPT_LOOKUP, SpecStats, speculative_steps

# Public-domain lines, quoted from memory of the plays (the training corpus is not in the repo).
PASSAGES = {
    "richard3": """GLOUCESTER:
Now is the winter of our discontent
Made glorious summer by this sun of York;
And all the clouds that lour'd upon our house
In the deep bosom of the ocean buried.
Now are our brows bound with victorious wreaths;
Our bruised arms hung up for monuments;""",
    "romeo": """JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

ROMEO:
Shall I hear more, or shall I speak at this?""",
    "gaunt": """JOHN OF GAUNT:
This royal throne of kings, this scepter'd isle,
This earth of majesty, this seat of Mars,
This other Eden, demi-paradise,
This fortress built by Nature for herself
Against infection and the hand of war,
This happy breed of men, this little world,""",
    "citizens": """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.""",
    "hamlet": """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them.""",
}

# Openings written for this benchmark: nothing in them repeats.
FRESH = {
    "king": "KING EDWARD:\nWhat news, my lord? Is Warwick come to town?\n",
    "duchess": "DUCHESS OF YORK:\nAlas, my son, why weep you at my door?\n",
    "servant": "Servant:\nMadam, the horses wait below; the night grows cold.\n\n",
    "menenius": "MENENIUS:\nWhy, how now, masters! whither go you with bats and clubs?\n",
    "friar": "FRIAR LAURENCE:\nGood morrow, son: what brings thee here so early?\n",
}


def repeat_prompt(passage: str) -> str:
    """The passage, a blank line, then its first two lines again (speaker and first verse line)."""
    head = "\n".join(passage.splitlines()[:2])
    return f"{passage}\n\n{head}"


def demo_artifact() -> Path:
    """models/shakespeare exported with the arith lift into benchmarks/cache (built once)."""
    out = CACHE / "demo-arith"
    if (out / "manifest.json").is_file():
        return out
    from export.build import build

    log(f"exporting models/shakespeare to {out} (once; cached)")
    return build(ROOT / "models" / "shakespeare", out, lift_mode="arith", log=lambda m: None)


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, seed=7)


def spec_stats(m: runtime.Model, prompt: str, max_new: int, kw: dict) -> SpecStats:
    """Drafted / accepted tokens and Runs of one speculative generation (untimed)."""
    rows, _, args = m._prepare(prompt, max_new_tokens=max_new, speculative=PROMPT_LOOKUP, **kw)
    stats = SpecStats()
    cache = m._generation_graph.new_cache(1, len(rows[0].prompt_ids) + max_new)
    for _ in speculative_steps(cache, rows[0], args, lambda i, t: None, stats):
        pass
    return stats


def measure(m: runtime.Model, kind: str, name: str, prompt: str, max_new_tokens: int, rounds: int) -> dict:
    kw = SAMPLING if kind == "sampled" else {}
    n_prompt = len(m.encode(prompt))
    max_new = min(max_new_tokens, m.context_length - n_prompt)
    plain = m.generate(prompt, max_new_tokens=max_new, **kw)
    spec = m.generate(prompt, max_new_tokens=max_new, speculative=PROMPT_LOOKUP, **kw)  # also warms the bindings
    if spec.ids != plain.ids:
        raise SystemExit(f"{name}: speculative output differs from plain decoding")

    def timed(speculative: str) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        r = m.generate(prompt, max_new_tokens=max_new, speculative=speculative, **kw)
        w1, c1 = time.perf_counter(), time.process_time()
        assert r.ids == plain.ids
        return w1 - w0, c1 - c0

    wall = {"off": [], PROMPT_LOOKUP: []}
    cpu = {"off": [], PROMPT_LOOKUP: []}
    for k in range(rounds):
        for s in (("off", PROMPT_LOOKUP) if k % 2 == 0 else (PROMPT_LOOKUP, "off")):
            w, c = timed(s)
            wall[s].append(w)
            cpu[s].append(c)
    st = spec_stats(m, prompt, max_new, kw)
    n = len(plain.ids)
    med = statistics.median
    return dict(kind=kind, name=name, prompt_tokens=n_prompt, new_tokens=n,
                plain_tok_s=n / med(wall["off"]), spec_tok_s=n / med(wall[PROMPT_LOOKUP]),
                speedup_wall=med([a / b for a, b in zip(wall["off"], wall[PROMPT_LOOKUP])]),
                speedup_cpu=med([a / b for a, b in zip(cpu["off"], cpu[PROMPT_LOOKUP])]),
                wall_s=wall, cpu_s=cpu, runs=st.runs + 1, verifies=st.verifies,
                drafted=st.drafted, accepted=st.accepted, text=plain.text)


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="artifact folder (default: the demo model, exported once into benchmarks/cache)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help=f"intra-op threads (default 1; RESULTS.md's other "
                                                          f"figures use {THREADS}, see the docstring)")
    ap.add_argument("--out", type=Path, default=RESULTS / "spec.json")
    a = ap.parse_args()
    folder = a.model or demo_artifact()
    m = runtime.load(folder, provider="cpu", threads=a.threads)
    if m.kv_session is None:
        raise SystemExit(f"{folder} has no model.kv.onnx: speculative decoding needs the shared-cache graph")
    prompts = ([("repeat", k, repeat_prompt(p)) for k, p in PASSAGES.items()] + [("fresh", k, p) for k, p in FRESH.items()]
               + [("sampled", k, p) for k, p in FRESH.items()])
    rows = []
    for kind, name, prompt in prompts:
        r = measure(m, kind, name, prompt, a.max_new_tokens, a.rounds)
        log(f"{kind:7s} {name:9s} plain {r['plain_tok_s']:7.1f} tok/s  spec {r['spec_tok_s']:7.1f} tok/s  "
            f"x{r['speedup_cpu']:.3f} cpu  x{r['speedup_wall']:.3f} wall  accepted {r['accepted']}/{r['drafted']}  "
            f"Runs {r['runs']} for {r['new_tokens']} tokens")
        rows.append(r)
    kinds = {}
    for kind in ("repeat", "fresh", "sampled"):
        mine = [r for r in rows if r["kind"] == kind]
        kinds[kind] = {f"speedup_{c}_{f.__name__}": f([r[f"speedup_{c}"] for r in mine])
                       for c in ("cpu", "wall") for f in (geomean, min, max)}
    header = ["kind", "prompt", "prompt tok", "new tok", "plain tok/s", "spec tok/s", "speedup (CPU)", "speedup (wall)",
              "accepted/drafted", "Runs"]
    table = [[r["kind"], r["name"], r["prompt_tokens"], r["new_tokens"], f"{r['plain_tok_s']:.0f}", f"{r['spec_tok_s']:.0f}",
              f"{r['speedup_cpu']:.3f}x", f"{r['speedup_wall']:.3f}x", f"{r['accepted']}/{r['drafted']}", r["runs"]]
             for r in rows]
    print(text_table(header, table))
    summary = [[kind, f"{s['speedup_cpu_geomean']:.3f}x ({s['speedup_cpu_min']:.3f} .. {s['speedup_cpu_max']:.3f})",
                f"{s['speedup_wall_geomean']:.3f}x ({s['speedup_wall_min']:.3f} .. {s['speedup_wall_max']:.3f})"]
               for kind, s in kinds.items()]
    print(text_table(["kind", "speedup CPU geomean (prompts)", "speedup wall geomean (prompts)"], summary))
    write_json(a.out, dict(
        command="benchmarks/spec_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                                                       if v is not None and k not in ("model", "out")),
        model=str(folder), provider="cpu", threads=a.threads, rounds=a.rounds, draft_tokens=DRAFT_TOKENS,
        sampling=SAMPLING, machine=platform.platform(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        kinds=kinds, prompts=rows, markdown=markdown_table(header, table),
        summary_markdown=markdown_table(["kind", "speedup CPU geomean (prompts)", "speedup wall geomean (prompts)"],
                                        summary)))
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
