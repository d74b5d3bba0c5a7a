"""One evaluator: every forward of a model over a split runs here (big_vision's `predict_fns`).

An `Evaluator` holds a student, its online teachers and the objective's terms. `run` feeds it
batches: one jitted program per batch shape, compiled from the models' declared shardings, runs
each model's forward under `jax.named_call(name)` (a profile shows what each teacher costs),
the objective's terms and each term's agreement, and brings back to the host the heads' outputs
(never an `lm` head's [T, V]), the batch's labels and masks, and the terms' means.

The training loop's eval cadence, `jaxdistill eval`, `predict`, `cache-teacher` and the
pipeline's scoring all call it, so every number they print comes from the same forward.
A short last batch is padded to the first batch's size and trimmed back: outputs cover every
record; objective terms average over full batches only (a padded row would enter an unmasked
mean). `head_metrics` turns the outputs into metrics by head type.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill import evaluate, parallel
from jaxdistill.distill.losses import LOSSES
from jaxdistill.distill.objectives import Term, apply_transform, compute_objective, teacher_output
from jaxdistill.distill.step import model_batch
from jaxdistill.models.heads import ActionHead, ClassifierHead, LMHead, TokenScoreHead
from jaxdistill.models.model import Functional, ModelConfig, Params

log = logging.getLogger(__name__)

TOKEN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "segment_ids",
                          "positions"})
HOST_ONLY = frozenset({"batch_malformed"})
_VALID = "_row_valid"


class EmptySplitError(ValueError):
    """Nothing to evaluate: the split has no records (or max_batches is 0)."""


@dataclasses.dataclass
class Scores:
    """What `Evaluator.run` brings back, every array with one row per record scored."""

    student: dict[str, np.ndarray]  # head -> [rows, ...]
    teachers: dict[str, dict[str, np.ndarray]]  # online teacher -> head -> [rows, ...]
    fields: dict[str, np.ndarray]  # batch labels/masks/positions; offline/<teacher>/<output>
    terms: dict[str, float]  # mean over full batches of loss/..., agreement/..., teacher/...
    batches: int
    rows: int

    def teacher_output(self, term: Term) -> np.ndarray | None:
        """A term's teacher side (online or offline), as the objective reads it."""
        if term.teacher in self.teachers:
            return self.teachers[term.teacher].get(term.source_output)
        return self.fields.get(f"offline/{term.teacher}/{term.source_output}")


