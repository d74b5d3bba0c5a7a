"""Evaluation metrics over scored candidate lists: NDCG, poor-match rate, AUROC, kappa, agreement.

Longer than ~400 lines because it holds every metric, in one pure-numpy module.

Pure numpy over arrays the pipeline hands over; no model code. Lists are [Q, N] arrays
(Q queries, N candidate slots) with `mask_QxN` true for real candidates and false for padding.
Within a list, equal scores keep candidate order (stable sort), so ties are broken by the
order the caller passes candidates in.

Throughput is measured around a plain callable; the caller makes it synchronous (for JAX,
`jax.block_until_ready` inside `score_fn`), so this module does not import jax.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxdistill.judge import DIMENSIONS, N_GRADES, weighted_kappa


class UndefinedMetricWarning(UserWarning):
    """A metric is NaN because it is undefined on the data (e.g. AUROC with one class)."""


def _lists(scores: Any, grades: Any, mask: Any, names: tuple[str, str] = ("scores", "grades"),
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    score_QxN = np.asarray(scores, dtype=np.float64)
    grade_QxN = np.asarray(grades, dtype=np.float64)
    if score_QxN.ndim != 2 or grade_QxN.shape != score_QxN.shape:
        raise ValueError(f"expected {names[0]} and {names[1]} of one [Q, N] shape; "
                         f"found {score_QxN.shape} and {grade_QxN.shape}")
    mask_QxN = (np.ones(score_QxN.shape, bool) if mask is None
                else np.asarray(mask, dtype=bool))
    if mask_QxN.shape != score_QxN.shape:
        raise ValueError(f"mask has shape {mask_QxN.shape}; scores have {score_QxN.shape}")
    bad = mask_QxN & ~(np.isfinite(score_QxN) & np.isfinite(grade_QxN))
    if bad.any():
        q, n = np.argwhere(bad)[0]
        raise ValueError(f"{int(bad.sum())} valid candidates have non-finite {names[0]} or {names[1]}, "
                         f"first at query {q}, slot {n}")
    return score_QxN, grade_QxN, mask_QxN


def _ranked(score_QxN: np.ndarray, mask_QxN: np.ndarray) -> np.ndarray:
    """Per query, slot indices by descending score, valid candidates first (stable)."""
    key_QxN = np.where(mask_QxN, -score_QxN, np.inf)
    return np.argsort(key_QxN, axis=1, kind="stable")


def ndcg_per_query(scores_QxN: Any, grades_QxN: Any, mask_QxN: Any = None,
                   k: int = 10) -> np.ndarray:
    """NDCG@k of each query; NaN where the ideal DCG is zero (no candidate with grade > 0).

    gain = 2^grade − 1, discount = 1 / log2(rank + 1) with ranks from 1; the ideal DCG
    ranks the query's valid candidates by grade. Padded candidates are neither ranked nor
    counted in the ideal.
    """
    score_QxN, grade_QxN, mask_QxN = _lists(scores_QxN, grades_QxN, mask_QxN)
    if k < 1:
        raise ValueError(f"k must be >= 1; found {k}")
    gain_QxN = np.where(mask_QxN, 2.0 ** grade_QxN - 1.0, 0.0)
    top = min(k, score_QxN.shape[1])
    discount_K = 1.0 / np.log2(np.arange(2, top + 2))
    ranked_QxK = np.take_along_axis(gain_QxN, _ranked(score_QxN, mask_QxN), axis=1)[:, :top]
    ideal_QxK = -np.sort(-gain_QxN, axis=1)[:, :top]
    dcg_Q = ranked_QxK @ discount_K
    ideal_Q = ideal_QxK @ discount_K
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal_Q > 0, dcg_Q / ideal_Q, np.nan)


def ndcg_at_k(scores_QxN: Any, grades_QxN: Any, mask_QxN: Any = None, k: int = 10) -> float:
    """Mean NDCG@k over queries with a positive ideal DCG.

    Queries whose valid candidates all have grade 0 are excluded, not counted as 0 or 1: no
    ranking of them is better than another. NaN (with a warning) when every query is excluded.
    """
    per_query_Q = ndcg_per_query(scores_QxN, grades_QxN, mask_QxN, k)
    if np.all(np.isnan(per_query_Q)):
        warnings.warn("NDCG undefined: no query has a candidate with grade > 0",
                      UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    return float(np.nanmean(per_query_Q))


def poor_match_rate_at_k(scores_QxN: Any, grades_QxN: Any, mask_QxN: Any = None, k: int = 10,
                         poor_grade: int = 1) -> float:
    """Share of the shown top-k slots, pooled over queries, holding a candidate graded <= poor_grade.

    A query shows min(k, its valid candidates) slots; queries with no valid candidate show none.
    """
    score_QxN, grade_QxN, mask_QxN = _lists(scores_QxN, grades_QxN, mask_QxN)
    order_QxN = _ranked(score_QxN, mask_QxN)[:, :k]
    shown_QxK = np.take_along_axis(mask_QxN, order_QxN, axis=1)
    poor_QxK = np.take_along_axis(grade_QxN <= poor_grade, order_QxN, axis=1) & shown_QxK
    if shown_QxK.sum() == 0:
        return float("nan")
    return float(poor_QxK.sum() / shown_QxK.sum())


# --- AUROC ------------------------------------------------------------------------------

def _midranks(x_N: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given the mean of the ranks they span."""
    _, inverse_N, counts_U = np.unique(x_N, return_inverse=True, return_counts=True)
    ends_U = np.cumsum(counts_U)
    return (ends_U - (counts_U - 1) / 2.0)[inverse_N]


