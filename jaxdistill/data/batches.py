"""The batches of an experiment's split: its dataset, tokenisers and record kind, one place.

Every reader of an experiment's data (the training loop, eval, predict, cache-teacher, the
pipeline) builds its batches here, so they read the same records the same way. The student's
tokenizer gives the top-level token inputs; each other tokenizer a teacher reads gets its own
inputs in `batch["tokens"][key]` (see `data.pipeline.make_dataset`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxdistill.data.labels import action_order
from jaxdistill.data.pipeline import make_dataset
from jaxdistill.data.sources import open_source
from jaxdistill.data.tokenizer import load_tokenizer


@functools.lru_cache(maxsize=16)
def tokenizer(spec: str):
    """A tokenizer by directory or builtin spec, loaded once per process."""
    return load_tokenizer(spec)


def split_batches(cfg, split: str, *, train: bool, drop_remainder: bool | None = None,
                  token_specs: Mapping[str, str] | None = None, records: Sequence[Any] | None = None,
                  batch_size: int | None = None, list_size: int | None = None,
                  shard: bool = True):
    """Batches of `split` of `cfg.data` (an `Experiment`).

    train: shuffled (when data.shuffle), repeated forever, with data.worker_count workers;
    otherwise one ordered pass keeping the short last batch unless `drop_remainder`.
    Training reads of listwise data with `data.candidates: sample` draw their candidates.
    `token_specs`: {key: tokenizer spec} of the other tokenizers to tokenise with. `records`:
    score these records instead of the dataset's split (`predict` on a JSONL file).
    `shard`: each process reads its own part (False: this process reads everything).
    """
    data = cfg.data
    if records is None:
        source = open_source(data.path, split)
        if source.kind != data.kind:
            raise ValueError(f"data.kind is {data.kind!r} but {source.name} holds "
                             f"{source.kind!r} records")
    else:
        source = records
    processes = jax.process_count() if shard else 1
    batch_size = batch_size or data.batch_size
    if batch_size % processes:
        raise ValueError(f"data.batch_size {batch_size} does not divide over {processes} "
                         "processes")
    extra = {"extra_tokenizers": {k: tokenizer(v) for k, v in token_specs.items()}} \
        if token_specs else {}
    return make_dataset(
        source, tokenizer=tokenizer(data.tokenizer), kind=data.kind, max_len=data.max_len,
        batch_size=batch_size // processes, seed=cfg.seed, shuffle=data.shuffle and train,
        num_epochs=None if train else 1, list_size=list_size or data.list_size,
        sample_candidates=train and data.candidates == "sample",
        action_names=action_order(cfg.model.heads, data.action_names),
        member_features_dim=data.member_features_dim,
        pack=data.pack, worker_count=data.worker_count if train else 0, prefetch=data.prefetch,
        skip_malformed=data.skip_malformed,
        drop_remainder=train if drop_remainder is None else drop_remainder,
        **({} if shard else {"shard_index": 0, "shard_count": 1}), **extra)
