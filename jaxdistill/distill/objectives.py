"""Multi-teacher objectives: which teacher output feeds which student head, by which loss, how much.

An objective is a list of named terms. A distillation term reads `teacher.output` (computed
online in the fused step, or precomputed and carried in the batch under
`batch["offline"][teacher][output]`) and the student's head output; a label term reads a batch
key instead of a teacher. Each term's value is reported under `loss/<name>`; the total is
`sum_k weight_k(step) * term_k`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from jaxdistill.distill import losses

Transform = Literal["log_odds", "yes_prob"]
LabelTransform = Literal["grades_to_yes_no", "grades_argmax_to_yes_no", "float"]


class WeightSchedule(BaseModel):
    """A loss weight over steps: constant, or linear/cosine from `start` to `end` in `steps`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["constant", "linear", "cosine"] = "constant"
    start: float = Field(default=1.0, ge=0)
    end: float = Field(default=1.0, ge=0)
    steps: int = Field(default=1, ge=1)

    def __call__(self, step: jax.Array) -> jax.Array:
        if self.kind == "constant":
            return jnp.asarray(self.start, jnp.float32)
        frac = jnp.clip(step.astype(jnp.float32) / self.steps, 0.0, 1.0)
        if self.kind == "cosine":
            frac = 0.5 * (1.0 - jnp.cos(math.pi * frac))
        return self.start + (self.end - self.start) * frac


