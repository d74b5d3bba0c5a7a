"""Token ids of one record under one tokenizer: the encoding shared by the live pipeline and
`data prepare`, and the compact bytes it is stored as.

A record encodes to rows, one per sequence a model reads (pointwise / impressions / text: one;
listwise: one per candidate; chat: one). A row is `ids` int32 (unpadded, truncated to
max_len) and `aux` uint8 of the same length: token_type_ids for pairs; for chat, bit 0 is the
loss mask and bit 1 the answer mask (the `answer` span of an assistant message).
Stored rows decode with `np.frombuffer`, no JSON and no tokenizer on the read path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Bump when the text layout below changes: stored ids of an older layout are then not used.
ENCODING_VERSION = 3
PAIR_KINDS = ("pointwise", "impressions", "listwise", "text")

Row = tuple[np.ndarray, np.ndarray]


def query_member_separator(tokenizer) -> str:
    """What joins the query and the member text in a pair's first segment: the tokenizer's
    separator token where it has one (as BERT-style cross-encoders join a third text), else a
    new line. A model must see where the query ends: the policy grades some dimensions
    against the query and others against the member, and a WordPiece tokenizer drops a bare
    new line, which ran the two together."""
    sep = getattr(tokenizer, "sep_token", None)
    return f" {sep} " if sep else "\n"


def pair_segments(kind: str, record: Mapping[str, Any], limit: int | None = None, *,
                  separator: str = "\n") -> list[tuple[str, str | None]]:
    """(first, second) segment of each row. Pairs: the query plus (when non-empty)
    `separator` and the member text (`query_member_separator` of the tokenizer), then the
    document; text: `text`, then `text_pair` if any."""
    if kind == "text":
        return [(record["text"], record.get("text_pair"))]
    first = record["query"] + (separator + record["member"] if record["member"].strip() else "")
    candidates = record["candidates"][:limit] if kind == "listwise" else [record]
    return [(first, candidate["document"]) for candidate in candidates]


def encode_rows(kind: str, record: Mapping[str, Any], tokenizer, max_len: int, *,
                limit: int | None = None, where: str = "a record") -> list[Row]:
    """The rows of a validated record (listwise: its first `limit` candidates, all if None)."""
    if kind == "chat":
        return [_encode_chat(record["messages"], tokenizer, max_len, where)]
    segments = pair_segments(kind, record, limit, separator=query_member_separator(tokenizer))
    seconds = [second for _, second in segments]
    encodings = tokenizer(
        [first for first, _ in segments], None if None in seconds else seconds,
        truncation="longest_first", max_length=max_len, return_token_type_ids=False,
        return_attention_mask=False)
    rows = []
    for i, ids in enumerate(encodings["input_ids"]):
        sequence_ids = encodings.sequence_ids(i)
        # Segment B starts at its first token; specials after it (a closing [SEP]) belong to
        # B, as in BERT. Works for tokenizers with or without a pair template.
        start = next((t for t, s in enumerate(sequence_ids) if s == 1), len(ids))
        types = np.zeros(len(ids), np.uint8)
        types[start:] = 1
        rows.append((np.asarray(ids, np.int32), types))
    return rows


def _encode_chat(messages: Sequence[Mapping[str, str]], tokenizer, max_len: int,
                 where: str) -> Row:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    # Train on each assistant message from its content to the end of its rendered span (so
    # the end-of-message token is learned), not on the template's role header.
    trained_spans, answer_spans, span_start = [], [], 0
    for i, message in enumerate(messages):
        prefix = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(prefix):
            raise ValueError(
                f"{where}: the chat template of {tokenizer.name_or_path!r} does not render "
                "conversations prefix-consistently, so assistant tokens cannot be located")
        if message["role"] == "assistant":
            content_start = text.find(message["content"], span_start, len(prefix))
            trained_spans.append((max(content_start, span_start), len(prefix)))
            if message.get("answer"):
                answer_start = text.find(message["answer"], max(content_start, span_start),
                                         len(prefix))
                answer_spans.append((answer_start, answer_start + len(message["answer"])))
        span_start = len(prefix)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                         truncation=True, max_length=max_len)
    aux = [int(any(lo <= start < hi for lo, hi in trained_spans))
           | 2 * int(any(lo <= start < hi for lo, hi in answer_spans))
           for start, _ in encoding["offset_mapping"]]
    return np.asarray(encoding["input_ids"], np.int32), np.asarray(aux, np.uint8)


def pack_rows(rows: Sequence[Row]) -> bytes:
    """Rows -> bytes: int32 [R, len_1..len_R], int32 ids of every row, uint8 aux of every row."""
    header = np.asarray([len(rows), *(len(ids) for ids, _ in rows)], np.int32)
    ids = np.concatenate([ids for ids, _ in rows]) if rows else np.zeros(0, np.int32)
    aux = np.concatenate([aux for _, aux in rows]) if rows else np.zeros(0, np.uint8)
    return header.tobytes() + ids.astype(np.int32).tobytes() + aux.astype(np.uint8).tobytes()


def unpack_rows(blob: bytes, limit: int | None = None) -> list[Row]:
    """`pack_rows`' inverse (the first `limit` rows)."""
    count = int(np.frombuffer(blob, np.int32, 1)[0])
    lengths = np.frombuffer(blob, np.int32, count, offset=4)
    total = int(lengths.sum())
    ids = np.frombuffer(blob, np.int32, total, offset=4 * (1 + count))
    aux = np.frombuffer(blob, np.uint8, total, offset=4 * (1 + count + total))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    keep = count if limit is None else min(limit, count)
    return [(ids[bounds[i]:bounds[i + 1]], aux[bounds[i]:bounds[i + 1]]) for i in range(keep)]


def token_arrays(rows: Sequence[Row], pad_id: int, max_len: int,
                 list_size: int | None = None) -> dict[str, np.ndarray]:
    """input_ids (pad_id on padding), attention_mask, token_type_ids int32 [T], or [N, T] with
    `list_size` (rows cut or padded to N)."""
    n = 1 if list_size is None else list_size
    ids = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), np.int32)
    types = np.zeros((n, max_len), np.int32)
    for i, (row_ids, aux) in enumerate(rows[:n]):
        ids[i, : len(row_ids)] = row_ids
        mask[i, : len(row_ids)] = 1
        types[i, : len(row_ids)] = aux
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: v[0] for k, v in arrays.items()} if list_size is None else arrays
