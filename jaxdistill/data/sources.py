"""Record datasets on disk: a tfds builder writing array_record, read back without TensorFlow.

Longer than ~400 lines because it is the on-disk dataset format in one place: the tfds builder,
atomic writes, split merging, reading without TensorFlow and the stored token ids.

Storage path taken: **tfds**. Checked against tensorflow-datasets 4.9.10 with TensorFlow not
installed: `GeneratorBasedBuilder.download_and_prepare()` with `file_format="array_record"`
writes, and `tfds.builder_from_directory(dir).as_data_source(split)` (the directory form of
`tfds.data_source`) reads, without importing TensorFlow, as long as every feature is flat.
Nested ragged features (a list of candidates, each with its own list or dict of actions) need
TensorFlow to serialise, and our records nest, and their action names vary by dataset. So each
example has one tfds feature, `record`: the record as canonical JSON (sorted keys, UTF-8).
The typed schema lives in `jaxdistill.data.records` and is checked on write and on read;
tfds contributes the on-disk layout, `dataset_info.json` with split sizes, `metadata.json`
(kind, per-split content hashes, skipped-record counts) and random access for grain.

Writes are atomic: tfds writes into a staging directory next to the target (its own
`incomplete.*` directory inside that), and only a finished dataset is renamed onto
`out_dir`. A crash leaves at worst a hidden `.<name>.incomplete-*` directory, never a
half dataset at `out_dir`. Writing splits into an existing dataset keeps its other splits:
their files are hard-linked (copied across file systems) into the staged dataset and their
split entries and metadata merged, so adding a validation split never rewrites train.

Token ids stored at write time (`tokenizers=`, `data prepare --tokenizer`) sit beside the
records, outside tfds' features: `tokens/<fingerprint[:16]>-len<max_len>-v<layout>/<split>
.array_record`, entry i = record i's rows as `tokens.pack_rows` bytes, listed under `tokens`
in metadata.json. Raw int32 bytes rather than a JSON int list in the record: decoding a
16-candidate list's ids took 15-90 us by `np.frombuffer` against ~400 us by `json.loads`, and
tokenising it live 4-6 ms (scripts/bench_input.py on 2 busy CPU cores).
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from jaxdistill.data import tokens
from jaxdistill.data.records import KINDS, RecordError, update_label_types, validate_record

FORMAT_VERSION = "1.0.0"
TOKENS_DIR = "tokens"  # stored token ids: TOKENS_DIR/<key>/<split>.array_record
_SPLIT_METADATA = ("content_sha256", "skipped", "label_types")  # per-split metadata keys


class EmptySplitError(ValueError):
    """A split would hold no records (an empty input, or every record malformed and skipped)."""


@dataclasses.dataclass(frozen=True)
class IndexedRecords:
    """One split's records with their own indices and source, e.g. an input file's records
    (index = position in the file), so errors and skip counts name where a record came from."""

    pairs: Iterable[tuple[int, Any]]
    source: str


def encode_record(record: Mapping[str, Any]) -> str:
    """Canonical JSON for a record: the same record always gives the same bytes."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
    """tfds builder for jaxdistill records. Subclass, set `KIND`, implement `record_splits`.

    A built-in workload subclasses this (its class name becomes the tfds dataset name) and
    yields plain record dicts; validation, canonical encoding and content hashing happen here.
    """

    VERSION = tfds.core.Version(FORMAT_VERSION)
    KIND: str = ""
    SKIP_MALFORMED: bool = False

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' own lookup imports `importlib_resources`, which it does not install; the
        # source file is all it needs (to look for a checksums file, which we never have).
        return epath.Path(inspect.getfile(cls))

    @abc.abstractmethod
    def record_splits(self) -> Mapping[str, Iterable[Mapping[str, Any]]]:
        """Split name -> records of kind `KIND`."""

    def _info(self) -> tfds.core.DatasetInfo:
        if self.KIND not in KINDS:
            raise ValueError(f"{type(self).__name__}.KIND is {self.KIND!r}; expected one of {KINDS}")
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"jaxdistill {self.KIND} records, one canonical JSON object per example.",
            features=tfds.features.FeaturesDict({"record": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(kind=self.KIND, content_sha256={}, skipped={},
                                            label_types={}),
            disable_shuffling=True,  # keep the written order; pipelines shuffle with a seed
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {split: self._generate_examples(split, records)
                for split, records in self.record_splits().items()}

    def _generate_examples(self, split: str, records: Iterable[Mapping[str, Any]]):
        digest, skipped, key, label_types = hashlib.sha256(), 0, 0, {}
        if isinstance(records, IndexedRecords):
            source, pairs = records.source, records.pairs
        else:
            source = getattr(self, "source_name", None) or f"{self.name}[{split}]"
            pairs = enumerate(records)
        for index, record in pairs:
            try:
                validate_record(self.KIND, record, source=source, index=index)
            except RecordError:
                if not self.SKIP_MALFORMED:
                    raise
                skipped += 1
                continue
            if self.KIND == "text":
                update_label_types(label_types, record.get("labels", {}))
            line = encode_record(record)
            digest.update(line.encode())
            digest.update(b"\n")
            yield key, {"record": line}
            key += 1
        if key == 0:  # tfds would fail later with a bare "No examples were yielded"
            why = (f"all {skipped} records are malformed (skipped with skip_malformed)"
                   if skipped else "there are no records")
            raise EmptySplitError(f"{source}: nothing to write to split {split!r}: {why}")
        # metadata.json is written after all splits are generated, so these land on disk.
        self.info.metadata["content_sha256"][split] = digest.hexdigest()
        self.info.metadata["skipped"][split] = skipped
        self.info.metadata["label_types"][split] = label_types


class JaxdistillRecords(RecordsBuilder):
    """The builder behind `write_dataset`: records handed in by the caller, optionally with
    their token ids per tokenizer written to `tokens_dir` (beside tfds' own staging)."""

    def __init__(self, *, kind: str, splits: Mapping[str, Iterable], skip_malformed: bool,
                 source_name: str | None, tokenizers: Sequence[Any] = (),
                 max_len: int | None = None, tokens_dir: Path | None = None, **kwargs):
        self.KIND, self.SKIP_MALFORMED = kind, skip_malformed
        self._record_splits, self.source_name = splits, source_name
        self.tokenizers, self.max_len, self.tokens_dir = list(tokenizers), max_len, tokens_dir
        super().__init__(**kwargs)

    def record_splits(self):
        return self._record_splits

    def _generate_examples(self, split, records):
        if not self.tokenizers:
            yield from super()._generate_examples(split, records)
            return
        from array_record.python.array_record_module import ArrayRecordWriter

        from jaxdistill.data.tokenizer import tokenizer_fingerprint, tokenizer_name

        writers, entries = [], self.info.metadata.setdefault("tokens", {})
        for tokenizer in self.tokenizers:
            fingerprint = tokenizer_fingerprint(tokenizer)
            key = tokens_key(fingerprint, self.max_len)
            (self.tokens_dir / key).mkdir(parents=True, exist_ok=True)
            path = self.tokens_dir / key / f"{split}.array_record"
            writers.append((tokenizer, ArrayRecordWriter(os.fspath(path), "group_size:1")))
            entry = entries.setdefault(key, {
                "fingerprint": fingerprint, "name": tokenizer_name(tokenizer),
                "max_len": self.max_len, "encoding_version": tokens.ENCODING_VERSION,
                "splits": []})
            entry["splits"] = sorted({*entry["splits"], split})
        try:
            for key, example in super()._generate_examples(split, records):
                record = json.loads(example["record"])
                for tokenizer, writer in writers:
                    writer.write(tokens.pack_rows(tokens.encode_rows(
                        self.KIND, record, tokenizer, self.max_len,
                        where=f"{self.source_name or self.name}[{split}]: record {key}")))
                yield key, example
        finally:
            for _, writer in writers:
                writer.close()


def tokens_key(fingerprint: str, max_len: int) -> str:
    """Directory name of stored token ids: tokenizer, max_len and encoding layout."""
    return f"{fingerprint[:16]}-len{max_len}-v{tokens.ENCODING_VERSION}"


def write_dataset(
    records: Iterable[Mapping[str, Any]] | Mapping[str, Iterable[Mapping[str, Any]]],
    kind: str,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    overwrite: bool = False,
    skip_malformed: bool = False,
    source_name: str | None = None,
    tokenizers: Sequence[Any] = (),
    max_len: int | None = None,
) -> Path:
    """Validates and writes records of `kind` as splits of the array_record dataset `out_dir`.

    `records` is either an iterable of record dicts (written as `split`) or a mapping from
    split name to such iterables (or `IndexedRecords`). An existing dataset at `out_dir` keeps
    the splits not written here; rewriting one of its splits needs `overwrite`. Malformed
    records raise `RecordError` naming `source_name` (default: the dataset name and split) and
    the record index, or are skipped and counted in `metadata.json` with `skip_malformed`; a
    split left with no records raises `EmptySplitError`. With `tokenizers` (and `max_len`),
    each record's token ids under each tokenizer are stored beside it, and `make_dataset`
    reads them instead of tokenising when tokenizer and max_len match. Returns `out_dir`.
    """
    if tokenizers and not max_len:
        raise ValueError("storing token ids needs max_len (the length they are truncated to)")
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    splits = dict(records) if isinstance(records, Mapping) else {split: records}
    out_dir = Path(out_dir)
    kept: list[str] = []
    if out_dir.exists():
        old = _existing_info(out_dir)
        if old["kind"] != kind:
            raise ValueError(f"{out_dir} holds {old['kind']!r} records; cannot add {kind!r} "
                             f"splits {sorted(splits)} to it (write to a new directory)")
        clash = [name for name in old["splits"] if name in splits]
        if clash and not overwrite:
            raise FileExistsError(
                f"{out_dir} already has split(s) {', '.join(clash)}; pass --overwrite "
                "(overwrite=True in Python) to rewrite them (its other splits are kept)")
        kept = [name for name in old["splits"] if name not in splits]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.incomplete-{uuid.uuid4().hex[:8]}"
    try:
        builder = JaxdistillRecords(kind=kind, splits=splits, skip_malformed=skip_malformed,
                                  source_name=source_name, tokenizers=tokenizers,
                                  max_len=max_len, tokens_dir=stage / TOKENS_DIR,
                                  data_dir=os.fspath(stage / "tfds"), file_format="array_record")
        builder.download_and_prepare()
        staged = Path(builder.data_dir)
        if (stage / TOKENS_DIR).exists():
            os.rename(stage / TOKENS_DIR, staged / TOKENS_DIR)
        if kept:
            _merge_splits(out_dir, staged, kept)
        _swap_in(staged, out_dir, stage.with_name(stage.name + "-old"))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def join_datasets(parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  overwrite: bool = False) -> Path:
    """Joins datasets of one kind and the same splits, each written by one process (part i's
    records follow part i-1's), into one dataset at `out_dir`, then deletes the parts.

    Record shards are renamed in order to `<name>-<split>.array_record-<j>-of-<total>`, split
    sizes, shard lengths and byte counts summed, content hashes recomputed over the joined
    records (so the result reads, and hashes, as one write of all records); every other file
    of a part below a subdirectory (a top-k cache's `offline/...` shards) moves as it is.
    Atomic as `write_dataset`: staged beside `out_dir`, renamed onto it at the end."""
    parts, out_dir = [Path(p) for p in parts], Path(out_dir)
    infos = [json.loads((p / "dataset_info.json").read_text()) for p in parts]
    metas = [json.loads((p / "metadata.json").read_text()) for p in parts]
    splits = [[entry["name"] for entry in info["splits"]] for info in infos]
    if any(m["kind"] != metas[0]["kind"] for m in metas) or any(s != splits[0] for s in splits):
        raise ValueError(f"cannot join {[os.fspath(p) for p in parts]}: kinds "
                         f"{[m['kind'] for m in metas]} and splits {splits} must all be equal")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    info, name, fmt = infos[0], infos[0]["name"], infos[0]["fileFormat"]
    stage = out_dir.parent / f".{out_dir.name}.incomplete-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        for entry in info["splits"]:
            split = entry["name"]
            files = [f for p, part_info in zip(parts, infos) for f in sorted(
                p.glob(f"{glob.escape(part_info['name'])}-{glob.escape(split)}.{fmt}-*"))]
            for j, path in enumerate(files):
                os.rename(path, stage / f"{name}-{split}.{fmt}-{j:05d}-of-{len(files):05d}")
            joined = [next(e for e in part_info["splits"] if e["name"] == split)
                      for part_info in infos]
            entry["shardLengths"] = [n for e in joined for n in e["shardLengths"]]
            entry["numBytes"] = str(sum(int(e.get("numBytes", 0)) for e in joined))
        for part in parts:
            for path in sorted(part.rglob("*")):
                relative = path.relative_to(part)
                if path.is_file() and len(relative.parts) > 1:
                    (stage / relative).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(path, stage / relative)
        shutil.copy2(parts[0] / "features.json", stage / "features.json")
        (stage / "dataset_info.json").write_text(json.dumps(info, indent=2))
        meta = {**metas[0], "skipped": {s: sum(m["skipped"].get(s, 0) for m in metas)
                                        for s in splits[0]}}
        for split in splits[0]:
            merged: dict[str, str] = {}
            for m in metas:
                for label, kind in m.get("label_types", {}).get(split, {}).items():
                    if merged.get(label) != "float":
                        merged[label] = kind
            meta.setdefault("label_types", {})[split] = dict(sorted(merged.items()))
        (stage / "metadata.json").write_text(json.dumps(meta))
        meta["content_sha256"] = {s: content_hash(open_source(stage, s)) for s in splits[0]}
        (stage / "metadata.json").write_text(json.dumps(meta))
        _swap_in(stage, out_dir, stage.with_name(stage.name + "-old"))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    return out_dir


def _swap_in(staged: Path, out_dir: Path, trash: Path) -> None:
    """`staged` becomes `out_dir`: an old `out_dir` is moved aside to `trash` first (so a
    crash leaves one whole dataset), then removed."""
    if out_dir.exists():
        os.rename(out_dir, trash)
        os.rename(staged, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staged, out_dir)


def _existing_info(out_dir: Path) -> dict[str, Any]:
    if not (out_dir / "dataset_info.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not a jaxdistill dataset (no "
                              "dataset_info.json); choose another output directory")
    info = json.loads((out_dir / "dataset_info.json").read_text())
    metadata = json.loads((out_dir / "metadata.json").read_text())
    if info.get("fileFormat") != "array_record":
        raise ValueError(f"{out_dir}: expected an array_record dataset, found file format "
                         f"{info.get('fileFormat')!r}")
    return {"kind": metadata.get("kind"), "name": info["name"],
            "splits": [entry["name"] for entry in info["splits"]]}


def _merge_splits(old_dir: Path, new_dir: Path, kept: list[str]) -> None:
    """Brings `kept` splits of the dataset at `old_dir` into the freshly written `new_dir`:
    their files (renamed to the new dataset name), split entries and per-split metadata."""
    old_info = json.loads((old_dir / "dataset_info.json").read_text())
    new_info = json.loads((new_dir / "dataset_info.json").read_text())
    old_name, new_name = old_info["name"], new_info["name"]
    for split in kept:
        prefix = f"{old_name}-{split}.{old_info['fileFormat']}-"
        files = sorted(old_dir.glob(f"{glob.escape(prefix)}*"))
        # Stored token ids sit beside the records, one file per split and tokenizer.
        files += sorted(old_dir.glob(f"{TOKENS_DIR}/*/{glob.escape(split)}.array_record"))
        for path in files:
            relative = path.relative_to(old_dir).as_posix()
            if relative.startswith(prefix):
                relative = f"{new_name}-{relative[len(old_name) + 1:]}"
            _link_or_copy(path, new_dir / relative)
    entries = {entry["name"]: entry for entry in old_info["splits"]}
    new_info["splits"] = [entries[name] for name in kept] + new_info["splits"]
    (new_dir / "dataset_info.json").write_text(json.dumps(new_info, indent=2))
    old_meta = json.loads((old_dir / "metadata.json").read_text())
    new_meta = json.loads((new_dir / "metadata.json").read_text())
    for key in _SPLIT_METADATA:
        new_meta.setdefault(key, {}).update(
            {s: v for s, v in old_meta.get(key, {}).items() if s in kept})
    for tokens_key, entry in old_meta.get("tokens", {}).items():
        carried = [s for s in entry["splits"] if s in kept]
        if carried:
            merged = new_meta.setdefault("tokens", {}).setdefault(tokens_key, {**entry, "splits": []})
            merged["splits"] = sorted({*merged["splits"], *carried})
    (new_dir / "metadata.json").write_text(json.dumps(new_meta))


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # the old dataset is deleted after the swap; the link keeps the data
    except OSError:
        shutil.copy2(source, target)


def dataset_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Kind, split sizes, content hashes and skipped counts of a written dataset."""
    builder = _builder(data_dir)
    metadata = builder.info.metadata or {}
    return {
        "kind": metadata.get("kind"),
        "splits": {name: info.num_examples for name, info in builder.info.splits.items()},
        "content_sha256": dict(metadata.get("content_sha256", {})),
        "skipped": dict(metadata.get("skipped", {})),
        "label_types": merged_label_types(metadata),
        "tokens": dict(metadata.get("tokens", {})),
    }


def merged_label_types(metadata: Mapping[str, Any]) -> dict[str, str]:
    """{label: "int" | "float"} over every split of a text dataset (the same batch keys in all)."""
    merged: dict[str, str] = {}
    for types in metadata.get("label_types", {}).values():
        for name, kind in types.items():
            if merged.get(name) != "float":
                merged[name] = kind
    return dict(sorted(merged.items()))


def _builder(data_dir: str | os.PathLike):
    path = Path(data_dir)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a jaxdistill dataset (no dataset_info.json); write one with "
            "`jaxdistill data prepare` or a built-in workload builder")
    return tfds.builder_from_directory(os.fspath(path))


class RecordSource:
    """Random access to one split: `len(source)`, `source[i]` -> record dict.

    Picklable (grain worker processes receive it). `name` is what errors cite.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str):
        builder = _builder(data_dir)
        if split not in builder.info.splits:
            raise KeyError(f"{data_dir}: no split {split!r}; available: "
                           f"{', '.join(builder.info.splits.keys())}")
        self.kind: str = builder.info.metadata["kind"]
        self.name = f"{os.fspath(data_dir)}[{split}]"
        self._source = builder.as_data_source(split)
        # Every split of a text dataset gives the same label keys: the union over splits.
        self.label_types = (merged_label_types(builder.info.metadata) if self.kind == "text"
                            else None)
        self._dir, self._split = Path(data_dir), split
        self._tokens = dict(builder.info.metadata.get("tokens", {}))

    def stored_tokens(self, tokenizer, max_len: int) -> Sequence[bytes] | None:
        """Token ids stored for this split by `tokenizer` at `max_len` (`tokens.unpack_rows`
        reads each), or None: then the pipeline tokenises live."""
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        from jaxdistill.data.tokenizer import tokenizer_fingerprint

        key = tokens_key(tokenizer_fingerprint(tokenizer), max_len)
        entry = self._tokens.get(key)
        path = self._dir / TOKENS_DIR / key / f"{self._split}.array_record"
        if entry is None or self._split not in entry["splits"] or not path.is_file():
            return None
        stored = ArrayRecordDataSource([os.fspath(path)])
        if len(stored) != len(self):
            raise ValueError(f"{self.name}: {path} holds {len(stored)} token rows for "
                             f"{len(self)} records; rewrite the split with `data prepare`")
        return stored

    def stored_topk(self) -> dict[tuple[str, str], Sequence[bytes]]:
        """{(teacher, head): per-record top-k blobs} cached for this split by `cache-teacher
        --top-k` (`topk_store.dense_topk` reads each)."""
        from jaxdistill.data import topk_store

        stored = {}
        for key, paths in topk_store.stored_heads(self._dir, self._split).items():
            blobs = topk_store.open_shards(paths)
            if len(blobs) != len(self):
                raise ValueError(f"{self.name}: the top-k cache of {key[0]}.{key[1]} holds "
                                 f"{len(blobs)} entries for {len(self)} records "
                                 f"({[p.name for p in paths]}); re-run cache-teacher")
            stored[key] = blobs
        return stored

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return json.loads(self._source[int(index)]["record"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"RecordSource({self.name}, kind={self.kind}, n={len(self)})"


def open_source(data_dir: str | os.PathLike, split: str = "train") -> RecordSource:
    """Opens `split` of the dataset at `data_dir` for random access (no TensorFlow)."""
    return RecordSource(data_dir, split)


def content_hash(records: Iterable[Mapping[str, Any]]) -> str:
    """The sha256 that `write_dataset` stores for a split holding exactly `records`."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(encode_record(record).encode())
        digest.update(b"\n")
    return digest.hexdigest()

