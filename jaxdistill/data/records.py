"""Record schemas: one small typed spec per kind, validation with precise errors, docs.

A record is a plain JSON-like dict (str, int, float, list, dict). Five kinds:

- ``pointwise``: one (query, member, document) pair with a 0-4 policy grade.
- ``listwise``: one query with N graded candidates.
- ``impressions``: one shown document with its position and the member's actions.
- ``chat``: a conversation, a list of role/content messages.
- ``text``: a text (or text pair) with any number of named labels (class ids, 0/1 flags,
  floats), so one dataset feeds several heads.

``validate_record`` is the single edge check used by ``prepare`` (JSONL/Parquet import),
``write_dataset`` (built-in workloads) and the pipeline (records read back from disk), so a
bad record always fails with the same message: source, record index, field, expected, found.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

KINDS = ("pointwise", "listwise", "impressions", "chat", "text")
NUM_GRADES = 5  # policy rubric grades 0..4
CHAT_ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A record does not match its schema; the message names source, index and field."""

    def __init__(self, source: str, index: int, field: str, expected: str, found: Any):
        self.source, self.index, self.field = source, index, field
        found_text = repr(found)
        if len(found_text) > 80:
            found_text = found_text[:77] + "..."
        super().__init__(
                f"{source}: record {index}: field '{field}': expected {expected}, found {found_text}"
        )


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a schema, as documented in ``schema_markdown``."""

    name: str
    type: str
    required: bool
    description: str


_MEMBER_FIELDS = (
        Field("member", "str", True, "rendered member profile text; may be empty"),
        Field("member_features", "list[float]", True, "dense member features; may be empty"),
)

_OFFLINE_FIELD = Field(
        "offline", "dict[str, dict[str, array]]", False,
        "cached teacher outputs, teacher -> output -> (nested) list of floats; written by "
        "`jaxdistill cache-teacher`")

SCHEMAS: dict[str, tuple[Field, ...]] = {
        "pointwise": (
                Field("query", "str", True, "the search query; non-empty"),
                Field("document", "str", True, "the document text; non-empty"),
                *_MEMBER_FIELDS,
                Field("grade", "int", True, "policy grade 0..4"),
                Field("grade_probs", "list[float] (5)", False, "judge's soft label over grades 0..4, sums to 1"),
                _OFFLINE_FIELD,
        ),
        "listwise": (
                Field("query", "str", True, "the search query; non-empty"),
                *_MEMBER_FIELDS,
                Field("candidates", "list[candidate]", True, "at least one candidate, see below"),
                Field("candidates[].document", "str", True, "candidate document text; non-empty"),
                Field("candidates[].grade", "int", True, "policy grade 0..4"),
                Field("candidates[].grade_probs", "list[float] (5)", False, "soft label over grades, sums to 1"),
                Field("candidates[].position", "int", False, "position shown (0-based), >= 0"),
                Field("candidates[].actions", "dict[str, int]", False, "action name -> 0/1"),
                dataclasses.replace(_OFFLINE_FIELD, name="candidates[].offline"),
        ),
        "impressions": (
                Field("query", "str", True, "the search query; non-empty"),
                *_MEMBER_FIELDS,
                Field("document", "str", True, "the document shown; non-empty"),
                Field("position", "int", True, "position shown (0-based), >= 0"),
                Field("actions", "dict[str, int]", True, "action name -> 0/1 (e.g. click, apply, dismiss)"),
                _OFFLINE_FIELD,
        ),
        "chat": (
                Field("messages", "list[message]", True, "at least one message"),
                Field("messages[].role", "str", True, f"one of {', '.join(CHAT_ROLES)}"),
                Field("messages[].content", "str", True, "message text; non-empty"),
                Field("messages[].answer", "str", False, "assistant messages: the substring of "
                      "`content` that states the answer (the batch's `answer_mask`)"),
        ),
        "text": (
                Field("id", "str or int", False, "the caller's id of the record (the batch's "
                      "`record_index` maps predictions back to records)"),
                Field("text", "str", True, "the text; non-empty"),
                Field("text_pair", "str", False, "a second segment (token_type_ids 1); non-empty"),
                Field("labels", "dict[str, int or float]", False,
                      "label name -> class id (int), 0/1 flag or float; a record may lack "
                      "any label (its `label_mask/<name>` is 0). Batches carry `label/<name>`: "
                      "int32 if every value of that label is an int, else float32"),
                _OFFLINE_FIELD,
        ),
}


class _Checker:
    """Field checks bound to one record's source and index, so every error names both."""

    def __init__(self, source: str, index: int):
        self.source, self.index = source, index

    def fail(self, field: str, expected: str, found: Any) -> None:
        raise RecordError(self.source, self.index, field, expected, found)

    def get(self, record: Mapping, key: str, path: str, required: bool = True) -> Any:
        if key not in record:
            if required:
                self.fail(path, "a value (field is required)", "missing")
            return None
        return record[key]

    def text(self, record: Mapping, key: str, path: str, allow_empty: bool = False) -> None:
        value = self.get(record, key, path)
        if not isinstance(value, str):
            self.fail(path, "str", f"{type(value).__name__} {value!r}")
        if not allow_empty and not value.strip():
            self.fail(path, "non-empty text", value)

    def integer(self, value: Any, path: str, low: int, high: int | None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, "int", f"{type(value).__name__} {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"int in {low}..{high}" if high is not None else f"int >= {low}"
            self.fail(path, bound, value)

    def floats(self, value: Any, path: str, length: int | None = None) -> None:
        if not isinstance(value, list):
            self.fail(path, "list[float]", f"{type(value).__name__} {value!r}")
        for i, x in enumerate(value):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                self.fail(f"{path}[{i}]", "finite float", x)
        if length is not None and len(value) != length:
            self.fail(path, f"{length} floats", f"{len(value)} floats")

    def grade_probs(self, value: Any, path: str) -> None:
        self.floats(value, path, NUM_GRADES)
        if min(value) < 0 or abs(sum(value) - 1.0) > 1e-3:
            self.fail(path, "non-negative probabilities summing to 1", value)

    def actions(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            self.fail(path, "dict[str, int]", f"{type(value).__name__} {value!r}")
        for name, flag in value.items():
            if not isinstance(name, str) or not name:
                self.fail(path, "non-empty str action names", name)
            self.integer(flag, f"{path}.{name}", 0, 1)

    def offline(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            self.fail(path, "dict teacher -> {output: list of floats}", value)
        for teacher, outputs in value.items():
            if not isinstance(outputs, dict) or not outputs:
                self.fail(f"{path}.{teacher}", "non-empty dict output -> list of floats", outputs)
            for name, array in outputs.items():
                self.array(array, f"{path}.{teacher}.{name}")

    def array(self, value: Any, path: str) -> tuple[int, ...]:
        """A rectangular nested list of finite floats; returns its shape."""
        if not isinstance(value, list):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self.fail(path, "finite float or list", value)
            return ()
        shapes = {self.array(x, f"{path}[{i}]") for i, x in enumerate(value)}
        if len(shapes) > 1:
            self.fail(path, "a rectangular array (equal-length rows)", value)
        return (len(value), *(shapes.pop() if shapes else ()))

    def member(self, record: Mapping) -> None:
        self.text(record, "member", "member", allow_empty=True)
        self.floats(self.get(record, "member_features", "member_features"), "member_features")


def validate_record(kind: str, record: Any, *, source: str, index: int) -> None:
    """Raises ``RecordError`` unless ``record`` matches the schema of ``kind``."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    check = _Checker(source, index)
    if not isinstance(record, dict):
        check.fail("<record>", "a JSON object", record)
    if kind == "chat":
        messages = check.get(record, "messages", "messages")
        if not isinstance(messages, list) or not messages:
            check.fail("messages", "non-empty list of messages", messages)
        for i, message in enumerate(messages):
            path = f"messages[{i}]"
            if not isinstance(message, dict):
                check.fail(path, "an object with role and content", message)
            check.text(message, "role", f"{path}.role")
            if message["role"] not in CHAT_ROLES:
                check.fail(f"{path}.role", f"one of {', '.join(CHAT_ROLES)}", message["role"])
            check.text(message, "content", f"{path}.content")
            if "answer" in message:
                check.text(message, "answer", f"{path}.answer")
                if message["role"] != "assistant" or message["answer"] not in message["content"]:
                    check.fail(f"{path}.answer", "a substring of an assistant message's content",
                               message["answer"])
        return
    if kind == "text":
        if "id" in record and (isinstance(record["id"], bool)
                               or not isinstance(record["id"], (str, int))):
            check.fail("id", "str or int", record["id"])
        check.text(record, "text", "text")
        if "text_pair" in record:
            check.text(record, "text_pair", "text_pair")
        labels = record.get("labels", {})
        if not isinstance(labels, dict):
            check.fail("labels", "dict label name -> int or float", labels)
        for name, value in labels.items():
            if not isinstance(name, str) or not name or "/" in name:
                check.fail("labels", "non-empty label names without '/'", name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not math.isfinite(value)):
                check.fail(f"labels.{name}", "int or finite float (0/1 for flags)", value)
        if "offline" in record:
            check.offline(record["offline"], "offline")
        return
    check.text(record, "query", "query")
    check.member(record)
    if "offline" in record and kind != "listwise":
        check.offline(record["offline"], "offline")
    if kind == "pointwise":
        check.text(record, "document", "document")
        check.integer(check.get(record, "grade", "grade"), "grade", 0, NUM_GRADES - 1)
        if "grade_probs" in record:
            check.grade_probs(record["grade_probs"], "grade_probs")
    elif kind == "impressions":
        check.text(record, "document", "document")
        check.integer(check.get(record, "position", "position"), "position", 0, None)
        check.actions(check.get(record, "actions", "actions"), "actions")
    else:  # listwise
        candidates = check.get(record, "candidates", "candidates")
        if not isinstance(candidates, list) or not candidates:
            check.fail("candidates", "non-empty list of candidates", candidates)
        for i, candidate in enumerate(candidates):
            path = f"candidates[{i}]"
            if not isinstance(candidate, dict):
                check.fail(path, "an object with document and grade", candidate)
            check.text(candidate, "document", f"{path}.document")
            check.integer(check.get(candidate, "grade", f"{path}.grade"), f"{path}.grade", 0, NUM_GRADES - 1)
            if "grade_probs" in candidate:
                check.grade_probs(candidate["grade_probs"], f"{path}.grade_probs")
            if "position" in candidate:
                check.integer(candidate["position"], f"{path}.position", 0, None)
            if "actions" in candidate:
                check.actions(candidate["actions"], f"{path}.actions")
            if "offline" in candidate:
                check.offline(candidate["offline"], f"{path}.offline")


def update_label_types(label_types: dict[str, str], labels: Mapping[str, Any]) -> None:
    """Folds one text record's labels into {name: "int" | "float"} (a float anywhere wins)."""
    for name, value in labels.items():
        kind = "float" if isinstance(value, float) else "int"
        if label_types.get(name) != "float":
            label_types[name] = kind


def schema_markdown() -> str:
    """The record schemas as README-ready markdown (one table per kind)."""
    parts = [
        "## Record schemas",
        "",
        "One JSON object per record (a JSONL line, a Parquet row or a CSV row: one column "
        "per field, dotted names such as `labels.spam` nest, text cells verbatim, other cells "
        "read as JSON, an empty non-text cell leaves the field out). Unknown keys are kept "
        "but ignored. A record that breaks its schema fails naming the file, the record "
        "index, the field, what was expected and what was found (or is skipped and counted "
        "when `skip_malformed` is on).",
        "",
        "Write them with `jaxdistill data prepare`: `--split NAME=FILE` once per split, or one "
        "file cut by `--split-fractions 0.8,0.1,0.1 --seed S` into train, validation and test. "
        "Splits already in `--out` are kept; `--overwrite` rewrites the ones named. "
        "`--tokenizer DIR|builtin:NAME` (repeatable) with `--max-len N` stores each record's "
        "token ids, which training with that tokenizer and `data.max_len` reads instead of "
        "tokenising again.",
        "",
    ]
    for kind, fields in SCHEMAS.items():
        parts += [f"### `{kind}`", "", "| field | type | required | meaning |", "|---|---|---|---|"]
        parts += [
            f"| `{f.name}` | {f.type} | {'yes' if f.required else 'no'} | {f.description} |"
            for f in fields
        ]
        parts.append("")
    return "\n".join(parts)
