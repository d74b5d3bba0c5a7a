"""grain input pipelines: record source -> shard -> shuffle -> tokenise -> (pack) -> batch.

Longer than ~400 lines because it is the batch contract of every record kind.

`make_dataset` returns a `grain.IterDataset` whose elements are batches, dicts of numpy
arrays (the batch contract is in its docstring). `iter(dataset)` gives an iterator whose state
(`iterator_state` / `restore_iterator`, thin over grain's `get_state`/`set_state`) is saved
with the checkpoint, so a resumed run continues at the exact next example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import grain.experimental
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxdistill.data import tokens, topk_store
from jaxdistill.distill.losses import TOPK_KEYS
from jaxdistill.data.records import NUM_GRADES, RecordError, update_label_types, validate_record
from jaxdistill.data.tokenizer import tokenizer_fingerprint
from jaxdistill.data.tokens import PAIR_KINDS

PRIMARY = ""  # tokenizer key of the top-level inputs (extra tokenizers have non-empty keys)


class _IndexedSource:
    """Pairs each record with its index in the split (errors and `record_index` name it),
    with its stored token ids, {tokenizer key: bytes}, for the tokenizers that have them, and
    with its cached top-k teachers, {(teacher, head): bytes} (`topk_store`), and with the
    candidates to read (None: the first list_size; `SampleCandidates` draws them)."""

    def __init__(self, source: Sequence[Mapping[str, Any]],
                 stored: Mapping[str, Sequence[bytes]],
                 topk: Mapping[tuple[str, str], Sequence[bytes]] | None = None):
        self._source, self._stored, self._topk = source, dict(stored), dict(topk or {})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[int, Any, dict[str, bytes], dict, None]:
        index = int(index)
        return (index, self._source[index], {k: v[index] for k, v in self._stored.items()},
                {k: v[index] for k, v in self._topk.items()}, None)


class SampleCandidates(grain.transforms.RandomMap):
    """Chooses `list_size` of a longer list's candidates at random, kept in list order.

    grain seeds the draw from the pipeline seed and the element's place in the (shuffled,
    repeated) stream, so each epoch draws anew and a restored iterator draws the same. A
    list of many candidates then trains as many short lists: a batch of B lists of N
    candidates mixes B queries, where cutting to the first N would never show the low-ranked
    candidates, and a longer N puts fewer queries in a batch of the same size.
    """

    def __init__(self, list_size: int):
        self.list_size = list_size

    def random_map(self, element, rng: np.random.Generator):
        index, record, stored, topk, _ = element
        candidates = record.get("candidates") if isinstance(record, Mapping) else None
        if not isinstance(candidates, list) or len(candidates) <= self.list_size:
            return element
        choice = np.sort(rng.choice(len(candidates), self.list_size, replace=False)).tolist()
        return index, record, stored, topk, choice


class _Malformed:
    """Stands in for a record that failed validation when malformed records are skipped."""

    def __init__(self, message: str):
        self.message = message


class EncodeRecords(grain.transforms.Map):
    """Validates and tokenises one record (runs in grain worker processes when asked).

    `tokenizers` maps a key to a tokenizer: key `PRIMARY` is the student's (top-level
    inputs), every other key K fills `tokens[K]`; `same_as` maps a key to the key of an equal
    tokenizer (same fingerprint), whose rows it reuses.
    """

    def __init__(self, *, kind: str, tokenizers: Mapping[str, Any], source_name: str,
                 max_len: int, member_features_dim: int, action_names: Sequence[str],
                 list_size: int | None, pad_to_max_len: bool, skip_malformed: bool,
                 offline_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
                 label_types: Mapping[str, str] | None = None,
                 same_as: Mapping[str, str] | None = None, sample_candidates: bool = False):
        if kind == "listwise" and not list_size:
            raise ValueError("listwise data needs list_size (candidates per query), got "
                             f"{list_size!r}")
        for tokenizer in tokenizers.values():
            if kind == "chat" and not tokenizer.chat_template:
                raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
                                 "chat data needs one (the built-in tokenizer has one)")
        self.kind, self.tokenizers, self.source_name = kind, dict(tokenizers), source_name
        self.max_len, self.member_features_dim = max_len, member_features_dim
        self.action_names, self.list_size = tuple(action_names), list_size
        self.pad_to_max_len, self.skip_malformed = pad_to_max_len, skip_malformed
        self.offline_shapes = {t: dict(o) for t, o in (offline_shapes or {}).items()}
        self.label_types = dict(label_types or {})
        self.sample_candidates = sample_candidates
        # Keys whose tokenizers give the same ids share one tokenisation.
        self.same_as = {key: (same_as or {}).get(key, key) for key in self.tokenizers}
        # Indices of records that passed validation: a source's records do not change, so
        # each is checked once per process, not on every epoch's read (a sampled list's
        # whole record is checked, which read anew costs more than reading its sample).
        self._valid: set[int] = set()

    def map(self, element: tuple[int, Any, Mapping[str, bytes], Mapping]):
        index, record, stored, topk, choice = element
        if index not in self._valid:
            try:
                self._validate(record, index)
            except RecordError as error:
                if self.skip_malformed:
                    return _Malformed(str(error))
                raise
            self._valid.add(index)
        limit = self.list_size if self.kind == "listwise" else None
        if choice is not None:  # validated whole; reads the chosen candidates
            record = {**record, "candidates": [{"position": i, **record["candidates"][i]}
                                               for i in choice]}

        def rows_of(key: str) -> list[tokens.Row]:
            if key not in stored:
                return tokens.encode_rows(self.kind, record, self.tokenizers[key], self.max_len,
                                          limit=limit, where=f"{self.source_name}: record {index}")
            if choice is None:
                return tokens.unpack_rows(stored[key], limit)
            rows = tokens.unpack_rows(stored[key])
            return [rows[i] for i in choice]

        encoded = {key: rows_of(key) for key in set(self.same_as.values())}
        rows = {key: encoded[self.same_as[key]] for key in self.tokenizers}
        if self.kind == "chat":
            out = {**self._chat_inputs(rows[PRIMARY], self.tokenizers[PRIMARY].pad_token_id)}
            if topk:
                out["offline"] = self._topk(topk, rows[PRIMARY], out, index)
        else:
            out = {**self._pair_inputs(rows[PRIMARY], self.tokenizers[PRIMARY].pad_token_id),
                   **self._labels(record)}
        extra = {key: (self._chat_inputs if self.kind == "chat" else self._pair_inputs)(
                     rows[key], tokenizer.pad_token_id)
                 for key, tokenizer in self.tokenizers.items() if key != PRIMARY}
        if extra:
            out["tokens"] = extra
        if self.pad_to_max_len:  # packed rows hold several records: no single index
            out["record_index"] = np.int32(index)
        return out

    def _validate(self, record: Any, index: int) -> None:
        validate_record(self.kind, record, source=self.source_name, index=index)
        if (self.kind not in ("chat", "text")
                and len(record["member_features"]) != self.member_features_dim):
            raise RecordError(self.source_name, index, "member_features",
                              f"{self.member_features_dim} floats (member_features_dim, "
                              "or the first record's width when unset)",
                              f"{len(record['member_features'])} floats")
        if self.offline_shapes:
            self._check_offline(record, index)

    def _check_offline(self, record: Mapping[str, Any], index: int) -> None:
        # The candidates read: the first list_size, or any of them when sampling.
        items = (record["candidates"][: None if self.sample_candidates else self.list_size]
                 if self.kind == "listwise" else [record])
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

    def _topk(self, blobs: Mapping[tuple[str, str], bytes], rows: list[tokens.Row],
              inputs: Mapping[str, np.ndarray], index: int) -> dict[str, dict[str, Any]]:
        """A record's cached top-k teachers over its tokens (padded to max_len unless packing):
        {teacher: {head: {topk_ids, topk_logprobs, tail_logprob}}}. The cache must cover
        exactly the positions this tokenisation predicts response tokens from."""
        ((ids, _),) = rows
        length = len(ids)
        wanted = np.flatnonzero(inputs["next_loss_mask"][:length])
        offline: dict[str, dict[str, Any]] = {}
        for (teacher, head), blob in blobs.items():
            dense = topk_store.dense_topk(blob, length)
            found = np.flatnonzero(dense["topk_ids"][:, 0] >= 0)
            if not np.array_equal(found, wanted):
                raise RecordError(
                    self.source_name, index, f"offline.{teacher}.{head}",
                    f"a top-k distribution at each of the {len(wanted)} positions predicting "
                    f"a response token under this tokenizer and max_len {self.max_len}",
                    f"{len(found)} cached positions {found[:8].tolist()}... against "
                    f"{wanted[:8].tolist()}...; re-run cache-teacher with this data config")
            if self.pad_to_max_len:
                pad = self.max_len - length
                dense = {"topk_ids": np.pad(dense["topk_ids"], ((0, pad), (0, 0)),
                                            constant_values=-1),
                         "topk_logprobs": np.pad(dense["topk_logprobs"], ((0, pad), (0, 0))),
                         "tail_logprob": np.pad(dense["tail_logprob"], (0, pad))}
            offline.setdefault(teacher, {})[head] = dense
        return offline

    def _pair_inputs(self, rows: list[tokens.Row], pad_id: int) -> dict[str, np.ndarray]:
        return tokens.token_arrays(rows, pad_id, self.max_len,
                                   self.list_size if self.kind == "listwise" else None)

    def _chat_inputs(self, rows: list[tokens.Row], pad_id: int) -> dict[str, np.ndarray]:
        ((ids, aux),) = rows
        if not self.pad_to_max_len:  # packing pads later
            return {"input_ids": ids, **_chat_masks(aux.astype(np.int32))}
        arrays = tokens.token_arrays(rows, pad_id, self.max_len)
        return {"input_ids": arrays["input_ids"], "attention_mask": arrays["attention_mask"],
                **_chat_masks(arrays["token_type_ids"])}

    def _labels(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if self.kind == "text":
            labels = record.get("labels", {})
            out = {}
            for name, kind in self.label_types.items():
                dtype = np.int32 if kind == "int" else np.float32
                out[f"label/{name}"] = dtype(labels.get(name, 0))
                out[f"label_mask/{name}"] = np.float32(name in labels)
            if self.offline_shapes:
                out["offline"] = self._offline(record)
            return out
        items = (record["candidates"][: self.list_size] if self.kind == "listwise"
                 else [record])
        rows = []
        for i, item in enumerate(items):
            grade = item["grade"] if self.kind != "impressions" else 0
            probs = item.get("grade_probs")
            actions = item.get("actions", {})
            rows.append({
                "grade": np.int32(grade),
                "grade_probs": (np.asarray(probs, np.float32) if probs is not None
                                else np.eye(NUM_GRADES, dtype=np.float32)[grade]),
                "grade_probs_mask": np.float32(probs is not None),
                "position": np.int32(item.get("position", i if self.kind == "listwise" else 0)),
                "actions": np.array([actions.get(a, 0) for a in self.action_names], np.float32),
                "action_mask": np.array([a in actions for a in self.action_names], np.float32),
                **({"offline": self._offline(item)} if self.offline_shapes else {}),
            })
        features = {"member_features": np.asarray(record["member_features"], np.float32)}
        if self.kind != "listwise":
            return {**rows[0], **features}
        n_real = len(rows)
        rows += [jax.tree.map(np.zeros_like, rows[0])] * (self.list_size - n_real)
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *rows)
        stacked["candidate_mask"] = (np.arange(self.list_size) < n_real).astype(np.float32)
        return {**stacked, **features}

    def _offline(self, item: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
        offline = item.get("offline", {})
        return {teacher: {output: np.asarray(offline[teacher][output], np.float32)
                          for output in shapes}
                for teacher, shapes in self.offline_shapes.items()}


CHAT_MASKS = ("loss_mask", "answer_mask", "next_loss_mask", "next_answer_mask",
              "next_style_mask")


def _chat_masks(aux_xT: np.ndarray) -> dict[str, np.ndarray]:
    """A chat row's masks from its token aux bits (see `tokens`): bit 0 the loss mask, bit 1
    the answer mask."""
    return chat_masks(aux_xT & 1, (aux_xT >> 1) & 1)


def chat_masks(loss_xT, answer_xT) -> dict[str, Any]:
    """Every mask of a chat batch from its `loss_mask` and `answer_mask` (numpy arrays, or jax
    arrays inside a jitted program such as on-policy sampling): those two, and each shifted
    left by one (`next_*`, as `losses.next_token_mask`): the positions whose next token is a
    response / answer token, the mask a token-level term reads; `next_style_mask`: response
    tokens outside the answer span (a register teacher that should not vote on the facts)."""
    xp = np if isinstance(loss_xT, np.ndarray) else jnp

    def shifted(mask_xT):
        return xp.concatenate([mask_xT[..., 1:], xp.zeros_like(mask_xT[..., :1])], axis=-1)

    return {"loss_mask": loss_xT, "answer_mask": answer_xT, "next_loss_mask": shifted(loss_xT),
            "next_answer_mask": shifted(answer_xT),
            "next_style_mask": shifted(loss_xT * (1 - answer_xT))}


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
    extra_tokenizers: Mapping[str, Any] | None = None,
    kind: str | None = None,
    max_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    list_size: int | None = None,
    action_names: Sequence[str] = (),
    member_features_dim: int | None = None,
    label_types: Mapping[str, str] | None = None,
    pack: bool = False,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    drop_remainder: bool = True,
    skip_malformed: bool = False,
    offline_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
    sample_candidates: bool = False,
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

    Tokenisation: each record's text is tokenised once per distinct tokenizer: `tokenizer`
    (the student's) gives the top-level inputs, each `extra_tokenizers[K]` gives
    `tokens[K]`. Token ids stored with the dataset by `data prepare --tokenizer` are read
    instead of tokenising when the tokenizer's fingerprint and `max_len` match.

    Batch contract (B batch, T = max_len, N = list_size, F member features,
    K = len(action_names), in the order given):

    - pointwise / impressions: `input_ids`, `attention_mask` (1 = real token, right padding,
      pad id = the tokenizer's), `token_type_ids` (0 = query + member, 1 = document) int32
      [B, T]; `grade` int32 [B]; `grade_probs` float32 [B, 5] (one-hot of `grade` where the
      record has none) with `grade_probs_mask` float32 [B] (1 = the record had soft labels);
      `member_features` float32 [B, F]; `position` int32 [B] (0 for pointwise);
      `actions`, `action_mask` float32 [B, K] (mask 0 where the record lacks that action).
    - listwise: the candidate fields gain an axis: [B, N, T], [B, N], [B, N, 5], [B, N, K];
      `candidate_mask` float32 [B, N]; `member_features` [B, F]. Lists are cut to their first
      N candidates (`sample_candidates`: N drawn at random, in list order, anew each epoch;
      `SampleCandidates`) or padded; a candidate without a position gets its index in the
      list.
    - text: `input_ids`, `attention_mask`, `token_type_ids` (0 = text, 1 = text_pair) int32
      [B, T]; per label name L of the dataset (`label_types`, {L: "int" | "float"}, default:
      the dataset's metadata, or a scan of an in-memory source): `label/L` [B], int32 for an
      int label (class ids, 0/1 flags), float32 for a float one, 0 where absent, and
      `label_mask/L` float32 [B] (0 where the record lacks that label).
    - chat: `input_ids`, `attention_mask`, `loss_mask` (1 on assistant tokens, including the
      end-of-message token), `answer_mask` (1 on the tokens of assistant messages' `answer`
      spans), `next_loss_mask` / `next_answer_mask` (each shifted left by one: the positions
      predicting such a token, what a token-level term's `mask` names), `next_style_mask`
      (`next_loss_mask` outside the answer span) int32 [B, T]; with `pack=True` also `segment_ids` (1, 2, ... per
      packed conversation, 0 on padding) and `positions` [B, T].
    - every kind but packed chat: `record_index` int32 [B], the record's index in its split
      (map predictions back to records and their ids).
    - with `extra_tokenizers`: `tokens` {K: {"input_ids", "attention_mask", "token_type_ids"}}
      each int32 with the top-level inputs' shape ([B, T]; listwise [B, N, T]) and max_len,
      under tokenizer K (chat: `input_ids`, `attention_mask`, `loss_mask`).
    - records carrying cached teacher outputs (`offline`, written by `jaxdistill
      cache-teacher`): `offline` {teacher: {output: float32 [B, ...]}} (listwise:
      [B, N, ...], zeros on padding), read by the step as an offline teacher's outputs.
    - chat with a top-k cache (`cache-teacher --top-k K`, `data.topk_store`): `offline`
      {teacher: {head: {"topk_ids" int32 [B, T, K], "topk_logprobs" float16|float32
      [B, T, K], "tail_logprob" float32 [B, T]}}}, what `losses.topk_teacher` returns: stored
      at the `next_loss_mask` positions, ids -1 elsewhere (packed rows: packed like the masks).
    - with `skip_malformed=True`: `batch_malformed` int32 scalar, the malformed records
      skipped since the previous batch (sum it at the metric cadence).

    Pair kinds are encoded as tokenizer pairs: first segment the query plus (when non-empty)
    the member text on a new line, second segment the document, truncating the longest
    segment to `max_len`. Chat is rendered with the tokenizer's chat template.
    """
    kind = kind or getattr(source, "kind", None)
    if kind not in ("chat", *PAIR_KINDS):
        raise ValueError(f"unknown or missing record kind {kind!r}; pass kind=")
    if pack and kind != "chat":
        raise ValueError(f"pack=True is supported for chat data only, not {kind!r}")
    if pack and extra_tokenizers:
        raise ValueError("pack=True with extra_tokenizers: each tokenizer would pack rows "
                         "differently; pack with one tokenizer")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    source_name = getattr(source, "name", type(source).__name__)
    if member_features_dim is None:
        member_features_dim = (0 if kind in ("chat", "text")
                               else len(source[0].get("member_features", [])))
    if offline_shapes is None:
        offline_shapes = {} if kind == "chat" else offline_shapes_of(source[0], kind)
    stored_topk = getattr(source, "stored_topk", None)
    topk = stored_topk() if kind == "chat" and stored_topk is not None else {}
    if label_types is None and kind == "text":
        label_types = label_types_of(source)
    if any(not isinstance(key, str) or not key for key in extra_tokenizers or {}):
        raise ValueError(f"extra_tokenizers keys must be non-empty names, got "
                         f"{sorted(map(repr, extra_tokenizers))}")
    tokenizers = {PRIMARY: tokenizer, **(extra_tokenizers or {})}
    first_key: dict[str, str] = {}
    same_as = {key: first_key.setdefault(tokenizer_fingerprint(each), key)
               for key, each in tokenizers.items()}
    stored_of = getattr(source, "stored_tokens", None)
    stored = {}
    if stored_of is not None:
        for key in set(same_as.values()):
            ids = stored_of(tokenizers[key], max_len)
            if ids is not None:
                stored[key] = ids

    dataset = grain.MapDataset.source(_IndexedSource(source, stored, topk))
    # Equal shards (the remainder is dropped) keep every host stepping in lockstep.
    per_shard = len(dataset) // shard_count
    if per_shard == 0:
        raise ValueError(f"{source_name}: {len(dataset)} records cannot fill {shard_count} shards")
    dataset = dataset[shard_index: per_shard * shard_count: shard_count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if num_epochs != 1:
        dataset = dataset.repeat(num_epochs)
    if sample_candidates and kind == "listwise":
        dataset = dataset.random_map(SampleCandidates(list_size), seed=seed)
    dataset = dataset.map(EncodeRecords(
        kind=kind, tokenizers=tokenizers, source_name=source_name, max_len=max_len,
        member_features_dim=member_features_dim, action_names=action_names,
        list_size=list_size, pad_to_max_len=not pack, skip_malformed=skip_malformed,
        offline_shapes=offline_shapes, label_types=label_types, same_as=same_as,
        sample_candidates=sample_candidates and kind == "listwise"))
    read_options = grain.ReadOptions(
        num_threads=0 if worker_count else 2,
        prefetch_buffer_size=0 if worker_count else max(prefetch, 1) * batch_size)
    iter_dataset = dataset.to_iter_dataset(read_options)
    if skip_malformed:
        iter_dataset = SkipMalformed(iter_dataset)
    if pack:
        length_struct = {"input_ids": max_len, **{mask: max_len for mask in CHAT_MASKS}}
        padding_struct = {key: None for key in length_struct}
        meta = (*CHAT_MASKS, "malformed") if skip_malformed else CHAT_MASKS
        if topk:  # cached top-k arrays pack along the tokens; ids are -1 on padding
            length_struct["offline"], padding_struct["offline"] = {}, {}
            for teacher, head in topk:
                length_struct["offline"].setdefault(teacher, {})[head] = dict.fromkeys(
                    TOPK_KEYS, max_len)
                padding_struct["offline"].setdefault(teacher, {})[head] = {
                    "topk_ids": -1, "topk_logprobs": None, "tail_logprob": None}
            meta = (*meta, "offline")
        iter_dataset = grain.experimental.FirstFitPackIterDataset(
            iter_dataset, length_struct=length_struct, padding_struct=padding_struct,
            num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle, meta_features=meta)
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


def batch_keys(kind: str, *, label_types: Mapping[str, str] | None = None,
               pack: bool = False, skip_malformed: bool = False) -> set[str]:
    """The top-level keys of `kind`'s batches (see `make_dataset`), for start-up checks of
    the keys a config reads; `offline` and `tokens` come with the data and tokenizers."""
    if kind == "chat":
        keys = {"input_ids", "attention_mask", *CHAT_MASKS}
        keys |= {"segment_ids", "positions"} if pack else {"record_index"}
    elif kind == "text":
        keys = {"input_ids", "attention_mask", "token_type_ids", "record_index"}
        keys |= {f"{prefix}/{name}" for name in label_types or {}
                 for prefix in ("label", "label_mask")}
    else:
        keys = {"input_ids", "attention_mask", "token_type_ids", "record_index", "grade",
                "grade_probs", "grade_probs_mask", "member_features", "position", "actions",
                "action_mask"}
        if kind == "listwise":
            keys.add("candidate_mask")
    if skip_malformed:
        keys.add("batch_malformed")
    return keys


def label_types_of(source: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """{label: "int" | "float"} of a text source: its dataset's metadata (`label_types`), or
    a scan of every record of an in-memory one."""
    known = getattr(source, "label_types", None)
    if known is not None:
        return dict(known)
    label_types: dict[str, str] = {}
    for record in source:
        labels = record.get("labels", {}) if isinstance(record, Mapping) else {}
        if isinstance(labels, Mapping):
            update_label_types(label_types, labels)
    return dict(sorted(label_types.items()))


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position, to save with a checkpoint."""
    return iterator.get_state()


def restore_iterator(iterator: grain.DatasetIterator, state: Mapping[str, Any]) -> None:
    """Moves a fresh iterator of the same pipeline to a saved position."""
    iterator.set_state(state)