def auroc_with_reason(scores: Any, labels: Any, mask: Any = None) -> tuple[float, str | None]:
    """AUROC by the rank-sum (Mann–Whitney) formula, ties counted half; (NaN, why) if undefined."""
    score_N = np.asarray(scores, dtype=np.float64)
    label_N = np.asarray(labels)
    if score_N.shape != label_N.shape:
        raise ValueError(f"scores {score_N.shape} and labels {label_N.shape} differ in shape")
    if mask is not None:
        mask_N = np.asarray(mask, dtype=bool)
        if mask_N.shape != score_N.shape:
            raise ValueError(f"mask has shape {mask_N.shape}; scores have {score_N.shape}")
        score_N, label_N = score_N[mask_N], label_N[mask_N]
    score_N, label_N = score_N.reshape(-1), label_N.reshape(-1)
    if not np.all(np.isin(label_N, (0, 1))):
        raise ValueError(f"AUROC labels must be 0/1; found values {np.unique(label_N)[:5]}")
    if not np.all(np.isfinite(score_N)):
        raise ValueError("AUROC scores must be finite")
    positive_N = label_N.astype(bool)
    n_pos, n_neg = int(positive_N.sum()), int((~positive_N).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), (f"AUROC undefined: only one class among {len(label_N)} examples "
                              f"({n_pos} positive, {n_neg} negative)")
    rank_sum = _midranks(score_N)[positive_N].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)), None


def auroc(scores: Any, labels: Any, mask: Any = None) -> float:
    """AUROC; NaN with an `UndefinedMetricWarning` saying why when only one class is present."""
    value, reason = auroc_with_reason(scores, labels, mask)
    if reason:
        warnings.warn(reason, UndefinedMetricWarning, stacklevel=2)
    return value


def auroc_per_action(scores_by_action: Mapping[str, Any], labels_by_action: Mapping[str, Any],
                     mask: Any = None) -> dict[str, float]:
    """{action: AUROC} for each action head (click, apply, dismiss, ...)."""
    missing = set(scores_by_action) - set(labels_by_action)
    if missing:
        raise ValueError(f"no labels for actions {sorted(missing)}; labels have {sorted(labels_by_action)}")
    result = {}
    for action, scores in scores_by_action.items():
        value, reason = auroc_with_reason(scores, labels_by_action[action], mask)
        if reason:
            warnings.warn(f"{action}: {reason}", UndefinedMetricWarning, stacklevel=2)
        result[action] = value
    return result


# --- Grades and kappa -------------------------------------------------------------------

def scores_to_grades(p_yes: Any, thresholds: Sequence[float]) -> np.ndarray:
    """Grade = number of thresholds <= score (as the policy's model judge maps p("Yes"))."""
    thresholds_G = np.asarray(thresholds, dtype=np.float64)
    if thresholds_G.ndim != 1 or np.any(np.diff(thresholds_G) < 0):
        raise ValueError(f"thresholds must be an ascending list; found {thresholds_G.tolist()}")
    return np.searchsorted(thresholds_G, np.asarray(p_yes, dtype=np.float64), side="right")


