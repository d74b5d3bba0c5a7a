"""`jaxdistill data prepare`: JSONL or Parquet records -> a validated array_record dataset.

Each input record is checked against its kind's schema (`jaxdistill.data.records`); a bad one
fails naming the file and its 0-based record index (= line number - 1 for JSONL), or is
skipped and counted with `skip_malformed`. Output goes through `sources.write_dataset`, so it
is the same format the built-in workloads write, and it appears atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxdistill.data import sources

PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class PrepareReport:
    input_path: str
    out_dir: str
    kind: str
    split: str
    written: int
    skipped: int
    content_sha256: str


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields raw records from a `.jsonl` / `.json` (one object per line) or `.parquet` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix in (".parquet", ".pq"):
        yield from _read_parquet(path)
    else:
        raise ValueError(f"{path}: unknown input format {suffix!r}; expected .jsonl or .parquet")


def _read_jsonl(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                # Passed on as the raw text: validation then reports "expected a JSON object,
                # found '<the line>'" with the file and index like any other bad record.
                yield line.rstrip("\n")


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


def prepare(
    input_path: str | os.PathLike,
    kind: str,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    skip_malformed: bool = False,
    overwrite: bool = False,
) -> PrepareReport:
    """Validates the records of `input_path` and writes them as split `split` at `out_dir`."""
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: no such input file")
    source = os.fspath(input_path)
    sources.write_dataset(read_records(input_path), kind, out_dir, split=split,
                          overwrite=overwrite, skip_malformed=skip_malformed, source_name=source)
    info = sources.dataset_info(out_dir)
    return PrepareReport(
        input_path=source, out_dir=os.fspath(out_dir), kind=kind, split=split,
        written=info["splits"][split], skipped=info["skipped"][split],
        content_sha256=info["content_sha256"][split])

