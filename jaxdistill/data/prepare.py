"""`jaxdistill data prepare`: JSONL, Parquet or CSV records -> splits of a validated dataset.

Each input record is checked against its kind's schema (`jaxdistill.data.records`); a bad one
fails naming the file and its 0-based record index (JSONL: line number - 1; CSV: data row,
header excluded; Parquet: row), or is skipped and counted with `skip_malformed`. Several
splits are written in one call, each from its own file or cut from one file by seeded
fractions. Output goes through `sources.write_dataset`: the same format the built-in workloads
write, appearing atomically, with the dataset's other splits kept.

CSV: one column per field. A dotted column name nests (`labels.spam` -> `{"labels": {"spam":
...}}`, `actions.click`). Cells of text fields (`query`, `document`, `member`, `text`,
`text_pair`, `id`) are taken verbatim (an empty cell is the empty string); any other cell is
read as JSON (`3`, `0.5`, `[0.1, 0.2]`) or else kept as text, and an empty cell leaves the
field out (a record without that label).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdistill.data import sources

PARQUET_BATCH_ROWS = 1024
FRACTION_SPLITS = ("train", "validation", "test")
CSV_TEXT_FIELDS = frozenset({"query", "document", "member", "text", "text_pair", "id"})


@dataclasses.dataclass(frozen=True)
class SplitReport:
    input_path: str
    written: int
    skipped: int
    content_sha256: str


@dataclasses.dataclass(frozen=True)
class PrepareReport:
    out_dir: str
    kind: str
    splits: dict[str, SplitReport]
    tokens: dict[str, Any] = dataclasses.field(default_factory=dict)  # stored ids, by key

    def to_json(self) -> dict[str, Any]:
        """What the CLI prints: per-split counts plus their totals."""
        return {"out_dir": self.out_dir, "kind": self.kind, "split": ",".join(self.splits),
                "written": sum(s.written for s in self.splits.values()),
                "skipped": sum(s.skipped for s in self.splits.values()),
                "splits": {name: dataclasses.asdict(s) for name, s in self.splits.items()},
                "tokens": self.tokens}


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yields (index, raw record) from a `.jsonl` (one object per line), `.parquet` or `.csv`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix in (".parquet", ".pq"):
        yield from enumerate(_read_parquet(path))
    elif suffix == ".csv":
        yield from enumerate(_read_csv(path))
    else:
        raise ValueError(f"{path}: unknown input format {suffix!r}; expected .jsonl, .parquet or "
                         ".csv")


def _utf8_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                # utf-8-sig on the first line: spreadsheet exports start with a byte-order mark.
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}: line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at "
                    f"byte {error.start + 1} of the line); re-encode the file as UTF-8") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for index, line in enumerate(_utf8_lines(path)):
        if not line.strip():
            continue  # blank lines are not records; indices stay line number - 1
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError:
            # Passed on as the raw text: validation then reports "expected a JSON object,
            # found '<the line>'" with the file and index like any other bad record.
            yield index, line.rstrip("\n")


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:  # pyarrow is optional for the rest of the package
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from error
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            # Parquet has no dict-with-any-keys type: a map column arrives as [(key, value)].
            yield {key: _from_arrow(value) for key, value in row.items() if value is not None}


def _from_arrow(value: Any) -> Any:
    if isinstance(value, list):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {k: _from_arrow(v) for k, v in value}
        return [_from_arrow(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_arrow(v) for k, v in value.items() if v is not None}
    return value


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    rows = csv.reader(_utf8_lines(path))
    header = next(rows, None)
    if header is None:
        return
    columns = [name.strip().split(".") for name in header]
    for i, parts in enumerate(columns):
        for j, other in enumerate(columns):
            if i != j and other[: len(parts)] == parts:
                raise ValueError(f"{path}: header: column {header[i]!r} and column {header[j]!r} "
                                 "both give that field; keep one")
        if not all(parts):
            raise ValueError(f"{path}: header: column {header[i]!r} has an empty name part")
    for row in rows:
        if len(row) != len(header):
            # Passed on as text, so the record index is named like any other bad record.
            yield f"{len(row)} cells for {len(header)} columns: {','.join(row)}"
            continue
        record: dict[str, Any] = {}
        for parts, cell in zip(columns, row):
            value = _csv_value(parts[-1], cell)
            if value is None:
                continue
            node = record
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        yield record


def _csv_value(field: str, cell: str) -> Any:
    if field in CSV_TEXT_FIELDS:
        return cell
    if not cell.strip():
        return None
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell


def parse_fractions(text: str | Sequence[float]) -> tuple[float, ...]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1): 1 to 3 positive fractions summing to 1."""
    try:
        values = tuple(float(x) for x in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ValueError(f"split fractions {text!r}: expected comma-separated numbers such as "
                         "0.8,0.1,0.1") from None
    if not 1 <= len(values) <= len(FRACTION_SPLITS) or any(
            not math.isfinite(v) or v <= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(f"split fractions {text!r}: expected 1 to 3 positive fractions (for "
                         f"{', '.join(FRACTION_SPLITS)}) summing to 1, found {list(values)}")
    return values


def _fraction_assignment(path: Path, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split number of each record of `path` (by its index): a seeded permutation cut at the
    fractions, so sizes are exact and the same seed always gives the same splits."""
    indices = [index for index, _ in read_records(path)]
    order = np.random.default_rng(seed).permutation(len(indices))
    bounds = np.round(np.cumsum(fractions) * len(indices)).astype(int)
    assignment = np.full(max(indices, default=-1) + 1, -1, np.int8)
    for number, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds)):
        assignment[np.asarray(indices, np.int64)[order[lo:hi]]] = number
    return assignment


def prepare(
    inputs: str | os.PathLike | Mapping[str, str | os.PathLike],
    kind: str,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    split_fractions: str | Sequence[float] | None = None,
    seed: int = 0,
    skip_malformed: bool = False,
    overwrite: bool = False,
    tokenizers: Sequence[str | os.PathLike | Any] = (),
    max_len: int | None = None,
) -> PrepareReport:
    """Validates records and writes them as splits of the dataset at `out_dir`.

    `inputs` is one file (written as `split`, or cut into train/validation/test by
    `split_fractions` with `seed`) or a mapping split name -> file. Splits already at
    `out_dir` and not written here are kept; rewriting one needs `overwrite`. `tokenizers`
    (directories, `builtin:...` or loaded tokenizers) with `max_len`: each record's token ids
    under each are stored with it, read by the pipeline instead of tokenising again.
    """
    from jaxdistill.data.tokenizer import load_tokenizer

    if tokenizers and (max_len is None or max_len < 2):
        raise ValueError(f"storing token ids needs max_len >= 2 (--max-len), got {max_len}")
    if max_len is not None and not tokenizers:
        raise ValueError(f"max_len {max_len} is the length of stored token ids; name the "
                         "tokenizer(s) to store them for (--tokenizer)")
    loaded = [load_tokenizer(t) if isinstance(t, (str, os.PathLike)) else t for t in tokenizers]
    if isinstance(inputs, Mapping):
        if split_fractions is not None:
            raise ValueError("split fractions cut one input file; got one file per split")
        files = {name: Path(path) for name, path in inputs.items()}
    else:
        files = {split: Path(inputs)}
    if not files:
        raise ValueError("no input files given")
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such input file")
    if split_fractions is not None:
        (path,) = files.values()
        fractions = parse_fractions(split_fractions)
        assignment = _fraction_assignment(path, fractions, seed)
        names = FRACTION_SPLITS[: len(fractions)]
        sizes = {name: int(np.sum(assignment == number)) for number, name in enumerate(names)}
        if 0 in sizes.values():
            raise ValueError(f"{path}: {int(np.sum(assignment >= 0))} records cut by fractions "
                             f"{list(fractions)} leave a split empty: {sizes}")
        splits = {name: _indexed(path, assignment, number) for number, name in enumerate(names)}
        files = {name: path for name in splits}
    else:
        splits = {name: _indexed(path) for name, path in files.items()}
    sources.write_dataset(splits, kind, out_dir, overwrite=overwrite,
                          skip_malformed=skip_malformed, tokenizers=loaded, max_len=max_len)
    info = sources.dataset_info(out_dir)
    return PrepareReport(out_dir=os.fspath(out_dir), kind=kind, splits={
        name: SplitReport(input_path=os.fspath(files[name]), written=info["splits"][name],
                          skipped=info["skipped"][name],
                          content_sha256=info["content_sha256"][name])
        for name in splits}, tokens=info["tokens"])


def _indexed(path: Path, assignment: np.ndarray | None = None,
             number: int = 0) -> sources.IndexedRecords:
    """A split's records from `path` (only those assigned `number`), read as they are written."""
    pairs = ((index, record) for index, record in read_records(path)
             if assignment is None or assignment[index] == number)
    return sources.IndexedRecords(pairs, os.fspath(path))