def expected_grades(grade_probs: Any) -> np.ndarray:
    """Σ_g g·p(g) over the last axis: a score that `fit_grade_thresholds` can map to grades."""
    probs = np.asarray(grade_probs, dtype=np.float64)
    return probs @ np.arange(probs.shape[-1])


def fit_grade_thresholds(scores: Any, grades: Any, n_grades: int = N_GRADES,
                         mask: Any = None) -> list[float]:
    """Thresholds that make `scores_to_grades(scores)` reproduce the label distribution.

    Fitted on validation: threshold g sits between the sorted scores at the share of labels
    graded <= g. Exact when scores are distinct; tied scores get one grade, so a tie that
    straddles a quantile shifts the distribution by the tie's size.
    """
    score_N, grade_N = np.asarray(scores, np.float64), np.asarray(grades)
    if mask is not None:
        mask_N = np.asarray(mask, dtype=bool)
        score_N, grade_N = score_N[mask_N], grade_N[mask_N]
    score_N, grade_N = score_N.reshape(-1), grade_N.reshape(-1).astype(np.int64)
    if score_N.shape != grade_N.shape or score_N.size == 0:
        raise ValueError(f"expected equal, non-empty scores and grades; found {score_N.shape}, {grade_N.shape}")
    if grade_N.min() < 0 or grade_N.max() >= n_grades:
        raise ValueError(f"grades must lie in 0..{n_grades - 1}; found {grade_N.min()}..{grade_N.max()}")
    sorted_N = np.sort(score_N)
    n = len(sorted_N)
    at_most_G = np.cumsum(np.bincount(grade_N, minlength=n_grades))[:-1]  # labels graded <= g
    thresholds = []
    for m in at_most_G.tolist():
        if m == 0:
            thresholds.append(float(sorted_N[0]))
        elif m == n:
            thresholds.append(float(np.nextafter(sorted_N[-1], np.inf)))
        else:
            thresholds.append(float((sorted_N[m - 1] + sorted_N[m]) / 2.0))
    return thresholds


def kappa_by_dimension(predicted_grades: Any, golden_grades: Any,
                       golden_dimension_grades: Mapping[str, Any] | None = None,
                       mask: Any = None) -> dict[str, float]:
    """Quadratic weighted kappa against the golden set: {"overall": κ, dimension: κ, ...}.

    `predicted_grades` is one array of overall grades or a {dimension or "overall": grades}
    dict (a model with per-dimension heads). A dimension without its own prediction is
    scored with the overall prediction, which measures how closely the model's overall grade
    follows that dimension of the policy.
    """
    if not isinstance(predicted_grades, Mapping):
        predicted_grades = {"overall": predicted_grades}
    golden = {"overall": golden_grades, **(golden_dimension_grades or {})}
    unknown = set(golden) - {"overall", *DIMENSIONS}
    if unknown:
        raise ValueError(f"unknown policy dimensions {sorted(unknown)}; expected {list(DIMENSIONS)}")
    if "overall" not in predicted_grades:
        raise ValueError("predicted_grades needs an 'overall' entry")

    def valid(values: Any) -> np.ndarray:
        array = np.asarray(values)
        return (array if mask is None else array[np.asarray(mask, dtype=bool)]).reshape(-1)

    return {name: weighted_kappa(valid(predicted_grades.get(name, predicted_grades["overall"])),
                                 valid(grades))
            for name, grades in golden.items()}


# --- Teacher–student agreement ----------------------------------------------------------

def _pearson(a_N: np.ndarray, b_N: np.ndarray) -> float:
    a_N, b_N = a_N - a_N.mean(), b_N - b_N.mean()
    denominator = np.sqrt((a_N ** 2).sum() * (b_N ** 2).sum())
    return float((a_N * b_N).sum() / denominator) if denominator > 0 else float("nan")