class Term(BaseModel):
    """One loss term. Exactly one of `teacher` (distillation) or `label` (hard label) is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    loss: str
    student: str = Field(description="student head name (output key)")
    teacher: str | None = None
    teacher_output: str | None = Field(default=None, description="defaults to `student`")
    label: str | None = Field(default=None, description="batch key holding the hard label")
    mask: str | None = Field(default=None, description="batch key of a 0/1 mask")
    transform: Transform | None = Field(
        default=None, description="applied to both sides' [..., 2] (No, Yes) logits first"
    )
    label_transform: LabelTransform | None = Field(
        default=None, description="applied to a hard label before the loss (see label_view)"
    )
    weight: float | WeightSchedule = 1.0
    hparams: dict[str, Any] = Field(default_factory=dict)
    confidence_label: str | None = Field(
        default=None,
        description="weight each example by the teacher's probability of this batch label",
    )
    route: str | None = Field(
        default=None,
        description="token-level: batch key of a per-example teacher id [B]; the term covers "
        "only the examples whose id is `route_id` (per-example teacher routing)",
    )
    route_id: int | None = None
    teacher_mask: str | None = Field(
        default=None,
        description="cross-vocabulary losses: batch key of the teacher's own response mask",
    )
    given: dict[str, str] = Field(
        default_factory=dict,
        description="rare-action masking: {action: precondition}, e.g. {apply: click}: the "
        "action's column counts only where the precondition's label is 1 (an apply can only "
        "follow a click), so its head learns P(action | precondition)",
    )
    given_label: str = Field(default="actions", description="batch key of the [..., K] 0/1 "
                             "labels `given` reads (columns in data.action_names' order)")
    given_columns: tuple[tuple[int, int], ...] = Field(
        default=(), description="(column, precondition column) pairs; the config fills them "
        "from `given` and data.action_names")

    @model_validator(mode="after")
    def _check(self):
        if (self.teacher is None) == (self.label is None):
            raise ValueError(f"term {self.name!r}: set exactly one of 'teacher' or 'label'")
        if self.loss not in losses.LOSSES:
            raise ValueError(
                f"term {self.name!r}: unknown loss {self.loss!r}; known: {sorted(losses.LOSSES)}"
            )
        losses.check_hparams(self.loss, dict(self.hparams))
        if isinstance(self.weight, float | int) and self.weight < 0:
            raise ValueError(f"term {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.confidence_label is not None and self.teacher is None:
            raise ValueError(f"term {self.name!r}: confidence_label needs a teacher")
        if self.confidence_label is not None and not losses.LOSSES[self.loss].weights_rows:
            raise ValueError(f"term {self.name!r}: confidence_label weights rows; loss "
                             f"{self.loss!r} compares whole lists or sequences")
        loss = losses.LOSSES[self.loss]
        if loss.level == "token" and (self.teacher is None) != (loss.teacher is None):
            wanted, other = ("teacher", "label") if loss.teacher else ("label", "teacher")
            raise ValueError(f"term {self.name!r}: loss {self.loss!r} is token-level and "
                             f"reads a {wanted}; set {wanted!r}, not {other!r}")
        if (self.route is None) != (self.route_id is None):
            raise ValueError(f"term {self.name!r}: set both 'route' and 'route_id' or neither, "
                             f"got route={self.route!r}, route_id={self.route_id!r}")
        if self.route is not None and loss.level != "token":
            raise ValueError(f"term {self.name!r}: 'route' selects examples of a token-level "
                             f"loss; loss {self.loss!r} is {loss.level}-level (use 'mask')")
        if self.given and loss.level != "row":
            raise ValueError(f"term {self.name!r}: 'given' masks columns of per-entry losses; "
                             f"loss {self.loss!r} is {loss.level}-level")
        if self.teacher_mask is not None and not loss.cross_vocab:
            raise ValueError(f"term {self.name!r}: 'teacher_mask' is for cross-vocabulary "
                             f"losses; loss {self.loss!r} compares the same tokens")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_masking(self, handler):
        # A term without `given` dumps as it did before the option existed, so the pipeline's
        # stage keys (hashes of the dumped config) of existing configs do not change.
        data = handler(self)
        if not self.given and isinstance(data, dict):
            for key in ("given", "given_label", "given_columns"):
                data.pop(key, None)
        return data

    @property
    def source_output(self) -> str:
        return self.teacher_output or self.student

    def weight_at(self, step: jax.Array) -> jax.Array:
        if isinstance(self.weight, WeightSchedule):
            return self.weight(step)
        return jnp.asarray(self.weight, jnp.float32)


def apply_transform(x: jax.Array, transform: Transform | None) -> jax.Array:
    """(No, Yes) logits -> log-odds score or p(Yes)."""
    if transform is None:
        return x
    if x.shape[-1] != 2:
        raise ValueError(f"transform {transform!r} needs [..., 2] (No, Yes) logits, got {x.shape}")
    log_odds = x[..., 1].astype(jnp.float32) - x[..., 0].astype(jnp.float32)
    return log_odds if transform == "log_odds" else jax.nn.sigmoid(log_odds)


def label_view(label: jax.Array, transform: LabelTransform | None) -> jax.Array:
    """A label as a loss target.

    grades_to_yes_no: a distribution over policy grades [..., G] -> (No, Yes) log-probabilities
    [..., 2] with p(Yes) = expected grade / (G - 1), the target a two-token relevance head is
    trained on from the judge's soft labels. grades_argmax_to_yes_no: the same from the
    distribution's most likely grade only (one-hot: the ordinal hard label, ablating the soft
    one). float: integer grades as float scores (listwise).
    """
    if transform is None:
        return label
    if transform == "float":
        return label.astype(jnp.float32)
    grades = label.shape[-1]
    if transform == "grades_argmax_to_yes_no":
        label = jax.nn.one_hot(jnp.argmax(label, axis=-1), grades, dtype=jnp.float32)
    values = jnp.arange(grades, dtype=jnp.float32) / (grades - 1)
    p_yes = jnp.clip(jnp.sum(label.astype(jnp.float32) * values, axis=-1), 1e-6, 1 - 1e-6)
    return jnp.log(jnp.stack([1.0 - p_yes, p_yes], axis=-1))


def confidence_weights(teacher_logits: jax.Array, labels: jax.Array, mask: jax.Array | None):
    """Per-example weight = the teacher's probability of the observed label, mean 1 over the batch.

    Binary logits [..., K] with 0/1 labels: a per-entry weight; class logits [..., C] with integer
    labels: a per-row weight. Never differentiated.
    """
    logits = teacher_logits.astype(jnp.float32)
    if labels.shape == logits.shape:  # binary / multi-label
        p = jax.nn.sigmoid(logits)
        agreement = jnp.where(labels > 0.5, p, 1.0 - p)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
        agreement = jnp.take_along_axis(probs, labels[..., None].astype(jnp.int32), -1)[..., 0]
    valid = jnp.ones_like(agreement) if mask is None else jnp.broadcast_to(mask, agreement.shape)
    valid = valid.astype(jnp.float32)
    mean = jnp.sum(agreement * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return jax.lax.stop_gradient(agreement * valid / jnp.maximum(mean, 1e-6))


def given_mask(mask: jax.Array | None, labels_xK: jax.Array,
               given_columns: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> jax.Array:
    """A per-entry [..., K] mask where column c counts only where label column p is 1.

    `mask` may be per entry ([..., K]) or per row ([...], e.g. candidate_mask); None = all."""
    mask_xK = (jnp.ones(shape, jnp.float32) if mask is None
               else jnp.asarray(mask, jnp.float32))
    if mask_xK.shape != tuple(shape):
        mask_xK = jnp.broadcast_to(mask_xK[..., None], shape)
    keep_K = [jnp.ones(shape[:-1], jnp.float32)] * shape[-1]
    for column, precondition in given_columns:
        keep_K[column] = (jnp.asarray(labels_xK)[..., precondition] > 0.5).astype(jnp.float32)
    return mask_xK * jnp.stack(keep_K, axis=-1)


def _lookup(batch: Mapping[str, Any], key: str, term: str):
    if key not in batch:
        raise KeyError(f"term {term!r} reads batch key {key!r}, batch has {sorted(batch)}")
    return batch[key]


def teacher_output(teacher_outputs, batch, term: Term):
    """A term's teacher side: online outputs first, then the batch's offline cache."""
    if term.teacher in teacher_outputs:
        outputs = teacher_outputs[term.teacher]
    else:
        offline = batch.get("offline", {})
        if term.teacher not in offline:
            raise KeyError(
                f"term {term.name!r}: teacher {term.teacher!r} is neither online nor in "
                f"batch['offline'] (offline teachers: {sorted(offline)})"
            )
        outputs = offline[term.teacher]
    if term.source_output not in outputs:
        raise KeyError(
            f"term {term.name!r}: teacher {term.teacher!r} has no output {term.source_output!r} "
            f"(it has {sorted(outputs)})"
        )
    return outputs[term.source_output]


def _token_term(term: Term, loss: losses.Loss, student, target, mask, batch) -> jax.Array:
    """A token-level term: (hidden, unembedding) pairs, or a cached top-k teacher.

    Per-token teacher mixing is two terms whose masks differ: `mask` names different batch
    keys (e.g. `answer_mask` for an accuracy teacher, `loss_mask` for a tone teacher), or
    `route`/`route_id` keep the examples a per-example routing field sends to this teacher.
    """
    if not (isinstance(student, tuple) and len(student) == 2):
        raise ValueError(
            f"term {term.name!r}: loss {term.loss!r} is token-level and needs the student's "
            f"(hidden, unembedding) pair of an 'lm' head; head {term.student!r} gives "
            f"{type(student).__name__}")
    s_hidden_BxTxD, s_unembed_DxV = student
    if term.route is not None:
        route_B = jnp.asarray(_lookup(batch, term.route, term.name))
        if route_B.shape != s_hidden_BxTxD.shape[:1]:
            raise ValueError(f"term {term.name!r}: route {term.route!r} must be one teacher id "
                             f"per example {s_hidden_BxTxD.shape[:1]}, got {route_B.shape}")
        routed_BxT = jnp.broadcast_to((route_B == term.route_id)[:, None],
                                      s_hidden_BxTxD.shape[:2]).astype(jnp.float32)
        mask = routed_BxT if mask is None else jnp.asarray(mask, jnp.float32) * routed_BxT
    hparams = dict(term.hparams)
    if loss.teacher is None:  # a label loss over the batch's own tokens
        return loss(s_hidden_BxTxD, s_unembed_DxV, target, mask, **hparams)
    if term.teacher_mask is not None:
        hparams["teacher_mask_BxS"] = _lookup(batch, term.teacher_mask, term.name)
    if loss.teacher == "topk":
        if not isinstance(target, Mapping):
            raise ValueError(
                f"term {term.name!r}: loss {term.loss!r} reads a cached top-k teacher (a dict "
                f"{list(losses.TOPK_KEYS)}); teacher {term.teacher!r} gives "
                f"{type(target).__name__}")
        return loss(s_hidden_BxTxD, s_unembed_DxV, target, mask, **hparams)
    if not (isinstance(target, tuple) and len(target) == 2):
        raise ValueError(
            f"term {term.name!r}: loss {term.loss!r} needs the teacher's live (hidden, "
            f"unembedding) pair of an 'lm' head; teacher {term.teacher!r} gives "
            f"{type(target).__name__} (a cached top-k teacher takes 'sparse_token_kl')")
    t_hidden_BxTxE, t_unembed_ExV = target
    return loss(s_hidden_BxTxD, s_unembed_DxV, t_hidden_BxTxE, t_unembed_ExV, mask, **hparams)


def compute_objective(
    terms: tuple[Term, ...],
    student_outputs: Mapping[str, Any],
    teacher_outputs: Mapping[str, Mapping[str, Any]],
    batch: Mapping[str, Any],
    step: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted total loss and each term's (unweighted) value under `loss/<name>`."""
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for term in terms:
        if term.student not in student_outputs:
            raise KeyError(
                f"term {term.name!r}: student has no head {term.student!r} "
                f"(it has {sorted(student_outputs)})"
            )
        student = student_outputs[term.student]
        mask = None if term.mask is None else _lookup(batch, term.mask, term.name)
        if term.given_columns:
            mask = given_mask(mask, _lookup(batch, term.given_label, term.name),
                              term.given_columns, jnp.shape(student))
        if term.teacher is not None:
            target = jax.lax.stop_gradient(teacher_output(teacher_outputs, batch, term))
            if term.confidence_label is not None:
                labels = _lookup(batch, term.confidence_label, term.name)
                # The losses read a non-binary mask as per-row weights.
                mask = confidence_weights(target, labels, mask)
        else:
            target = label_view(_lookup(batch, term.label, term.name), term.label_transform)
        loss = losses.LOSSES[term.loss]
        if loss.level == "token":
            value = _token_term(term, loss, student, target, mask, batch)
        else:
            student = apply_transform(student, term.transform)
            if term.teacher is not None:
                target = apply_transform(target, term.transform)
            value = loss(student, target, mask, **term.hparams)
        metrics[f"loss/{term.name}"] = value
        total = total + term.weight_at(step) * value
    metrics["loss/total"] = total
    return total, metrics
