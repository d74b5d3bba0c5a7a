"""Input-pipeline throughput: records/s of `make_dataset`, live tokenisation against prepared ids.

Two workloads, written once as on-disk datasets (`sources.write_dataset`, the path `data
prepare` takes): listwise job-search-like records (a query, a member profile, N candidate
job documents of 60-120 words, grades, soft labels, actions) and text records (one message of
60-120 words, two labels). Each is read by the grain pipeline twice: tokenising every record
live, and reading the token ids stored with `--tokenizer` at prepare time. Also timed per
record: JSON-decoding the record, and what storing ids as a JSON int list would cost to
decode against the `np.frombuffer` form that is stored.

Beside it, what the training step consumes at the `linkedin` preset (scripts/bench_step.py:
B = 16 sequences of T = 512 tokens = 8,192 tokens per step):

    sequences/s = B / step_s;  records/s = sequences/s / N  (N = sequences per record:
    candidates per list for listwise, 1 for text)

    python scripts/bench_input.py                      # defaults: 170 ms/step, N = 16
    python scripts/bench_input.py --step-ms 120 --records 400
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxdistill.data import pipeline, sources, tokens
from jaxdistill.data.tokenizer import load_tokenizer

WORDS = ("senior staff python java engineer software data scientist machine learning backend "
         "frontend cloud devops security platform product design marketing sales finance nurse "
         "remote hybrid onsite new york london berlin paris toronto seattle years experience "
         "skills requirements salary benefits full-time contract spark kubernetes aws sql react "
         "jax tensorflow the a and or of to in for with on at team company").split()


def text_of(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high))))


def listwise_records(n: int, list_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        candidates = []
        for position in range(list_size):
            grade = int(rng.integers(0, 5))
            probs = np.eye(5)[grade] * 0.8 + 0.04
            candidates.append({"document": text_of(rng, 60, 120), "grade": grade,
                               "grade_probs": [float(p) for p in probs], "position": position,
                               "actions": {"click": int(rng.random() < 0.2),
                                           "apply": int(rng.random() < 0.05)}})
        records.append({"query": text_of(rng, 2, 5), "member": text_of(rng, 20, 40),
                        "member_features": [float(x) for x in rng.normal(size=16)],
                        "candidates": candidates})
    return records


def text_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": i, "text": text_of(rng, 60, 120),
             "labels": {"spam": int(rng.random() < 0.3), "topic": int(rng.integers(0, 3))}}
            for i in range(n)]


def records_per_second(source, tokenizer, *, max_len: int, batch_size: int,
                       list_size: int | None, worker_count: int) -> float:
    dataset = pipeline.make_dataset(source, tokenizer=tokenizer, max_len=max_len,
                                    batch_size=batch_size, seed=0, num_epochs=1,
                                    list_size=list_size, shard_index=0, shard_count=1,
                                    worker_count=worker_count)
    iterator = iter(dataset)
    next(iterator)  # start-up (threads, workers) is not throughput
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["record_index"])
    seconds = time.perf_counter() - start
    return count / seconds if count else float("nan")


def per_record_us(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=256, help="records per workload")
    parser.add_argument("--list-size", type=int, default=16, help="candidates per list (N)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--step-ms", type=float, default=170.0, help="training step time")
    parser.add_argument("--batch-sequences", type=int, default=16, help="B of the step")
    parser.add_argument("--tokenizer", default="builtin:wordpiece")
    parser.add_argument("--worker-count", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    tfds.disable_progress_bar()
    logging.set_verbosity(logging.WARNING)  # tfds' per-dataset "Downloading and preparing"
    tokenizer = load_tokenizer(args.tokenizer)
    sequences_per_s = args.batch_sequences / (args.step_ms / 1000)
    print(f"step consumption at linkedin: B={args.batch_sequences} sequences x T=512 tokens = "
          f"{args.batch_sequences * 512} tokens/step; at {args.step_ms:.0f} ms/step: "
          f"sequences/s = B / step_s = {args.batch_sequences} / {args.step_ms / 1000:.3f} = "
          f"{sequences_per_s:.1f}")
    workloads = {
        "listwise": (listwise_records(args.records // 4 or 1, args.list_size),
                     args.list_size, max(args.batch_sequences // args.list_size, 1)),
        "text": (text_records(args.records), None, args.batch_sequences),
    }
    results = {"step_ms": args.step_ms, "sequences_per_s_needed": sequences_per_s,
               "tokenizer": args.tokenizer, "max_len": args.max_len, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (records, list_size, batch_size) in workloads.items():
            if len(records) < 2 * batch_size:
                parser.error(f"--records {args.records}: {kind} needs at least two batches of "
                             f"{batch_size} records (the first one is start-up)")
            per_record = list_size or 1
            needed = sequences_per_s / per_record
            live_dir = sources.write_dataset(records, kind, os.path.join(tmp, f"{kind}_live"))
            start = time.perf_counter()
            prepared_dir = sources.write_dataset(records, kind, os.path.join(tmp, kind),
                                                 tokenizers=[tokenizer], max_len=args.max_len)
            prepare_s = time.perf_counter() - start
            options = dict(max_len=args.max_len, batch_size=batch_size, list_size=list_size,
                           worker_count=args.worker_count)
            live = records_per_second(sources.open_source(live_dir), tokenizer, **options)
            prepared = records_per_second(sources.open_source(prepared_dir), tokenizer, **options)
            # What each read costs per record, apart from the pipeline around it.
            source = sources.open_source(prepared_dir)
            raw = [source._source[i]["record"] for i in range(len(source))]
            stored = source.stored_tokens(tokenizer, args.max_len)
            blobs = [stored[i] for i in range(len(source))]
            as_json = [json.dumps([[int(x) for x in ids] for ids, _ in tokens.unpack_rows(b)])
                       for b in blobs]
            figures = {
                "records": len(records), "sequences_per_record": per_record,
                "records_per_s_needed": needed,
                "live_records_per_s": live, "prepared_records_per_s": prepared,
                "prepare_records_per_s": len(records) / prepare_s,
                "us_per_record": {
                    "json_decode_record": per_record_us(json.loads, raw),
                    "tokenise": per_record_us(lambda r: tokens.encode_rows(
                        kind, r, tokenizer, args.max_len, limit=list_size), records),
                    "stored_ids_frombuffer": per_record_us(tokens.unpack_rows, blobs),
                    "stored_ids_as_json_list": per_record_us(json.loads, as_json),
                },
            }
            results["workloads"][kind] = figures
            us = figures["us_per_record"]
            print(f"\n{kind}: {len(records)} records, {per_record} sequence(s) each; the step "
                  f"needs records/s = {sequences_per_s:.1f} / {per_record} = {needed:.1f}")
            print(f"  pipeline live tokenisation : {live:10.1f} records/s "
                  f"({live / needed:.1f}x the step's need)")
            print(f"  pipeline prepared ids      : {prepared:10.1f} records/s "
                  f"({prepared / needed:.1f}x the step's need)")
            print(f"  prepare (write + tokenise) : {figures['prepare_records_per_s']:10.1f} "
                  "records/s, once")
            print(f"  per record: json.loads(record) {us['json_decode_record']:.0f} us, tokenise "
                  f"{us['tokenise']:.0f} us, stored ids frombuffer "
                  f"{us['stored_ids_frombuffer']:.0f} us (as a JSON int list it would be "
                  f"{us['stored_ids_as_json_list']:.0f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