def agreement(teacher_QxN: Any, student_QxN: Any, mask_QxN: Any = None,
              k: int = 10) -> dict[str, float]:
    """How closely a student head follows its teacher over valid candidates.

    pearson / spearman: correlation of scores pooled over all valid candidates (NaN if either
    is constant); overlap_at_k: per query |top-k(teacher) ∩ top-k(student)| / min(k, valid),
    averaged over queries with a valid candidate; mean_abs_diff: mean |p_teacher − p_student|.
    """
    teacher, student, mask = _lists(teacher_QxN, student_QxN, mask_QxN,
                                    names=("teacher scores", "student scores"))
    teacher_N, student_N = teacher[mask], student[mask]
    top = min(k, teacher.shape[1])
    shown_Q = np.minimum(mask.sum(axis=1), top)
    in_top = []
    for score_QxN in (teacher, student):
        rank_QxN = np.argsort(_ranked(score_QxN, mask), axis=1)  # slot -> its rank
        in_top.append(rank_QxN < shown_Q[:, None])
    common_Q = (in_top[0] & in_top[1]).sum(axis=1)
    has_valid = shown_Q > 0
    return {
        "pearson": _pearson(teacher_N, student_N),
        "spearman": _pearson(_midranks(teacher_N), _midranks(student_N)),
        "overlap_at_k": (float(np.mean(common_Q[has_valid] / shown_Q[has_valid]))
                         if has_valid.any() else float("nan")),
        "mean_abs_diff": float(np.abs(teacher_N - student_N).mean()) if teacher_N.size else float("nan"),
    }


def agreement_per_head(teacher_by_head: Mapping[str, Any], student_by_head: Mapping[str, Any],
                       mask_QxN: Any = None, k: int = 10) -> dict[str, dict[str, float]]:
    """{head: agreement(...)} for every head both the teachers and the student score."""
    shared = [h for h in teacher_by_head if h in student_by_head]
    if not shared:
        raise ValueError(f"no head in common: teachers {sorted(teacher_by_head)}, "
                         f"student {sorted(student_by_head)}")
    return {h: agreement(teacher_by_head[h], student_by_head[h], mask_QxN, k) for h in shared}


# --- Classifier and binary heads (scikit-learn) -----------------------------------------

def _selected(values: Any, mask: Any, ndim: int) -> np.ndarray:
    """`values` flattened to rows ([M, C] for ndim 2, [M] for 1), where `mask` is true."""
    array = np.asarray(values)
    if ndim == 2:
        array = array.reshape(-1, array.shape[-1])
    else:
        array = array.reshape(-1)
    if mask is None:
        return array
    return array[np.asarray(mask, dtype=bool).reshape(-1)]


def classification_metrics(probs_NxC: Any, labels_N: Any, mask_N: Any = None,
                           bins: int = 10) -> dict[str, Any]:
    """Accuracy, macro-F1, log loss, AUROC (binary, or one-vs-rest per class and their macro
    mean), top-label ECE and the confusion matrix of a C-class head over the valid rows.

    Labels must be class ids in [0, C); a metric undefined on the data (AUROC of a class that
    never or always occurs) is NaN.
    """
    from sklearn import metrics as skm

    from jaxdistill.calibration import expected_calibration_error, reliability_curve

    probs = np.clip(_selected(probs_NxC, mask_N, 2).astype(np.float64), 1e-12, 1.0)
    # float32 softmax rows sum to 1 only within ~1e-7, which sklearn's log_loss warns about.
    probs /= probs.sum(-1, keepdims=True)
    labels = _selected(labels_N, mask_N, 1).astype(np.int64)
    classes = probs.shape[-1]
    if len(labels) == 0:
        return {}
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise ValueError(f"class labels must be in [0, {classes}); found "
                         f"{sorted(set(labels[bad].tolist()))[:5]}")
    predicted = probs.argmax(-1)
    out: dict[str, Any] = {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "macro_f1": float(skm.f1_score(labels, predicted, average="macro",
                                       labels=list(range(classes)), zero_division=0)),
        "log_loss": float(skm.log_loss(labels, probs, labels=list(range(classes)))),
        "ece": expected_calibration_error(probs.max(-1), (predicted == labels).astype(np.float64),
                                          bins),
        "confusion_matrix": skm.confusion_matrix(labels, predicted,
                                                 labels=list(range(classes))).tolist(),
        "reliability": reliability_curve(probs.max(-1), (predicted == labels).astype(np.float64),
                                         bins),
    }
    if classes == 2:
        out["auroc"] = _roc_auc(labels, probs[:, 1])
    else:
        per_class = [_roc_auc((labels == c).astype(np.int64), probs[:, c]) for c in range(classes)]
        out.update({f"auroc_class_{c}": v for c, v in enumerate(per_class)})
        defined = [v for v in per_class if np.isfinite(v)]
        out["auroc_macro"] = float(np.mean(defined)) if defined else float("nan")
    return out


