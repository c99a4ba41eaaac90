"""Write the offline tasks' data: `python -m evaluation.tasks.make_tasks` (deterministic; committed output).

lm-eval tasks normally download their data, and no corpus excerpt may be committed, so the text here
is the project's own: play-formatted lines (a speaker in capitals, a colon, a line break, then the
speech, the layout the demo model learned) assembled from hand-written templates and word lists by a
seeded random generator. Every file is a pure function of SEED and this script, so `make_tasks`
re-creates the committed files byte for byte (tests/test_eval.py checks that).

  mc.jsonl     multiple choice: after `the ADJ`, the noun against its misspelling (two letters
               swapped), a verb and a function word (spelling and word class in context)
  cloze.jsonl  cloze: the last word of a passage names a thing the passage mentioned earlier
               (can the model carry a word across a line?); also the generate_until task's data
  ppl.jsonl    documents of several speeches, the longest over the demo model's 256-token
               context, for loglikelihood_rolling (perplexity over rolling windows)
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

SEED = 20260519
HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

SPEAKERS = ["DUKE", "KING", "QUEEN", "PRINCE", "LORD", "LADY", "NURSE", "FRIAR", "MESSENGER", "SERVANT",
            "CAPTAIN", "FIRST CITIZEN", "SECOND CITIZEN", "FIRST LORD", "SECOND LORD", "GAOLER"]
NOUNS = ["king", "lord", "heart", "love", "death", "night", "crown", "sword", "blood", "father", "mother",
         "brother", "sister", "honour", "house", "world", "grace", "friend", "queen", "country", "soul",
         "tongue", "hand", "eyes", "head", "name", "life", "time", "day", "son", "daughter", "heaven",
         "duke", "prince", "master", "war", "peace", "fortune", "gold", "land", "city", "people"]
ADJS = ["good", "noble", "gentle", "sweet", "poor", "true", "old", "young", "dear", "fair", "great",
        "proud", "bloody", "happy", "wretched", "holy", "foul", "brave", "honest", "royal"]
VERBS = ["love", "know", "fear", "hate", "serve", "pray", "swear", "beseech", "thank", "hear", "see",
         "bid", "leave", "follow", "trust", "pity", "forgive", "remember"]
OPENERS = ["My {adj} lord,", "Good {noun},", "Alas,", "Nay,", "Come,", "Why,", "O {adj} {noun},",
           "Now,", "Sir,", "Madam,", "Peace,", "Hark,"]
CLAUSES = ["I {verb} thee, hear me speak.", "the {noun} is {adj} and the {noun} is {adj}.",
           "what says the {noun}?", "I will {verb} the {noun} till I die.", "let us go to the {noun}.",
           "thou art a {adj} {noun}.", "the {noun} of my {noun} is {adj}.", "I do {verb} my {adj} {noun}.",
           "shall we {verb} the {noun} tonight?", "he hath lost his {noun} and his {noun}.",
           "I pray you, {verb} me.", "the {adj} {noun} comes this way."]


def fill(template: str, rng: random.Random) -> str:
    out = template
    for key, words in (("{noun}", NOUNS), ("{adj}", ADJS), ("{verb}", VERBS)):
        while key in out:
            out = out.replace(key, rng.choice(words), 1)
    return out


def speech(rng: random.Random, lines: int) -> str:
    """One speaker's turn: `NAME:` then `lines` sentences, one per line."""
    body = [f"{fill(rng.choice(OPENERS), rng)} {fill(rng.choice(CLAUSES), rng)}" for _ in range(lines)]
    return rng.choice(SPEAKERS) + ":\n" + "\n".join(body) + "\n"


FUNCTION_WORDS = ["thee", "and", "not", "him", "is", "to", "with", "shall", "from", "our"]


def misspell(word: str, rng: random.Random) -> str:
    """word with two neighbouring letters swapped (a different string; words of 4+ distinct letters)."""
    for _ in range(100):
        i = rng.randrange(len(word) - 1)
        w = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if w != word:
            return w
    raise ValueError(f"cannot misspell {word!r}")


def make_mc(rng: random.Random, n: int = 80) -> list[dict]:
    """After `the ADJ`, a noun: against its misspelling, a verb and a function word."""
    docs = []
    long_nouns = [w for w in NOUNS if len(w) >= 4 and len(set(w)) >= 3]
    while len(docs) < n:
        noun = rng.choice(long_nouns)
        context = (speech(rng, 1) if rng.random() < 0.5 else "") + rng.choice(SPEAKERS) + ":\n" + \
            f"{fill(rng.choice(OPENERS), rng)} the {rng.choice(ADJS)}"
        choices = [noun, misspell(noun, rng), rng.choice(VERBS), rng.choice(FUNCTION_WORDS)]
        if len(set(choices)) < 4:
            continue
        rng.shuffle(choices)
        docs.append({"context": context, "choices": [" " + c for c in choices], "label": choices.index(noun)})
    return docs


def make_cloze(rng: random.Random, n: int = 80) -> list[dict]:
    """The passage names a thing twice; its last word is that thing again."""
    docs = []
    for _ in range(n):
        noun, other = rng.sample(NOUNS, 2)
        adj = rng.choice(ADJS)
        context = (f"{rng.choice(SPEAKERS)}:\nI saw the {noun} upon the hill, and the {other} beside it.\n"
                   f"{rng.choice(SPEAKERS)}:\nThe {adj} {noun}? Alas, the {noun}! Then I will go and find the")
        docs.append({"context": context, "target": " " + noun})
    return docs


def make_ppl(rng: random.Random, n: int = 8) -> list[dict]:
    return [{"text": "".join(speech(rng, rng.randint(1, 4)) + "\n" for _ in range(2 + 2 * i))} for i in range(n)]


def write_jsonl(path: Path, docs: list[dict]) -> None:
    """Temp file then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    os.replace(tmp, path)


def build(out: Path = DATA) -> dict[str, list[dict]]:
    """Every task's documents, written under `out`; one seeded generator per file."""
    sets = {"mc": make_mc(random.Random(SEED)), "cloze": make_cloze(random.Random(SEED + 1)),
            "ppl": make_ppl(random.Random(SEED + 2))}
    for name, docs in sets.items():
        write_jsonl(Path(out) / f"{name}.jsonl", docs)
    return sets


if __name__ == "__main__":
    for name, docs in build().items():
        print(f"{DATA / (name + '.jsonl')}: {len(docs)} documents")
