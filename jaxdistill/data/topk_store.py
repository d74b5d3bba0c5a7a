"""A token-level teacher's cached top-k distributions: the compact bytes stored beside records.

`cache-teacher --top-k K` on chat data stores, for every record, the teacher's top-k ids,
log-probabilities and tail mass at the positions that predict a response token (the record's
`next_loss_mask`, positions counted in the record's own unpadded, unpacked tokens), as one
array_record entry per record:

    int32 [n, k, itemsize]   header: stored positions, k, bytes per log-prob (2 or 4)
    int32 [n]                the positions
    int32 [n, k]             token ids
    float16|float32 [n, k]   log-probabilities (softened by the manifest's temperature)
    float32 [n]              log of the mass outside the top-k (-inf when k = V)

so a stored token costs 4 + k * (4 + itemsize) + 4 bytes (`bytes_per_token`). float16
log-probs by default: half of float32's bytes, and float16's 11-bit significand keeps a top-k
log-prob in [-16, 0] within 2**-7 (a relative error of at most 0.4% on its probability),
far finer than bfloat16's 2**-4 there; log-probs below -65504 would overflow, and top-k
log-probs never come near that. The tail stays float32: one per token, and it is the
difference 1 - sum(top-k) whose rounding would decide the tail bucket's KL.

Files: `offline/<teacher>/<head>/<split>.array_record-<i>-of-<n>`, one per writing process
i of n, each holding a contiguous block of the split's records in order; read back in name
order they concatenate to the split.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

OFFLINE_DIR = "offline"
LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}
_SHARD = re.compile(r"^(?P<split>.+)\.array_record-(?P<i>\d{5})-of-(?P<n>\d{5})$")


def bytes_per_token(k: int, logprob_dtype: str) -> int:
    """Stored bytes per response token: its position, k ids, k log-probs and the tail."""
    return 4 + k * (4 + np.dtype(LOGPROB_DTYPES[logprob_dtype]).itemsize) + 4


def pack_topk(positions_N, ids_NxK, logprobs_NxK, tail_N, logprob_dtype: str) -> bytes:
    """One record's stored tokens as bytes (the layout in the module docstring)."""
    dtype = np.dtype(LOGPROB_DTYPES[logprob_dtype])
    ids_NxK = np.asarray(ids_NxK, np.int32)
    n, k = ids_NxK.shape
    header = np.asarray([n, k, dtype.itemsize], np.int32)
    return (header.tobytes() + np.asarray(positions_N, np.int32).tobytes() + ids_NxK.tobytes()
            + np.asarray(logprobs_NxK, dtype).tobytes() + np.asarray(tail_N, np.float32).tobytes())


def unpack_topk(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`pack_topk`'s inverse: positions [n], ids [n, k], log-probs [n, k], tail [n]."""
    n, k, itemsize = (int(x) for x in np.frombuffer(blob, np.int32, 3))
    dtype = np.float16 if itemsize == 2 else np.float32
    offset = 12
    positions = np.frombuffer(blob, np.int32, n, offset)
    offset += 4 * n
    ids = np.frombuffer(blob, np.int32, n * k, offset).reshape(n, k)
    offset += 4 * n * k
    logprobs = np.frombuffer(blob, dtype, n * k, offset).reshape(n, k)
    offset += itemsize * n * k
    tail = np.frombuffer(blob, np.float32, n, offset)
    return positions, ids, logprobs, tail


def dense_topk(blob: bytes, length: int) -> dict[str, np.ndarray]:
    """One record's cache as `losses.topk_teacher` lays it out over its `length` tokens:
    topk_ids int32 [length, k] (-1 where nothing is stored), topk_logprobs [length, k]
    (0 there), tail_logprob float32 [length] (0 there)."""
    positions, ids, logprobs, tail = unpack_topk(blob)
    k = ids.shape[1]
    out = {"topk_ids": np.full((length, k), -1, np.int32),
           "topk_logprobs": np.zeros((length, k), logprobs.dtype),
           "tail_logprob": np.zeros(length, np.float32)}
    out["topk_ids"][positions] = ids
    out["topk_logprobs"][positions] = logprobs
    out["tail_logprob"][positions] = tail
    return out


def shard_path(out_dir, teacher: str, head: str, split: str, shard: int, shards: int) -> Path:
    return (Path(out_dir) / OFFLINE_DIR / teacher / head
            / f"{split}.array_record-{shard:05d}-of-{shards:05d}")


def write_shard(path: Path, blobs) -> None:
    """Writes one shard file of per-record blobs, in order."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    try:
        for blob in blobs:
            writer.write(blob)
    finally:
        writer.close()


def stored_heads(data_dir, split: str) -> dict[tuple[str, str], list[Path]]:
    """{(teacher, head): shard files of `split`, in record order} of a dataset's top-k caches.

    A cache whose shards are not exactly 0..n-1 of n (one missing, another write's left
    over) is refused, naming the files found."""
    root = Path(data_dir) / OFFLINE_DIR
    found: dict[tuple[str, str], list[Path]] = {}
    if not root.is_dir():
        return found
    for head_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
        shards = [(m, path) for path in sorted(head_dir.iterdir())
                  if (m := _SHARD.match(path.name)) and m["split"] == split]
        if not shards:
            continue
        counts = {int(m["n"]) for m, _ in shards}
        if len(counts) != 1 or [int(m["i"]) for m, _ in shards] != list(range(counts.pop())):
            raise ValueError(f"{head_dir}: top-k shards of split {split!r} must be "
                             f"00000..n-1 of one n; found {[p.name for _, p in shards]}")
        found[(head_dir.parent.name, head_dir.name)] = [path for _, path in shards]
    return found


def open_shards(paths) -> Mapping[int, bytes]:
    """Random access to the blobs of shard files, concatenated in order."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    return ArrayRecordDataSource([os.fspath(p) for p in paths])