class Evaluator:
    """Forwards of a student and its teachers over batches; see the module docstring."""

    def __init__(self, student: Functional | None, teachers: Mapping[str, Functional] | None = None,
                 *, mesh, rules, terms: Sequence[Term] = (),
                 token_keys: Mapping[str, str] | None = None,
                 teacher_outputs: Mapping[str, Sequence[str]] | None = None,
                 reduce_outputs: Mapping[str, Mapping[str, Any]] | None = None):
        """`reduce_outputs` {teacher: {head: fn(output, batch)}}: what of a teacher's head
        comes back, computed inside the jitted program (an lm head's (hidden, unembedding)
        pair as its per-token top-k: `cache-teacher --top-k`); fn returns an array or a dict
        of arrays, one row per example, listed as `head/key`."""
        self.student = student
        self.teachers = dict(teachers or {})
        self.terms = tuple(terms)
        self.mesh, self.rules = mesh, rules
        self.token_keys = dict(token_keys or {})
        self.reduce_outputs = {t: dict(fns) for t, fns in (reduce_outputs or {}).items()}
        self._compiled: dict[Any, Any] = {}
        # Teachers' outputs that come back to the host: those a term compares with, unless
        # `teacher_outputs` names them.
        self._teacher_heads = collections.defaultdict(set)
        for term in self.terms:
            if term.teacher in self.teachers:
                self._teacher_heads[term.teacher].add(term.source_output)
        for name, heads in (teacher_outputs or {}).items():
            self._teacher_heads[name] = set(heads)

    def predict_fns(self) -> dict[str, Any]:
        """{model name: forward(params, batch)}, each under `jax.named_call(name)`."""
        fns = {name: jax.named_call(self._forward(model, self.token_keys.get(name)), name=name)
               for name, model in self.teachers.items()}
        if self.student is not None:
            fns["student"] = jax.named_call(self._forward(self.student, None), name="student")
        return fns

    @staticmethod
    def _forward(model: Functional, tokens_key: str | None):
        return lambda params, batch: model.apply(params, model_batch(batch, tokens_key))

    def _batch_fn(self, params, teacher_params, batch, step):
        fns = self.predict_fns()
        with parallel.activation_rules(self.mesh, self.rules):
            teacher_out = {name: fns[name](teacher_params[name], batch) for name in self.teachers}
            student_out = fns["student"](params, batch) if self.student is not None else {}
            metrics = {}
            if self.terms:
                _, metrics = compute_objective(self.terms, student_out, teacher_out, batch, step)
                metrics.update(term_metrics(self.terms, metrics, student_out, teacher_out, batch))
        fields = {k: v for k, v in batch.items() if k not in TOKEN_INPUTS and k != "tokens"}
        if "offline" in fields:  # a cached top-k teacher ([B, T, k] dicts) is not per-row
            fields["offline"] = {
                t: {o: v for o, v in outputs.items() if not isinstance(v, Mapping)}
                for t, outputs in fields["offline"].items()}
        teacher_back = {}
        for t, heads in self._teacher_heads.items():
            reduce = self.reduce_outputs.get(t, {})
            back = {h: reduce[h](teacher_out[t][h], batch) if h in reduce else teacher_out[t][h]
                    for h in sorted(heads)}
            # An lm head's (hidden, unembedding) pair is not per-row: it stays on the device.
            teacher_back[t] = {h: v for h, v in back.items() if not isinstance(v, tuple)}
        return ({k: v for k, v in student_out.items() if not isinstance(v, tuple)},
                teacher_back, fields, metrics)

    def _compile(self, params, teacher_params, batch):
        key = jax.tree.structure(batch), tuple(np.shape(x) for x in jax.tree.leaves(batch))
        if key not in self._compiled:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            student_sh = (None if self.student is None else
                          self.student.shardings(self.mesh, self.rules))
            teacher_sh = {n: m.shardings(self.mesh, self.rules) for n, m in self.teachers.items()}
            batch_sh = jax.tree.map(
                lambda x: parallel.batch_sharding(self.mesh, self.rules, np.ndim(x)), batch)
            self._compiled[key] = jax.jit(
                self._batch_fn, in_shardings=(student_sh, teacher_sh, batch_sh, replicated))
        return self._compiled[key]

    def run(self, params: Params | None, teacher_params: Mapping[str, Params] | None,
            batches: Iterable[Mapping[str, Any]], *, max_batches: int | None = None,
            step: int | jax.Array = 0) -> Scores:
        """Scores up to `max_batches` batches (all by default); see `Scores`."""
        teacher_params = dict(teacher_params or {})
        step = jnp.asarray(step, jnp.int32)
        parts: dict[str, list] = collections.defaultdict(list)
        sums: dict[str, float] = collections.defaultdict(float)
        full_batches = batches_seen = 0
        size = first_rows = None
        pending = None
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v for k, v in batch.items() if k not in HOST_ONLY}
            rows = len(batch["input_ids"])
            if size is None:  # every batch is padded to the first's size, divisible over devices
                multiple = parallel.batch_multiple(self.mesh, self.rules)
                first_rows, size = rows, -(-rows // multiple) * multiple
            batch[_VALID] = np.ones(rows, np.float32)
            batch = jax.tree.map(lambda x: _pad_rows(np.asarray(x), size), batch)
            device_batch = parallel.shard_batch(batch, self.mesh, self.rules)
            fn = self._compile(params, teacher_params, batch)
            result = fn(params, teacher_params, device_batch, step)
            # The previous batch comes to the host while this one runs.
            if pending is not None:
                full_batches += _collect(pending, parts, sums)
            pending = (result, rows == first_rows)
            batches_seen += 1
        if pending is not None:
            full_batches += _collect(pending, parts, sums)
        if not batches_seen:
            raise EmptySplitError("no batch to evaluate: the split is empty (or max_batches is 0)")
        joined = {key: np.concatenate(values) for key, values in parts.items()}
        valid = joined.pop(f"fields/{_VALID}") > 0
        joined = {key: value[valid] for key, value in joined.items()}
        student = {k.split("/", 1)[1]: v for k, v in joined.items() if k.startswith("student/")}
        teachers: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
        for key, value in joined.items():
            if key.startswith("teacher/"):
                _, name, head = key.split("/", 2)
                teachers[name][head] = value
        fields = {k.split("/", 1)[1]: v for k, v in joined.items() if k.startswith("fields/")}
        terms = {k: v / full_batches for k, v in sums.items()} if full_batches else {}
        if self.terms and not full_batches:
            log.warning("no full batch: objective terms are not reported")
        return Scores(student, dict(teachers), fields, terms, batches_seen, int(valid.sum()))


def _collect(pending, parts, sums) -> int:
    (student, teachers, fields, metrics), full = pending
    host = jax.tree.map(_to_host, (student, teachers, fields, metrics))
    student, teachers, fields, metrics = host
    for head, value in student.items():
        parts[f"student/{head}"].append(value)
    for name, heads in teachers.items():
        for head, value in _flatten(heads).items():
            parts[f"teacher/{name}/{head}"].append(value)
    for key, value in _flatten(fields).items():
        parts[f"fields/{key}"].append(value)
    if full:
        for key, value in metrics.items():
            sums[key] += float(value)
    return int(full)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if x.ndim == 0 or len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


# ----------------------------------------------------------------------- term metrics


def term_agreement(term: Term, student_outputs, teacher_outputs, batch):
    """How often the student decides as the teacher (or the label) does, for this term's output.

    By the loss's registered agreement: "top1" same top candidate; "threshold" same side of the
    decision threshold (0 for logits and log-odds, 0.5 for probabilities and labels); "label"
    argmax equals the label; "argmax" same argmax. None for losses without a decision
    (hidden states, tokens).
    """
    kind = LOSSES[term.loss].agreement
    student = student_outputs.get(term.student)
    if student is None or isinstance(student, tuple) or kind is None:
        return None
    distilled = term.teacher is not None
    target = teacher_output(teacher_outputs, batch, term) if distilled else batch[term.label]
    student = apply_transform(student, term.transform).astype(jnp.float32)
    target = jnp.asarray(apply_transform(target, term.transform) if distilled else target)
    mask = None if term.mask is None else batch[term.mask].astype(jnp.float32)
    if kind == "label":
        agree = jnp.argmax(student, -1) == target.astype(jnp.int32)
    elif kind == "top1":
        target = target.astype(jnp.float32)
        if mask is not None and mask.shape == student.shape:
            student = jnp.where(mask > 0, student, -jnp.inf)
            target = jnp.where(mask > 0, target, -jnp.inf)
            mask = jnp.any(mask > 0, -1).astype(jnp.float32)
        agree = jnp.argmax(student, -1) == jnp.argmax(target, -1)
    elif kind == "threshold" or term.transform is not None:
        probabilities = term.transform == "yes_prob"
        student_threshold = 0.5 if probabilities else 0.0
        target_threshold = student_threshold if distilled and term.loss != "bce" else 0.5
        agree = (student > student_threshold) == (target > target_threshold)
    else:
        agree = jnp.argmax(student, -1) == jnp.argmax(target, -1)
    agree = agree.astype(jnp.float32)
    if mask is not None and mask.shape == agree.shape:
        return jnp.sum(agree * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.mean(agree)


def term_metrics(terms: Sequence[Term], losses: Mapping[str, jax.Array], student_outputs,
                 teacher_outputs, batch) -> dict:
    """agreement/<term> for terms with a decision; teacher/<name> = the sum of its terms'
    `losses` (the `loss/<term>` values of `compute_objective`)."""
    metrics = {}
    by_teacher: dict[str, list] = collections.defaultdict(list)
    for term in terms:
        agreement = term_agreement(term, student_outputs, teacher_outputs, batch)
        if agreement is not None:
            metrics[f"agreement/{term.name}"] = agreement
        if term.teacher is not None:
            by_teacher[term.teacher].append(losses[f"loss/{term.name}"])
    return metrics | {f"teacher/{t}": sum(v) for t, v in by_teacher.items()}


# ------------------------------------------------------------------------ head metrics


def p_yes(logits_x2: np.ndarray) -> np.ndarray:
    """p("Yes") of (No, Yes) logits."""
    return 1.0 / (1.0 + np.exp(-(logits_x2[..., 1] - logits_x2[..., 0])))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def head_label(head: str, terms: Sequence[Term], fields: Mapping[str, np.ndarray]) -> str | None:
    """The batch key holding a head's hard labels: a label term's, else `label/<head>`."""
    for term in terms:
        if term.student == head and term.label is not None and term.label in fields:
            return term.label
    return f"label/{head}" if f"label/{head}" in fields else None


def head_mask(head: str, label: str | None, terms: Sequence[Term],
              fields: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Which rows count for a head: the label's own mask, a term's mask, or all rows."""
    if label is not None and label.startswith("label/"):
        mask = fields.get("label_mask/" + label.removeprefix("label/"))
        if mask is not None:
            return mask > 0
    for term in terms:
        if term.student == head and term.mask is not None and term.mask in fields:
            return fields[term.mask] > 0
    return None


def head_metrics(model_cfg: ModelConfig, scores: Scores, terms: Sequence[Term] = (), *,
                 action_names: Sequence[str] = (), k: int = 10, poor_grade: int = 1
                 ) -> dict[str, Any]:
    """Metrics of each student head by its type, `<head>/<metric>`, plus teacher agreement.

    classifier: accuracy, macro-F1, log loss, AUROC (binary, or one-vs-rest per class), ECE,
    confusion matrix (against the head's labels); actions: AUROC, average precision and ECE per
    action (labels matched by action name); a (No, Yes) token score over candidate lists:
    NDCG@k and poor-match@k; every distilled head: agreement with its teacher (argmax agreement
    and KL for classes; Spearman and top-k overlap for scores).
    """
    fields = scores.fields
    out: dict[str, Any] = {}
    listwise = "candidate_mask" in fields
    for head, head_cfg in model_cfg.heads.items():
        if isinstance(head_cfg, LMHead) or head not in scores.student:
            continue
        value = scores.student[head]
        if isinstance(head_cfg, ClassifierHead):
            label = head_label(head, terms, fields)
            if label is not None:
                mask = head_mask(head, label, terms, fields)
                metrics = evaluate.classification_metrics(_softmax(value), fields[label], mask)
                out.update({f"{head}/{name}": v for name, v in metrics.items()})
        elif isinstance(head_cfg, ActionHead) and "actions" in fields:
            data_names = list(action_names)
            base = fields.get("candidate_mask")
            for i, action in enumerate(head_cfg.names):
                if action not in data_names:
                    continue
                j = data_names.index(action)
                mask = fields["action_mask"][..., j] > 0
                if base is not None:
                    mask &= base > 0
                metrics = evaluate.binary_metrics(_sigmoid(value[..., i]),
                                                  fields["actions"][..., j], mask)
                out.update({f"{head}/{name}_{action}": v for name, v in metrics.items()})
        elif (isinstance(head_cfg, TokenScoreHead) and len(head_cfg.token_ids) == 2
              and listwise and "grade" in fields):
            mask = fields["candidate_mask"] > 0
            out[f"{head}/ndcg_at_{k}"] = evaluate.ndcg_at_k(p_yes(value), fields["grade"], mask, k)
            out[f"{head}/poor_match_rate_at_{k}"] = evaluate.poor_match_rate_at_k(
                p_yes(value), fields["grade"], mask, k, poor_grade)
    out.update(_teacher_agreement(model_cfg, scores, terms, k))
    return out


def _teacher_agreement(model_cfg: ModelConfig, scores: Scores, terms: Sequence[Term],
                       k: int) -> dict[str, float]:
    out = {}
    candidates = scores.fields.get("candidate_mask")
    for term in terms:
        head_cfg = model_cfg.heads.get(term.student)
        if term.teacher is None or term.student not in scores.student:
            continue
        teacher, student = scores.teacher_output(term), scores.student[term.student]
        if teacher is None or teacher.shape != student.shape:
            continue
        prefix = f"agreement/{term.name}"
        if isinstance(head_cfg, ClassifierHead):
            mask = scores.fields.get(term.mask) if term.mask else None
            out.update({f"{prefix}/{n}": v for n, v in evaluate.class_agreement(
                teacher, student, None if mask is None else mask > 0).items()})
            continue
        if isinstance(head_cfg, TokenScoreHead) and len(head_cfg.token_ids) == 2:
            pairs = {"": (p_yes(teacher), p_yes(student))}
        elif isinstance(head_cfg, ActionHead):
            pairs = {f"_{a}": (_sigmoid(teacher[..., i]), _sigmoid(student[..., i]))
                     for i, a in enumerate(head_cfg.names)}
        else:
            continue
        for suffix, (t_scores, s_scores) in pairs.items():
            if t_scores.ndim == 2 and candidates is not None:  # [Q, N] candidate lists
                metrics = evaluate.agreement(t_scores, s_scores, candidates > 0, k)
                out[f"{prefix}/overlap_at_{k}{suffix}"] = metrics["overlap_at_k"]
            else:  # one pooled list of every row
                metrics = evaluate.agreement(t_scores.reshape(1, -1), s_scores.reshape(1, -1))
            out[f"{prefix}/spearman{suffix}"] = metrics["spearman"]
    return out
