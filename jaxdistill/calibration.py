"""Calibration of score heads: isotonic maps (scikit-learn's), position-aware maps, ECE.

Pure numpy over flat arrays of scores and labels; no model code. Each calibrator is a
monotone non-decreasing piecewise-linear map that serialises to a small JSON dict saved
beside the model (`to_dict` / `calibrator_from_dict`).

- `IsotonicCalibrator`: the weighted least-squares monotone fit of labels on scores, by
  scikit-learn's `IsotonicRegression`; its thresholds are the knots, between them the map
  interpolates linearly and outside them it is clamped to the end values, exactly as
  `IsotonicRegression.predict` does (so it reproduces the fit on its own training points).
- `PositionAwareCalibrator`: engagement labels are position-biased, so it keeps one isotonic
  map per position bucket, falling back to the global map for buckets with too few examples.
- `calibrate_heads` fits one calibrator per head on a validation split; `calibration_summary`
  gives ECE, Brier score and reliability curves before and after, in the form `report.py` reads.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_POSITION_EDGES = (0, 1, 2, 3, 5, 10)  # buckets 0, 1, 2, 3-4, 5-9, 10+


def _flat(name: str, values: Any, dtype=np.float64) -> np.ndarray:
    array = np.asarray(values, dtype=dtype).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; found {int((~np.isfinite(array)).sum())} "
                         f"non-finite of {array.size}")
    return array


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: a.shape[0] for name, a in arrays.items() if a is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"expected arrays of one length, found {lengths}")


class IsotonicCalibrator:
    """Monotone non-decreasing piecewise-linear map from scores to calibrated probabilities."""

    kind = "isotonic"

    def __init__(self, knots_x: Sequence[float] = (), knots_y: Sequence[float] = ()):
        self.knots_x = np.asarray(knots_x, dtype=np.float64)
        self.knots_y = np.asarray(knots_y, dtype=np.float64)

    def fit(self, scores: Any, labels: Any, weights: Any = None) -> "IsotonicCalibrator":
        score_N, label_N = _flat("scores", scores), _flat("labels", labels)
        weight_N = np.ones_like(score_N) if weights is None else _flat("weights", weights)
        _check_same_length(scores=score_N, labels=label_N, weights=weight_N)
        if score_N.size == 0:
            raise ValueError("cannot fit an isotonic map on zero examples")
        if np.any(weight_N < 0) or weight_N.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        from sklearn.isotonic import IsotonicRegression

        keep = weight_N > 0
        fitted = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(
            score_N[keep], label_N[keep], sample_weight=weight_N[keep])
        # scikit-learn predicts by linear interpolation between these thresholds, clipped
        # outside them: the same map `__call__` applies.
        self.knots_x = np.asarray(fitted.X_thresholds_, np.float64)
        self.knots_y = np.asarray(fitted.y_thresholds_, np.float64)
        return self

    def __call__(self, scores: Any) -> np.ndarray:
        if self.knots_x.size == 0:
            raise ValueError("IsotonicCalibrator is not fitted")
        score = np.asarray(scores, dtype=np.float64)
        return np.interp(score, self.knots_x, self.knots_y)  # clamps outside the knots

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "knots_x": self.knots_x.tolist(),
                "knots_y": self.knots_y.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IsotonicCalibrator":
        _expect_kind(data, cls.kind)
        try:
            knots_x, knots_y = data["knots_x"], data["knots_y"]
        except KeyError as missing:
            raise ValueError(f"isotonic calibrator dict lacks key {missing}; "
                             f"found keys {sorted(data)}") from None
        x, y = np.asarray(knots_x, np.float64), np.asarray(knots_y, np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError(f"knots_x and knots_y must be equal-length non-empty lists; "
                             f"found shapes {x.shape}, {y.shape}")
        if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
            raise ValueError("knots_x must increase strictly and knots_y must not decrease")
        return cls(x, y)


class PositionAwareCalibrator:
    """One isotonic map per position bucket; the global map where a bucket has too few examples.

    bucket_edges: ascending lower bounds; bucket i holds positions in
    [edges[i], edges[i+1]), the last bucket everything from edges[-1] up. Positions below
    edges[0] fall in bucket 0.
    """

    kind = "position_aware"

    def __init__(self, bucket_edges: Sequence[int] = DEFAULT_POSITION_EDGES,
                 min_examples: int = 200):
        edges = [int(e) for e in bucket_edges]
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bucket_edges must be a non-empty ascending list; found {edges}")
        if min_examples < 1:
            raise ValueError(f"min_examples must be >= 1; found {min_examples}")
        self.bucket_edges = edges
        self.min_examples = int(min_examples)
        self.global_map: IsotonicCalibrator | None = None
        self.bucket_maps: list[IsotonicCalibrator | None] = [None] * len(edges)

    def bucket_of(self, positions: Any) -> np.ndarray:
        position = np.asarray(positions)
        return np.clip(np.searchsorted(self.bucket_edges, position, side="right") - 1,
                       0, len(self.bucket_edges) - 1)

    def bucket_names(self) -> list[str]:
        names = []
        for lo, hi in zip(self.bucket_edges, [*self.bucket_edges[1:], None]):
            names.append(f"{lo}+" if hi is None else str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}")
        return names

    def fit(self, scores: Any, labels: Any, positions: Any,
            weights: Any = None) -> "PositionAwareCalibrator":
        score_N, label_N = _flat("scores", scores), _flat("labels", labels)
        position_N = _flat("positions", positions, dtype=np.int64)
        weight_N = None if weights is None else _flat("weights", weights)
        _check_same_length(scores=score_N, labels=label_N, positions=position_N, weights=weight_N)
        self.global_map = IsotonicCalibrator().fit(score_N, label_N, weight_N)
        bucket_N = self.bucket_of(position_N)
        for b in range(len(self.bucket_edges)):
            in_bucket = bucket_N == b
            self.bucket_maps[b] = None
            if in_bucket.sum() >= self.min_examples:
                self.bucket_maps[b] = IsotonicCalibrator().fit(
                    score_N[in_bucket], label_N[in_bucket],
                    None if weight_N is None else weight_N[in_bucket])
        return self

    def __call__(self, scores: Any, positions: Any) -> np.ndarray:
        """Calibrated probabilities; `positions` broadcasts (a scalar 0 asks 'if shown first')."""
        if self.global_map is None:
            raise ValueError("PositionAwareCalibrator is not fitted")
        score = np.asarray(scores, dtype=np.float64)
        bucket = np.broadcast_to(self.bucket_of(positions), score.shape)
        out = self.global_map(score)
        for b, bucket_map in enumerate(self.bucket_maps):
            if bucket_map is not None:
                out = np.where(bucket == b, bucket_map(score), out)
        return out

    def to_dict(self) -> dict[str, Any]:
        if self.global_map is None:
            raise ValueError("PositionAwareCalibrator is not fitted")
        return {"kind": self.kind, "bucket_edges": list(self.bucket_edges),
                "min_examples": self.min_examples, "global": self.global_map.to_dict(),
                "buckets": [None if m is None else m.to_dict() for m in self.bucket_maps]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PositionAwareCalibrator":
        _expect_kind(data, cls.kind)
        missing = {"bucket_edges", "min_examples", "global", "buckets"} - set(data)
        if missing:
            raise ValueError(f"position-aware calibrator dict lacks keys {sorted(missing)}")
        calibrator = cls(data["bucket_edges"], data["min_examples"])
        if len(data["buckets"]) != len(calibrator.bucket_edges):
            raise ValueError(f"expected {len(calibrator.bucket_edges)} bucket maps (one per edge); "
                             f"found {len(data['buckets'])}")
        calibrator.global_map = IsotonicCalibrator.from_dict(data["global"])
        calibrator.bucket_maps = [None if m is None else IsotonicCalibrator.from_dict(m)
                                  for m in data["buckets"]]
        return calibrator


Calibrator = IsotonicCalibrator | PositionAwareCalibrator


def _expect_kind(data: Mapping[str, Any], kind: str) -> None:
    if data.get("kind") != kind:
        raise ValueError(f"expected a calibrator dict of kind {kind!r}; found {data.get('kind')!r}")


def calibrator_from_dict(data: Mapping[str, Any]) -> Calibrator:
    kinds = {c.kind: c for c in (IsotonicCalibrator, PositionAwareCalibrator)}
    if data.get("kind") not in kinds:
        raise ValueError(f"unknown calibrator kind {data.get('kind')!r}; expected one of {sorted(kinds)}")
    return kinds[data["kind"]].from_dict(data)


def _masked(name: str, values: Any, mask: Any) -> np.ndarray:
    array = np.asarray(values)
    if mask is None:
        return array.reshape(-1)
    mask_array = np.asarray(mask, dtype=bool)
    if mask_array.shape != array.shape:
        raise ValueError(f"{name} has shape {array.shape} but the mask has {mask_array.shape}")
    return array[mask_array]


def calibrate_heads(scores_by_head: Mapping[str, Any], labels_by_head: Mapping[str, Any], *,
                    mask: Any = None, positions: Any = None,
                    position_aware: Sequence[str] = (),
                    bucket_edges: Sequence[int] = DEFAULT_POSITION_EDGES,
                    min_examples: int = 200) -> dict[str, Calibrator]:
    """One calibrator per head, fitted on a validation split.

    Arrays may be [Q, N] lists with `mask` [Q, N] marking real candidates. Heads named in
    `position_aware` (e.g. the engagement actions) get a `PositionAwareCalibrator` over
    `positions`; the rest an `IsotonicCalibrator`.
    """
    missing = set(scores_by_head) ^ set(labels_by_head)
    if missing:
        raise ValueError(f"scores and labels must name the same heads; unmatched: {sorted(missing)}")
    unknown = set(position_aware) - set(scores_by_head)
    if unknown:
        raise ValueError(f"position_aware names heads without scores: {sorted(unknown)}")
    if position_aware and positions is None:
        raise ValueError("position-aware heads need positions")
    calibrators: dict[str, Calibrator] = {}
    for head in scores_by_head:
        score_N = _masked(f"scores[{head!r}]", scores_by_head[head], mask)
        label_N = _masked(f"labels[{head!r}]", labels_by_head[head], mask)
        if head in position_aware:
            calibrators[head] = PositionAwareCalibrator(bucket_edges, min_examples).fit(
                score_N, label_N, _masked("positions", positions, mask))
        else:
            calibrators[head] = IsotonicCalibrator().fit(score_N, label_N)
    return calibrators


# --- Metrics ----------------------------------------------------------------------------

def _equal_mass_bins(prob_N: np.ndarray, bins: int) -> list[np.ndarray]:
    if bins < 1:
        raise ValueError(f"bins must be >= 1; found {bins}")
    order_N = np.argsort(prob_N, kind="stable")
    return [b for b in np.array_split(order_N, min(bins, len(order_N))) if len(b)]


def reliability_curve(probs: Any, labels: Any, bins: int = 10) -> dict[str, list[float]]:
    """Equal-mass bins: mean predicted probability, observed positive rate and count per bin."""
    prob_N, label_N = _flat("probs", probs), _flat("labels", labels)
    _check_same_length(probs=prob_N, labels=label_N)
    groups = _equal_mass_bins(prob_N, bins)
    return {"mean_predicted": [float(prob_N[g].mean()) for g in groups],
            "fraction_positive": [float(label_N[g].mean()) for g in groups],
            "count": [int(len(g)) for g in groups]}


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float:
    """ECE over equal-mass bins: Σ_b (n_b / n) · |mean p_b − mean y_b|."""
    curve = reliability_curve(probs, labels, bins)
    count_B = np.array(curve["count"], dtype=np.float64)
    if count_B.sum() == 0:
        return float("nan")
    gap_B = np.abs(np.array(curve["mean_predicted"]) - np.array(curve["fraction_positive"]))
    return float((count_B * gap_B).sum() / count_B.sum())


def brier_score(probs: Any, labels: Any) -> float:
    prob_N, label_N = _flat("probs", probs), _flat("labels", labels)
    _check_same_length(probs=prob_N, labels=label_N)
    return float(np.mean((prob_N - label_N) ** 2)) if prob_N.size else float("nan")


def calibration_summary(calibrators: Mapping[str, Calibrator], scores_by_head: Mapping[str, Any],
                        labels_by_head: Mapping[str, Any], *, mask: Any = None,
                        positions: Any = None, bins: int = 10) -> dict[str, dict[str, Any]]:
    """Per head: ECE and Brier before/after, and reliability curves (the report's input).

    Position-aware heads are applied at the logged positions, i.e. judged against the
    position-biased labels they were fitted to.
    """
    summary: dict[str, dict[str, Any]] = {}
    for head, calibrator in calibrators.items():
        score_N = _masked(f"scores[{head!r}]", scores_by_head[head], mask).astype(np.float64)
        label_N = _masked(f"labels[{head!r}]", labels_by_head[head], mask).astype(np.float64)
        if isinstance(calibrator, PositionAwareCalibrator):
            if positions is None:
                raise ValueError(f"head {head!r} is position-aware; pass positions")
            calibrated_N = calibrator(score_N, _masked("positions", positions, mask))
        else:
            calibrated_N = calibrator(score_N)
        summary[head] = {
            "ece_before": expected_calibration_error(score_N, label_N, bins),
            "ece_after": expected_calibration_error(calibrated_N, label_N, bins),
            "brier_before": brier_score(score_N, label_N),
            "brier_after": brier_score(calibrated_N, label_N),
            "before": reliability_curve(score_N, label_N, bins),
            "after": reliability_curve(calibrated_N, label_N, bins),
        }
    return summary