def binary_metrics(probs: Any, labels: Any, mask: Any = None, bins: int = 10) -> dict[str, Any]:
    """AUROC, average precision, ECE and the reliability curve of one sigmoid output against
    0/1 labels."""
    from sklearn import metrics as skm

    from jaxdistill.calibration import expected_calibration_error, reliability_curve

    prob_N = _selected(probs, mask, 1).astype(np.float64)
    label_N = _selected(labels, mask, 1).astype(np.float64)
    if len(label_N) == 0:
        return {}
    both = 0 < label_N.sum() < len(label_N)
    return {
        "auroc": _roc_auc(label_N, prob_N),
        "average_precision": (float(skm.average_precision_score(label_N, prob_N)) if both
                              else float("nan")),
        "ece": expected_calibration_error(prob_N, label_N, bins),
        "reliability": reliability_curve(prob_N, label_N, bins),
    }


def _roc_auc(labels_N: np.ndarray, scores_N: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels_N)) < 2:
        return float("nan")
    return float(roc_auc_score(labels_N, scores_N))


def class_agreement(teacher_logits_NxC: Any, student_logits_NxC: Any,
                    mask_N: Any = None) -> dict[str, float]:
    """How closely a student's class head follows its teacher's: argmax agreement and
    KL(teacher || student) of the softmax distributions, over the valid rows."""
    teacher = _selected(teacher_logits_NxC, mask_N, 2).astype(np.float64)
    student = _selected(student_logits_NxC, mask_N, 2).astype(np.float64)
    if len(teacher) == 0:
        return {}
    log_t = teacher - np.logaddexp.reduce(teacher, axis=-1, keepdims=True)
    log_s = student - np.logaddexp.reduce(student, axis=-1, keepdims=True)
    return {"argmax_agreement": float(np.mean(teacher.argmax(-1) == student.argmax(-1))),
            "kl": float(np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)))}


# --- Throughput -------------------------------------------------------------------------

def _batch_size(batch: Any) -> int:
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    return len(batch)


