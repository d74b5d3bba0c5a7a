"""Writes the small example record files that configs/examples/* and the README's commands use.

    python scripts/make_example_data.py            # -> data/examples/*.jsonl
    jaxdistill data prepare --kind listwise --out data/examples/job_search \\
        --split train=data/examples/train.jsonl --split validation=data/examples/validation.jsonl

Listwise job-search records (query, member, candidates with grades, soft grades, positions and
click/apply/dismiss actions) for the examples' teachers and student, and text records with two
named labels (`labels.spam` 0/1, `labels.topic` 0..2) for a text classifier. Seeded: the same
files every time. Plain Python, no jax.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("python", "java", "data", "engineer", "nurse", "remote", "senior", "sales", "designer",
         "london", "berlin", "analyst")
SPAM_WORDS = ("win", "prize", "cash", "free", "offer")
TOPICS = (("python", "code", "data"), ("nurse", "doctor", "clinic"), ("match", "goal", "team"))
FILLER = ("hello", "mail", "today", "just", "note", "the", "a")


def listwise_records(count: int, seed: int) -> list[dict]:
    """Queries with 2..5 candidates graded by word overlap; engagement follows the grade."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        query = rng.sample(WORDS, 2)
        candidates = []
        for position in range(rng.randint(2, 5)):
            document = rng.sample(WORDS, 3)
            grade = min(4, 2 * len(set(query) & set(document)) + rng.randint(0, 1))
            probs = [0.05] * 5
            probs[grade] = 0.8
            candidates.append({
                "document": " ".join(document) + " job", "grade": grade, "grade_probs": probs,
                "position": position,
                "actions": {"click": int(grade >= 2 or rng.random() < 0.2),
                            "apply": int(grade >= 3), "dismiss": int(grade == 0)},
            })
        records.append({"query": " ".join(query), "member": "senior engineer in london",
                        "member_features": [round(rng.random(), 3) for _ in range(4)],
                        "candidates": candidates})
    return records


def text_records(count: int, seed: int) -> list[dict]:
    """Mails whose spam flag and topic can be read from their words."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        spam, topic = rng.randint(0, 1), rng.randint(0, 2)
        words = [*rng.sample(TOPICS[topic], 2), *rng.sample(FILLER, 2)]
        if spam:
            words += rng.sample(SPAM_WORDS, 2)
        rng.shuffle(words)
        records.append({"id": f"mail-{seed}-{i}", "text": " ".join(words),
                        "labels": {"spam": spam, "topic": topic}})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/examples", help="directory (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": listwise_records(96, 0), "validation.jsonl": listwise_records(32, 1),
             "new_records.jsonl": listwise_records(8, 2), "mail.jsonl": text_records(200, 3)}
    for name, records in files.items():
        write_jsonl(out / name, records)
        print(f"{out / name}: {len(records)} records")


if __name__ == "__main__":
    main()
