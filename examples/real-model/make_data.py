"""The real-model example's data: two small tasks a 135M instruct model half knows (written here, licence-clean).

    python examples/real-model/make_data.py            # writes examples/real-model/data/
    python examples/real-model/make_data.py --check    # regenerates in memory, fails on a diff

* ``capitals``   "What is the capital of France?" -> "Paris" (world knowledge the base partly has;
                 the answer format, a bare city name, is what SFT teaches)
* ``sentiment``  a one-sentence review -> positive | negative
* ``preferences`` for DPO: the right sentiment label preferred over the wrong one

Deterministic: the records are fixed lists; nothing is drawn at random.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"), ("Hungary", "Budapest"), ("Cuba", "Havana"),
]

REVIEWS = [
    ("The battery lasts all day and the screen is gorgeous.", "positive"),
    ("It broke after two days and support never answered.", "negative"),
    ("Delicious food, friendly staff, we will come back.", "positive"),
    ("The room was dirty and smelled of smoke.", "negative"),
    ("A gripping story with characters I truly cared about.", "positive"),
    ("Boring plot and the ending made no sense at all.", "negative"),
    ("Fast delivery and the shoes fit perfectly.", "positive"),
    ("The zipper fell off the first time I used it.", "negative"),
    ("Great value for the price, I recommend it to everyone.", "positive"),
    ("Waste of money, it stopped working within a week.", "negative"),
    ("The concert was amazing and the sound was crystal clear.", "positive"),
    ("Terrible service, we waited an hour for cold soup.", "negative"),
    ("My kids love this game and play it every evening.", "positive"),
    ("The app crashes every time I open the camera.", "negative"),
    ("Comfortable seats and a very smooth ride.", "positive"),
    ("The paint started peeling after a single wash.", "negative"),
    ("Beautiful photos and an easy, helpful guidebook.", "positive"),
    ("Rude driver and the car was late by forty minutes.", "negative"),
    ("This blender is powerful, quiet and easy to clean.", "positive"),
    ("The instructions were useless and parts were missing.", "negative"),
    ("Wonderful hike with breathtaking views at the top.", "positive"),
    ("The coffee was bitter and the cups were chipped.", "negative"),
    ("Excellent sound quality and the headphones feel light.", "positive"),
    ("The hotel charged us twice and refused a refund.", "negative"),
]

SENTIMENT_INSTRUCTION = "Classify the sentiment of this review. Answer with one word: positive or negative."


def capital_records() -> list[dict]:
    return [{"instruction": f"What is the capital of {country}? Answer with the city name only.", "input": "", "output": city}
            for country, city in CAPITALS]


def sentiment_records() -> list[dict]:
    return [{"instruction": SENTIMENT_INSTRUCTION, "input": review, "output": label} for review, label in REVIEWS]


def preference_records() -> list[dict]:
    flip = {"positive": "negative", "negative": "positive"}
    return [{"prompt": f"{SENTIMENT_INSTRUCTION}\n\n{review}", "chosen": label, "rejected": flip[label]} for review, label in REVIEWS]


def files() -> dict[str, str]:
    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {"capitals.jsonl": jsonl(capital_records()), "sentiment.jsonl": jsonl(sentiment_records()),
            "preferences.jsonl": jsonl(preference_records())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when data/ differs from what this script writes")
    args = parser.parse_args(argv)
    wanted = files()
    if args.check:
        stale = [name for name, text in wanted.items() if not (OUT / name).is_file() or (OUT / name).read_text() != text]
        if stale:
            sys.stderr.write(f"{OUT}: {stale} differ from make_data.py's output: rerun it and commit\n")
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
