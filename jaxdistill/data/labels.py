"""Start-up checks that a dataset's labels fit the heads and objective terms that read them.

`check_labels` runs once before training, over the first `max_records` records of the split
(all of it when smaller), and raises `LabelError` naming the first offending record (split,
index, field) or the missing key / action name, instead of a run that trains a head on
nothing or on out-of-range class ids and exits 0.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jaxdistill.data.pipeline import batch_keys, label_types_of

MAX_SCANNED_RECORDS = 100_000


class LabelError(ValueError):
    """The data's labels do not fit a head or term; the message names record or key."""


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def label_fields(kind: str, record: Mapping[str, Any], key: str) -> Iterator[tuple[str, Any]]:
    """(field path, value) of each record value that batch key `key` carries as a class id."""
    if kind == "text" and key.startswith("label/"):
        name = key[len("label/"):]
        labels = record.get("labels", {})
        if name in labels:
            yield f"labels.{name}", labels[name]
    elif key == "grade" and kind == "pointwise":
        yield "grade", record["grade"]
    elif key == "grade" and kind == "listwise":
        for j, candidate in enumerate(record["candidates"]):
            yield f"candidates[{j}].grade", candidate["grade"]


def recorded_actions(kind: str, record: Mapping[str, Any]) -> set[str]:
    """The action names a record carries (impressions: its own; listwise: its candidates')."""
    if kind == "impressions":
        return set(record.get("actions", {}))
    if kind == "listwise":
        return {name for c in record["candidates"] for name in c.get("actions", {})}
    return set()


def action_order(heads: Mapping[str, Any], action_names: Sequence[str]) -> tuple[str, ...]:
    """The column order of the batch's `actions` [..., K]: the actions heads' names first (a
    head's logits and its labels line up column by column whatever order the data lists its
    actions in), then the data's other actions."""
    order: list[str] = []
    for head in heads.values():
        if getattr(head, "type", None) == "actions":
            order += [n for n in head.names if n in action_names and n not in order]
    return (*order, *(n for n in action_names if n not in order))


def action_columns(head_names: Sequence[str], action_names: Sequence[str]) -> list[int]:
    """Columns of a batch's `actions` [..., K] (in `action_names` order) in a head's order."""
    columns = list(action_names)
    return [columns.index(name) for name in head_names]


def check_labels(
    source: Sequence[Mapping[str, Any]],
    kind: str,
    terms: Sequence[Any],
    heads: Mapping[str, Any],
    action_names: Sequence[str] = (),
    *,
    max_records: int = MAX_SCANNED_RECORDS,
) -> None:
    """Raises `LabelError` unless the labels of `source` fit `terms` (objective Terms) and the
    student `heads` (models.heads configs) they train:

    - every term's `label`, `mask` and `confidence_label` is a batch key this data produces;
    - a label term whose loss compares class ids (`agreement == "label"`: cross_entropy) on a
      `classifier` head of C classes reads int labels in [0, C) in every scanned record;
    - a label term on an `actions` head: each of the head's names (any order) is in
      `action_names` (the batch's columns) and in some scanned record.

    Scans the first `max_records` records (say so in messages when the split is longer).
    """
    from jaxdistill.distill.losses import LOSSES  # jax; only needed when a term is checked

    name = getattr(source, "name", type(source).__name__)
    label_types = label_types_of(source) if kind == "text" else {}
    produced = batch_keys(kind, label_types=label_types)
    label_terms = [t for t in terms if t.label is not None]
    for term in terms:
        for role, key in (("label", term.label), ("mask", term.mask),
                          ("confidence_label", term.confidence_label)):
            if key is not None and key not in produced:
                raise LabelError(
                    f"objective term {term.name!r}: {role} {key!r} is not a batch key of the "
                    f"{kind} data at {name}; it produces {sorted(produced)}"
                    f"{_suggest(key, sorted(produced))}")
    class_checks = []  # (term, head name, classes)
    action_heads = {}  # head name -> (term, names)
    for term in label_terms:
        head = heads.get(term.student)
        head_type = getattr(head, "type", None)
        if (head_type == "classifier" and term.label_transform is None
                and LOSSES[term.loss].agreement == "label"):
            if kind == "text" and label_types.get(term.label[len("label/"):]) == "float":
                raise LabelError(
                    f"objective term {term.name!r}: {term.loss} reads {term.label!r} as class "
                    f"ids for classifier head {term.student!r}, but that label holds floats "
                    f"in {name}")
            class_checks.append((term, term.student, head.classes))
        elif head_type == "actions":
            action_heads[term.student] = (term, tuple(head.names))
    if not class_checks and not action_heads:
        return
    scanned = min(len(source), max_records)
    seen_actions: set[str] = set()
    for index in range(scanned):
        record = source[index]
        if not isinstance(record, Mapping):
            continue  # malformed records fail (or are skipped) in the pipeline
        for term, head, classes in class_checks:
            for field, value in label_fields(kind, record, term.label):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < classes:
                    raise LabelError(
                        f"{name}: record {index}: field '{field}': objective term "
                        f"{term.name!r} trains classifier head {head!r} ({classes} classes) "
                        f"with {term.loss}, so class ids must be ints in [0, {classes}); "
                        f"found {value!r}")
        if action_heads:
            seen_actions |= recorded_actions(kind, record)
    scan_note = ("" if scanned == len(source)
              else f" (the first {scanned} of {len(source)} records scanned)")
    for head, (term, names) in action_heads.items():
        columns = [n for n in names if n not in action_names]
        if columns:
            raise LabelError(
                f"objective term {term.name!r}: actions head {head!r} predicts {columns}, but "
                f"data.action_names is {sorted(action_names)}, so the batch has no column for "
                f"them{_suggest(columns[0], action_names)}")
        absent = [n for n in names if n not in seen_actions]
        if absent:
            raise LabelError(
                f"objective term {term.name!r}: actions head {head!r} predicts {absent}, but no "
                f"record of {name} carries {'it' if len(absent) == 1 else 'them'}{scan_note}; the "
                f"data's actions are {sorted(seen_actions)}"
                f"{_suggest(absent[0], sorted(seen_actions))}")
