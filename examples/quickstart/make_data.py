"""Generate the quickstart's synthetic, multi-task data set (deterministic, offline).

    python examples/quickstart/make_data.py            # writes examples/quickstart/data/
    python examples/quickstart/make_data.py --check    # regenerates in memory, fails on a diff

Two tasks, both short-output and deterministic given the input, so exact match is meaningful
and a freshly built base model scores ~0:

* ``triples``   relation-triple extraction from short template sentences
                "Alice works at Acme in Paris." ->
                "(Alice, works_at, Acme); (Acme, located_in, Paris)"
* ``sentiment`` three-way review sentiment: positive | negative | neutral

Files (mixed formats, as real sources would be):

* ``data/triples.jsonl``          alpaca records {instruction, input, output}
* ``data/sentiment.json``         sharegpt records {conversations: [{from, value}, ...]}
* ``data/sentiment_extra.csv``    instruction,input,output rows (more sentiment data)
* ``data/preferences.jsonl``      {prompt, chosen, rejected}; chosen is the right answer,
                                  rejected a plausible wrong one
* ``data/corpus.txt``             raw text about the same world, one document per line
                                  (continued pretraining, tokenizer training)

A handful of deliberately dirty records (exact duplicates, HTML markup, empty outputs,
a whitespace-only input) are mixed in so the data report shows cleaning at work.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from pathlib import Path

SEED = 20251122
HERE = Path(__file__).resolve().parent
OUT = HERE / "data"

N_TRIPLES = 1200
N_SENTIMENT_SHAREGPT = 600
N_SENTIMENT_CSV = 250
N_PREFERENCES = 300
N_CORPUS = 700
N_CORPUS_ANNOTATED = 1500

TRIPLES_INSTRUCTION = "Extract the relation triples from the sentence."
SENTIMENT_INSTRUCTION = "Classify the sentiment of the review as positive, negative or neutral."

FIRST = [
    "Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara",
    "Ugo", "Vera", "Wen", "Yara", "Zane", "Aiko", "Boris", "Clara", "Diego", "Emil",
]
COMPANIES = [
    "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne",
    "Tyrell", "Cyberdyne", "Soylent", "Wonka", "Gringotts", "Aperture", "Oscorp",
    "Monarch", "Nakatomi", "Dunder", "Piper", "Bluesun", "Massive",
    "Mesa", "Virtucon", "Duff",
]
CITIES = [
    "Paris", "Berlin", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Austin",
    "Madrid", "Seoul", "Dublin", "Nairobi", "Quito", "Vienna", "Lisbon", "Toronto",
    "Hanoi", "Prague", "Sydney",
]
YEARS = [str(y) for y in range(1950, 2024)]

# (template, triples) — triples are (subject_slot, relation, object_slot).
# Slots: P/P2 person, C/C2 company, L city, Y year (a distractor, never in a triple).
TRIPLE_TEMPLATES: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("{P} works at {C}.", [("P", "works_at", "C")]),
    ("{P} works at {C} in {L}.", [("P", "works_at", "C"), ("C", "located_in", "L")]),
    ("{P} was born in {L}.", [("P", "born_in", "L")]),
    ("{P} was born in {L} in {Y}.", [("P", "born_in", "L")]),
    ("{P} founded {C} in {Y}.", [("P", "founded", "C")]),
    ("{C} was founded by {P}.", [("P", "founded", "C")]),
    ("{C} is headquartered in {L}.", [("C", "located_in", "L")]),
    ("{C} acquired {C2}.", [("C", "acquired", "C2")]),
    ("{C2} was acquired by {C}.", [("C", "acquired", "C2")]),
    ("{P} is married to {P2}.", [("P", "spouse_of", "P2")]),
    ("{P} lives in {L} and works for {C}.", [("P", "lives_in", "L"), ("P", "works_at", "C")]),
    ("{P}, who founded {C}, lives in {L}.", [("P", "founded", "C"), ("P", "lives_in", "L")]),
]

ASPECTS = [
    "battery", "screen", "keyboard", "camera", "speaker", "charger", "case", "blender",
    "kettle", "backpack", "headphones", "lamp", "mouse", "printer", "jacket", "tent",
    "drill", "router", "monitor", "toaster", "watch", "scooter", "pillow", "umbrella",
]
POS = ["great", "excellent", "fantastic", "reliable", "wonderful", "superb", "sturdy", "lovely"]
NEG = ["terrible", "awful", "flimsy", "disappointing", "useless", "poor", "broken", "noisy"]
POS_CLAUSES = [
    "I would buy it again", "it works perfectly", "highly recommended", "my family loves it",
    "worth every penny", "it exceeded my expectations", "five stars from me", "I use it every day",
]
NEG_CLAUSES = [
    "I want a refund", "it stopped working after a week", "avoid this one",
    "a waste of money", "it broke on the first day", "I regret buying it",
    "one star from me", "it went back to the shop",
]
NEUTRAL = [
    "The {a} arrived on {d}.", "The {a} comes in a {c} box.", "I bought the {a} for my {r}.",
    "The {a} is {c} and weighs about {n} grams.", "The {a} was delivered on {d} by courier.",
    "This {a} replaced my old one from {d}.", "The {a} has a {c} cable.",
    "I ordered the {a} on {d}.", "The {a} is for my {r}.",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLORS = ["black", "white", "grey", "blue", "green", "red"]
ROLES = ["office", "kitchen", "brother", "sister", "studio", "garage", "trip"]


def person(rng: random.Random) -> str:
    # One-word names (one token each after tokenizer training): copying a name from the input is
    # what the model must learn, and single tokens make it learnable in a few hundred steps.
    return rng.choice(FIRST)


def triples_example(rng: random.Random) -> tuple[str, str]:
    template, rels = rng.choice(TRIPLE_TEMPLATES)
    slots = {"P": person(rng), "C": rng.choice(COMPANIES), "L": rng.choice(CITIES),
             "Y": rng.choice(YEARS)}
    slots["P2"] = person(rng)
    while slots["P2"] == slots["P"]:
        slots["P2"] = person(rng)
    slots["C2"] = rng.choice([c for c in COMPANIES if c != slots["C"]])
    sentence = template.format(**slots)
    output = "; ".join(f"({slots[s]}, {r}, {slots[o]})" for s, r, o in rels)
    return sentence, output


def wrong_triples(rng: random.Random, sentence: str, output: str) -> str:
    """A plausible wrong extraction: swapped arguments, wrong relation, or a dropped triple."""
    parts = output.split("; ")
    kind = rng.choice(["swap", "relation", "drop"] if len(parts) > 1 else ["swap", "relation"])
    if kind == "drop":
        return parts[0]
    i = rng.randrange(len(parts))
    s, r, o = parts[i].strip("()").split(", ")
    if kind == "swap":
        parts[i] = f"({o}, {r}, {s})"
    else:
        others = ["works_at", "born_in", "founded", "located_in", "lives_in", "acquired"]
        parts[i] = f"({s}, {rng.choice([x for x in others if x != r])}, {o})"
    return "; ".join(parts)


def _neutral(rng: random.Random, a: str) -> str:
    return rng.choice(NEUTRAL).format(a=a, d=rng.choice(DAYS), c=rng.choice(COLORS),
                                      r=rng.choice(ROLES), n=rng.randrange(100, 900, 10))


def sentiment_example(rng: random.Random) -> tuple[str, str]:
    """A one- or two-sentence review; the label follows from its opinion words (none: neutral)."""
    label = rng.choice(["positive", "negative", "neutral"])
    a = rng.choice(ASPECTS)
    if label == "neutral":
        text = _neutral(rng, a)
        if rng.random() < 0.5:
            text += " " + _neutral(rng, a)
        return text, label
    adjectives, clauses = (POS, POS_CLAUSES) if label == "positive" else (NEG, NEG_CLAUSES)
    text = f"The {a} is {rng.choice(adjectives)}, {rng.choice(clauses)}."
    if rng.random() < 0.5:  # a factual sentence does not change the label
        text = _neutral(rng, a) + " " + text if rng.random() < 0.5 else text + " " + _neutral(rng, a)
    return text, label


def unique(make, rng: random.Random, seen: set[str]):
    """Draw from `make` until its first value is new (the generator never repeats an input)."""
    while True:
        text, answer = make(rng)
        if text not in seen:
            seen.add(text)
            return text, answer


def corpus_doc(rng: random.Random, seen: set[str]) -> str:
    """A few sentences about the same world (facts about people and companies, reviews), none of
    them an input of the supervised files, so no evaluation example leaks into pretraining."""
    sents = []
    for _ in range(rng.randint(3, 6)):
        make = triples_example if rng.random() < 0.6 else sentiment_example
        sents.append(unique(make, rng, seen)[0])
    return " ".join(sents)


def annotated_doc(rng: random.Random, seen: set[str]) -> str:
    """A knowledge-base dump: sentences each followed by its relation triples. Continued
    pretraining on these teaches the tiny model the triple notation and to copy names from a
    sentence, which a LoRA adapter on a randomly initialised model cannot learn in minutes."""
    entries = []
    for _ in range(rng.randint(2, 4)):
        sentence, output = unique(triples_example, rng, seen)
        entries.append(f"{sentence} Triples: {output}.")
    return " ".join(entries)


def generate() -> dict[str, str]:
    rng = random.Random(SEED)
    files: dict[str, str] = {}

    # ---- triples: alpaca jsonl ----
    seen: set[str] = set()  # inputs already used, across all files
    rows = []
    while len(rows) < N_TRIPLES:
        sentence, output = unique(triples_example, rng, seen)
        rows.append({"instruction": TRIPLES_INSTRUCTION, "input": sentence, "output": output})
    # dirty records: an exact duplicate, an HTML snippet, an empty output, a blank input
    rows.insert(37, dict(rows[10]))
    rows.insert(211, dict(rows[200]))
    rows.insert(300, {"instruction": TRIPLES_INSTRUCTION,
                      "input": "<p>Omar works at <b>Globex</b>.</p>",
                      "output": "(Omar, works_at, Globex)"})
    rows.insert(512, {"instruction": TRIPLES_INSTRUCTION, "input": "Vera works at Duff.",
                      "output": ""})
    rows.insert(777, {"instruction": TRIPLES_INSTRUCTION, "input": "Hugo works at Wayne in Oslo.",
                      "output": " \t "})
    files["triples.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    # ---- sentiment: sharegpt json ----
    convs = []
    for _ in range(N_SENTIMENT_SHAREGPT):
        text, label = unique(sentiment_example, rng, seen)
        convs.append({"conversations": [
            {"from": "human", "value": f"{SENTIMENT_INSTRUCTION}\n\n{text}"},
            {"from": "gpt", "value": label},
        ]})
    convs.insert(50, json.loads(json.dumps(convs[5])))
    convs.insert(120, {"conversations": [
        {"from": "human", "value": f"{SENTIMENT_INSTRUCTION}\n\n<div class=\"review\">The lamp "
                                   "is lovely, worth every penny.</div>"},
        {"from": "gpt", "value": "positive"},
    ]})
    convs.insert(333, {"conversations": [
        {"from": "human", "value": f"{SENTIMENT_INSTRUCTION}\n\nThe tent is noisy, avoid this one."},
        {"from": "gpt", "value": ""},
    ]})
    # A JSON array, one conversation per line: compact, and diffs stay readable.
    files["sentiment.json"] = "[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in convs) + "\n]\n"

    # ---- sentiment: csv ----
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["instruction", "input", "output"])
    for i in range(N_SENTIMENT_CSV):
        text, label = unique(sentiment_example, rng, seen)
        w.writerow([SENTIMENT_INSTRUCTION, text, label])
        if i == 42:  # an exact duplicate row
            w.writerow([SENTIMENT_INSTRUCTION, text, label])
    files["sentiment_extra.csv"] = buf.getvalue()

    # ---- preferences ----
    prefs = []
    for i in range(N_PREFERENCES):
        if i % 2 == 0:
            sentence, output = unique(triples_example, rng, seen)
            rejected = wrong_triples(rng, sentence, output)
            if rejected == output:
                continue
            prefs.append({"task": "triples", "prompt": f"{TRIPLES_INSTRUCTION}\n\n{sentence}",
                          "chosen": output, "rejected": rejected})
        else:
            text, label = unique(sentiment_example, rng, seen)
            wrong = rng.choice([x for x in ("positive", "negative", "neutral") if x != label])
            prefs.append({"task": "sentiment", "prompt": f"{SENTIMENT_INSTRUCTION}\n\n{text}",
                          "chosen": label, "rejected": wrong})
    prefs.insert(99, dict(prefs[3]))  # a duplicate pair
    files["preferences.jsonl"] = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prefs)

    # ---- corpus ----
    docs = [corpus_doc(rng, seen) for _ in range(N_CORPUS)]
    docs += [annotated_doc(rng, seen) for _ in range(N_CORPUS_ANNOTATED)]
    docs.insert(17, "<html><body><h1>Company news</h1><p>Acme acquired Globex.</p></body></html>")
    docs.insert(400, docs[399])
    files["corpus.txt"] = "".join(d + "\n" for d in docs)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="fail if the files on disk differ")
    args = ap.parse_args(argv)
    files = generate()
    if args.check:
        bad = [n for n, t in files.items()
               if not (args.out / n).exists() or (args.out / n).read_text("utf-8") != t]
        if bad:
            print("out of date: " + ", ".join(bad), file=sys.stderr)
            return 1
        print("data is up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8", newline="")
        print(f"wrote {args.out / name} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