def measure_throughput(score_fn: Callable[[Any], Any], batches: Sequence[Any], warmup: int = 1,
                       items_per_batch: Sequence[int] | None = None) -> float:
    """Items scored per second of wall clock over one pass of `batches`.

    `warmup` untimed calls (cycling over the first batches) absorb compilation. `score_fn`
    must return only when its work is done (for JAX: block_until_ready inside it). Items per
    batch default to the leading dimension of the batch (of its first value, for a dict).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("measure_throughput needs at least one batch")
    sizes = [_batch_size(b) for b in batches] if items_per_batch is None else list(items_per_batch)
    for i in range(warmup):
        score_fn(batches[i % len(batches)])
    start = time.perf_counter()
    for batch in batches:
        score_fn(batch)
    elapsed = time.perf_counter() - start
    return float(sum(sizes) / max(elapsed, 1e-9))


# --- Headline ---------------------------------------------------------------------------

def summarize(scores_QxN: Any, grades_QxN: Any, mask_QxN: Any = None, *, k: int = 10,
              poor_grade: int = 1,
              action_scores: Mapping[str, Any] | None = None,
              action_labels: Mapping[str, Any] | None = None,
              golden_scores: Any = None, golden_grades: Any = None,
              golden_dimension_grades: Mapping[str, Any] | None = None,
              golden_mask: Any = None, grade_thresholds: Sequence[float] | None = None,
              teacher_scores: Mapping[str, Any] | None = None,
              student_scores: Mapping[str, Any] | None = None,
              items_per_second: float | None = None) -> dict[str, float | str]:
    """A flat dict of headline metrics for one model on one split.

    Keys: ndcg_at_{k}, poor_match_rate_at_{k}, auroc_{action} (+ auroc_{action}_note when
    undefined), kappa and kappa_{dimension} (golden set; grades from `golden_scores` by
    `grade_thresholds` fitted on validation), agreement_{head}_{metric}, items_per_second.
    Each optional group appears when its inputs are given.
    """
    summary: dict[str, float | str] = {
        f"ndcg_at_{k}": ndcg_at_k(scores_QxN, grades_QxN, mask_QxN, k),
        f"poor_match_rate_at_{k}": poor_match_rate_at_k(scores_QxN, grades_QxN, mask_QxN, k,
                                                        poor_grade),
    }
    if action_scores:
        if action_labels is None:
            raise ValueError("action_scores given without action_labels")
        for action, scores in action_scores.items():
            if action not in action_labels:
                raise ValueError(f"no labels for action {action!r}")
            value, reason = auroc_with_reason(scores, action_labels[action], mask_QxN)
            summary[f"auroc_{action}"] = value
            if reason:
                summary[f"auroc_{action}_note"] = reason
    if golden_scores is not None:
        if golden_grades is None or grade_thresholds is None:
            raise ValueError("golden_scores needs golden_grades and grade_thresholds "
                             "(fit_grade_thresholds on validation)")
        kappas = kappa_by_dimension(scores_to_grades(golden_scores, grade_thresholds),
                                    golden_grades, golden_dimension_grades, golden_mask)
        summary["kappa"] = kappas.pop("overall")
        summary.update({f"kappa_{d}": v for d, v in kappas.items()})
    if teacher_scores is not None and student_scores is not None:
        for head, metrics in agreement_per_head(teacher_scores, student_scores, mask_QxN, k).items():
            summary.update({f"agreement_{head}_{name}": v for name, v in metrics.items()})
    if items_per_second is not None:
        summary["items_per_second"] = float(items_per_second)
    return summary


# --- Baselines and a readable combined score ----------------------------------------------

def position_rates(positions: Any, labels: Any, mask: Any = None, *, smoothing: float = 1.0
                   ) -> np.ndarray:
    """Empirical rate of a binary label per logged position, [P] (P = max position + 1).

    A position-only baseline: fitted on train, `rates[position]` scores any split. Each rate is
    smoothed towards the overall rate by `smoothing` pseudo-observations, so a position seen
    rarely does not get a rate of exactly 0 or 1.
    """
    position_N = np.asarray(positions, dtype=np.int64).reshape(-1)
    label_N = np.asarray(labels, dtype=np.float64).reshape(-1)
    valid_N = (np.ones_like(label_N, bool) if mask is None
               else np.asarray(mask, dtype=bool).reshape(-1))
    if position_N.shape != label_N.shape or valid_N.shape != label_N.shape:
        raise ValueError(f"positions, labels and mask must have one shape; found "
                         f"{np.shape(positions)}, {np.shape(labels)}, {np.shape(mask)}")
    if not valid_N.any() or position_N[valid_N].min() < 0:
        raise ValueError("position_rates needs valid rows with positions >= 0")
    position_N, label_N = position_N[valid_N], label_N[valid_N]
    overall = label_N.mean()
    hits_P = np.bincount(position_N, weights=label_N)
    seen_P = np.bincount(position_N).astype(np.float64)
    return (hits_P + smoothing * overall) / (seen_P + smoothing)


def score_by_position(rates_P: np.ndarray, positions: Any) -> np.ndarray:
    """The position-only baseline's scores: positions beyond the fitted ones get the last rate."""
    return np.asarray(rates_P)[np.clip(np.asarray(positions, dtype=np.int64), 0, len(rates_P) - 1)]


def relative_score(values: Mapping[str, float], references: Mapping[str, float]) -> float:
    """Mean over metrics of value / reference (each higher-is-better): 1.0 = matches the
    references on average. A metric a model lacks (NaN or missing) counts as 0, so a model
    without one of the heads cannot lead on it."""
    if not references:
        raise ValueError("relative_score needs at least one reference metric")
    ratios = []
    for name, reference in references.items():
        value = values.get(name, float("nan"))
        if not reference > 0:
            raise ValueError(f"reference {name!r} must be > 0, found {reference}")
        ratios.append(0.0 if value is None or not np.isfinite(value) else value / reference)
    return float(np.mean(ratios))


def forward_flops_per_item(non_embedding_params: int, layers: int, attention_width: int,
                           tokens: int) -> float:
    """Forward FLOPs to score one item of `tokens` tokens: 2·N·T for the weight matmuls
    (N = non-embedding parameters: an embedding lookup is not a matmul, and a ranking head
    reads a handful of output rows) plus 2·2·L·T²·A for attention scores and values (A =
    heads × head_dim), causal masking not subtracted. What the items/s ratio should follow
    once per-call overhead is amortised."""
    if min(non_embedding_params, layers, attention_width, tokens) < 0:
        raise ValueError("forward_flops_per_item needs non-negative sizes")
    return float(2 * non_embedding_params * tokens + 4 * layers * tokens ** 2 * attention_width)
