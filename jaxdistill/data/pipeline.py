"""grain input pipelines: record source -> shard -> shuffle -> tokenise -> (pack) -> batch.

`make_dataset` returns a `grain.IterDataset` whose elements are batches, dicts of numpy
arrays (the batch contract below). `iter(dataset)` gives an iterator whose state
(`iterator_state` / `restore_iterator`, thin over grain's `get_state`/`set_state`) is saved
with the checkpoint, so a resumed run continues at the exact next example.

Batch contract (B batch, T = max_len, N = list_size, F member features, K = len(action_names)):

- pointwise / impressions: `input_ids`, `attention_mask` (1 = real token, right padding,
  pad id = the tokenizer's), `token_type_ids` (0 = query + member, 1 = document) int32 [B, T];
  `grade` int32 [B]; `grade_probs` float32 [B, 5] (one-hot of `grade` where the record has
  none) with `grade_probs_mask` float32 [B] (1 = the record had soft labels);
  `member_features` float32 [B, F]; `position` int32 [B] (0 for pointwise);
  `actions`, `action_mask` float32 [B, K] (mask 0 where the record lacks that action).
- listwise: the candidate fields gain an axis: [B, N, T], [B, N], [B, N, 5], [B, N, K];
  `candidate_mask` float32 [B, N]; `member_features` [B, F]. Lists are cut to their first N
  candidates or padded; a candidate without a position gets its index in the list.
- chat: `input_ids`, `attention_mask`, `loss_mask` (1 on assistant tokens, including the
  end-of-message token) int32 [B, T]; with `pack=True` also `segment_ids` (1, 2, ... per packed
  conversation, 0 on padding) and `positions` [B, T].
- records carrying cached teacher outputs (`offline`, written by `jaxdistill cache-teacher`):
  `offline` {teacher: {output: float32 [B, ...]}} (listwise: [B, N, ...], zeros on padding),
  read by the step as an offline teacher's outputs.
- with `skip_malformed=True`: `batch_malformed` int32 scalar, the malformed records skipped
  since the previous batch (sum it at the metric cadence).

Pair kinds are encoded as tokenizer pairs: first segment the query plus (when non-empty) the
member text on a new line, second segment the document, truncating the longest segment to
`max_len`. Chat is rendered with the tokenizer's chat template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import grain.experimental
import jax
import numpy as np
from absl import flags

from jaxdistill.data.records import NUM_GRADES, RecordError, validate_record

PAIR_KINDS = ("pointwise", "impressions", "listwise")


class _IndexedSource:
    """Pairs each record with its index in the split, so errors name the true index."""

    def __init__(self, source: Sequence[Mapping[str, Any]]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self._source[index]


class _Malformed:
    """Stands in for a record that failed validation when malformed records are skipped."""

    def __init__(self, message: str):
        self.message = message


class EncodeRecords(grain.transforms.Map):
    """Validates and tokenises one record (runs in grain worker processes when asked)."""

    def __init__(self, *, kind: str, tokenizer, source_name: str, max_len: int,
                 member_features_dim: int, action_names: Sequence[str], list_size: int | None,
                 pad_to_max_len: bool, skip_malformed: bool,
                 offline_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None):
        if kind == "listwise" and not list_size:
            raise ValueError("listwise data needs list_size (candidates per query), got "
                             f"{list_size!r}")
        if kind == "chat" and not tokenizer.chat_template:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; chat "
                             "data needs one (the built-in tokenizer has one)")
        self.kind, self.tokenizer, self.source_name = kind, tokenizer, source_name
        self.max_len, self.member_features_dim = max_len, member_features_dim
        self.action_names, self.list_size = tuple(sorted(action_names)), list_size
        self.pad_to_max_len, self.skip_malformed = pad_to_max_len, skip_malformed
        self.offline_shapes = {t: dict(o) for t, o in (offline_shapes or {}).items()}

    def map(self, element: tuple[int, Any]) -> dict[str, np.ndarray] | _Malformed:
        index, record = element
        try:
            validate_record(self.kind, record, source=self.source_name, index=index)
            if self.kind != "chat" and len(record["member_features"]) != self.member_features_dim:
                raise RecordError(self.source_name, index, "member_features",
                                  f"{self.member_features_dim} floats (member_features_dim, "
                                  "or the first record's width when unset)", f"{len(record['member_features'])} floats")
            if self.offline_shapes:
                self._check_offline(record, index)
        except RecordError as error:
            if self.skip_malformed:
                return _Malformed(str(error))
            raise
        if self.kind == "chat":
            return self._encode_chat(record, index)
        return self._encode_pairs(record)

    def _check_offline(self, record: Mapping[str, Any], index: int) -> None:
        items = (record["candidates"][: self.list_size] if self.kind == "listwise" else [record])
        prefix = "candidates[{i}]." if self.kind == "listwise" else ""
        for i, item in enumerate(items):
            offline = item.get("offline", {})
            for teacher, shapes in self.offline_shapes.items():
                for output, shape in shapes.items():
                    field = f"{prefix.format(i=i)}offline.{teacher}.{output}"
                    value = offline.get(teacher, {}).get(output)
                    found = None if value is None else np.shape(value)
                    if found != shape:
                        raise RecordError(self.source_name, index, field,
                                          f"an array of shape {shape} (as the first record)",
                                          "missing" if value is None else f"shape {found}")

    def _offline(self, item: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
        offline = item.get("offline", {})
        return {teacher: {output: np.asarray(offline[teacher][output], np.float32)
                          for output in shapes}
                for teacher, shapes in self.offline_shapes.items()}

    def _pad(self, ids: list[int], value: int) -> np.ndarray:
        out = np.full(self.max_len, value, np.int32)
        out[: len(ids)] = ids
        return out

    def _encode_pairs(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        first = record["query"] + ("\n" + record["member"] if record["member"].strip() else "")
        candidates = (record["candidates"][: self.list_size] if self.kind == "listwise"
                      else [record])
        encodings = self.tokenizer(
            [first] * len(candidates), [c["document"] for c in candidates],
            truncation="longest_first", max_length=self.max_len, return_token_type_ids=False,
            return_attention_mask=False)
        pad_id = self.tokenizer.pad_token_id
        rows = []
        for i, candidate in enumerate(candidates):
            ids = encodings["input_ids"][i]
            sequence_ids = encodings.sequence_ids(i)
            # Segment B starts at its first token; specials after it (a closing [SEP]) belong
            # to B, as in BERT. Works for tokenizers with or without a pair template.
            start = next((t for t, s in enumerate(sequence_ids) if s == 1), len(ids))
            grade = candidate["grade"] if self.kind != "impressions" else 0
            probs = candidate.get("grade_probs")
            actions = candidate.get("actions", {})
            if self.offline_shapes:
                rows.append({"offline": self._offline(candidate)})
            else:
                rows.append({})
            rows[-1].update({
                "input_ids": self._pad(ids, pad_id),
                "attention_mask": self._pad([1] * len(ids), 0),
                "token_type_ids": self._pad([0] * start + [1] * (len(ids) - start), 0),
                "grade": np.int32(grade),
                "grade_probs": (np.asarray(probs, np.float32) if probs is not None
                                else np.eye(NUM_GRADES, dtype=np.float32)[grade]),
                "grade_probs_mask": np.float32(probs is not None),
                "position": np.int32(candidate.get("position", i if self.kind == "listwise"
                                                    else 0)),
                "actions": np.array([actions.get(a, 0) for a in self.action_names], np.float32),
                "action_mask": np.array([a in actions for a in self.action_names], np.float32),
            })
        features = {"member_features": np.asarray(record["member_features"], np.float32)}
        if self.kind != "listwise":
            return {**rows[0], **features}
        n_real = len(rows)
        blank = jax.tree.map(np.zeros_like, rows[0])
        blank["input_ids"] = np.full_like(rows[0]["input_ids"], pad_id)
        rows += [blank] * (self.list_size - n_real)
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *rows)
        stacked["candidate_mask"] = (np.arange(self.list_size) < n_real).astype(np.float32)
        return {**stacked, **features}

    def _encode_chat(self, record: Mapping[str, Any], index: int) -> dict[str, np.ndarray]:
        messages = record["messages"]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        # Train on each assistant message from its content to the end of its rendered span
        # (so the end-of-message token is learned), not on the template's role header.
        trained_spans, span_start = [], 0
        for i, message in enumerate(messages):
            prefix = self.tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not text.startswith(prefix):
                raise ValueError(
                    f"{self.source_name}: record {index}: the chat template of "
                    f"{self.tokenizer.name_or_path!r} does not render conversations "
                    "prefix-consistently, so assistant tokens cannot be located")
            if message["role"] == "assistant":
                content_start = text.find(message["content"], span_start, len(prefix))
                trained_spans.append((max(content_start, span_start), len(prefix)))
            span_start = len(prefix)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                  truncation=True, max_length=self.max_len)
        ids = encoding["input_ids"]
        loss = [int(any(lo <= start < hi for lo, hi in trained_spans))
                for start, _ in encoding["offset_mapping"]]
        if not self.pad_to_max_len:  # packing pads later
            return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(loss, np.int32)}
        return {"input_ids": self._pad(ids, self.tokenizer.pad_token_id),
                "attention_mask": self._pad([1] * len(ids), 0),
                "loss_mask": self._pad(loss, 0)}


class _SkipMalformedIterator(grain.DatasetIterator):
    def __next__(self):
        skipped = 0
        while isinstance(element := next(self._parent), _Malformed):
            skipped += 1
        return {**element, "malformed": np.int32(skipped)}

    def get_state(self):
        # Skipped markers are consumed only together with the good element that follows, so
        # the parent's state is the whole state.
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class SkipMalformed(grain.IterDataset):
    """Drops `_Malformed` markers; each element carries `malformed`, the count dropped before it.

    Malformed records at the very end of an epoch-limited stream are dropped uncounted.
    """

    def __iter__(self):
        return _SkipMalformedIterator(self._parent.__iter__())


def _finish_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "malformed" in batch:
        batch["batch_malformed"] = np.int32(np.sum(batch.pop("malformed")))
    return batch


def _finish_packed(element: dict[str, Any]) -> dict[str, Any]:
    segment_ids = element.pop("input_ids_segment_ids").astype(np.int32)
    element["positions"] = element.pop("input_ids_positions").astype(np.int32)
    element["segment_ids"] = segment_ids
    element["attention_mask"] = (segment_ids > 0).astype(np.int32)
    if "malformed" in element:  # a per-conversation meta feature: one value per packed row
        element["malformed"] = np.int32(np.sum(element["malformed"]))
    return element


def make_dataset(
    source: Sequence[Mapping[str, Any]],
    *,
    tokenizer,
    kind: str | None = None,
    max_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    list_size: int | None = None,
    action_names: Sequence[str] = (),
    member_features_dim: int | None = None,
    pack: bool = False,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    drop_remainder: bool = True,
    skip_malformed: bool = False,
    offline_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
) -> grain.IterDataset:
    """Builds the batch pipeline over a record source (e.g. `sources.open_source(...)`).

    `kind` defaults to `source.kind`. Each process reads a disjoint, equal-sized strided shard
    (`shard_index`/`shard_count` default to this JAX process), shuffled with `seed`, reshuffled
    every epoch; `num_epochs=None` repeats forever. `member_features_dim` defaults to the
    length in the split's first record. `worker_count > 0` tokenises in that many grain worker
    processes (each keeping `prefetch` batches ready); otherwise `prefetch` batches are
    prepared ahead by threads. Malformed records raise `RecordError` naming source, index and
    field, or with `skip_malformed` are dropped and counted in `batch_malformed`.
    Cached teacher outputs (`offline`) go into every batch with the shapes of the split's
    first record (per candidate for listwise) unless `offline_shapes` ({teacher: {output:
    shape}}, `{}` for none) says otherwise; a record lacking one fails like a malformed one.
    """
    kind = kind or getattr(source, "kind", None)
    if kind not in ("chat", *PAIR_KINDS):
        raise ValueError(f"unknown or missing record kind {kind!r}; pass kind=")
    if pack and kind != "chat":
        raise ValueError(f"pack=True is supported for chat data only, not {kind!r}")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    source_name = getattr(source, "name", type(source).__name__)
    if member_features_dim is None:
        member_features_dim = 0 if kind == "chat" else len(source[0].get("member_features", []))
    if offline_shapes is None:
        offline_shapes = {} if kind == "chat" else offline_shapes_of(source[0], kind)

    dataset = grain.MapDataset.source(_IndexedSource(source))
    # Equal shards (the remainder is dropped) keep every host stepping in lockstep.
    per_shard = len(dataset) // shard_count
    if per_shard == 0:
        raise ValueError(f"{source_name}: {len(dataset)} records cannot fill {shard_count} shards")
    dataset = dataset[shard_index: per_shard * shard_count: shard_count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if num_epochs != 1:
        dataset = dataset.repeat(num_epochs)
    dataset = dataset.map(EncodeRecords(
        kind=kind, tokenizer=tokenizer, source_name=source_name, max_len=max_len,
        member_features_dim=member_features_dim, action_names=action_names,
        list_size=list_size, pad_to_max_len=not pack, skip_malformed=skip_malformed,
        offline_shapes=offline_shapes))
    read_options = grain.ReadOptions(
        num_threads=0 if worker_count else 2,
        prefetch_buffer_size=0 if worker_count else max(prefetch, 1) * batch_size)
    iter_dataset = dataset.to_iter_dataset(read_options)
    if skip_malformed:
        iter_dataset = SkipMalformed(iter_dataset)
    if pack:
        iter_dataset = grain.experimental.FirstFitPackIterDataset(
            iter_dataset, length_struct={"input_ids": max_len, "loss_mask": max_len},
            num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle,
            meta_features=("loss_mask", "malformed") if skip_malformed else ("loss_mask",))
        iter_dataset = iter_dataset.map(_finish_packed)
    iter_dataset = iter_dataset.batch(batch_size, drop_remainder=drop_remainder)
    iter_dataset = iter_dataset.map(_finish_batch)
    if worker_count:
        # grain's worker start-up reads absl flags; outside an absl app nobody parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)))
    return iter_dataset


def offline_shapes_of(record: Mapping[str, Any], kind: str) -> dict[str, dict[str, tuple]]:
    """{teacher: {output: shape}} of the cached teacher outputs one record carries (listwise:
    its first candidate's, per candidate)."""
    item = record
    if kind == "listwise":
        candidates = record.get("candidates") or [{}]
        item = candidates[0] if isinstance(candidates[0], Mapping) else {}
    offline = item.get("offline", {}) if isinstance(item, Mapping) else {}
    if not isinstance(offline, Mapping):
        return {}
    return {teacher: {name: np.shape(value) for name, value in outputs.items()}
            for teacher, outputs in offline.items() if isinstance(outputs, Mapping)}


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position, to save with a checkpoint."""
    return iterator.get_state()


def restore_iterator(iterator: grain.DatasetIterator, state: Mapping[str, Any]) -> None:
    """Moves a fresh iterator of the same pipeline to a saved position."""
    iterator.set_state(state)
