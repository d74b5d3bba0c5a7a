"""Tests for jaxdistill.calibration: isotonic maps (== scikit-learn), position buckets, ECE/Brier."""
import json

import numpy as np
import pytest

from jaxdistill import calibration


def test_isotonic_knots_interpolation_and_clamping():
    calibrator = calibration.IsotonicCalibrator().fit(
        scores=[0.1, 0.2, 0.3, 0.4], labels=[0, 1, 0, 1])
    # The fit is 0, .5, .5, 1 (0.2 and 0.3 pool); each block keeps its end points as knots.
    np.testing.assert_allclose(calibrator.knots_x, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(calibrator.knots_y, [0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(calibrator([0.0, 0.1, 0.15, 0.25, 0.35, 0.9]),
                               [0.0, 0.0, 0.25, 0.5, 0.75, 1.0])


def test_isotonic_ties_pool_and_weights():
    calibrator = calibration.IsotonicCalibrator().fit(
        scores=[0.5, 0.5, 0.7], labels=[0, 1, 1], weights=[3, 1, 1])
    np.testing.assert_allclose(calibrator.knots_x, [0.5, 0.7])
    np.testing.assert_allclose(calibrator.knots_y, [0.25, 1.0])


def test_isotonic_equals_scikit_learn_on_its_training_points_and_a_grid():
    """The map is scikit-learn's IsotonicRegression (the old centroid interpolation differed
    from it by up to 0.38 on a grid and fitted the training points worse)."""
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    scores = rng.random(300)
    labels = (rng.random(300) < scores).astype(float)
    weights = rng.uniform(0.5, 2.0, 300)
    ours = calibration.IsotonicCalibrator().fit(scores, labels, weights)
    theirs = IsotonicRegression(out_of_bounds="clip").fit(scores, labels, sample_weight=weights)
    grid = np.linspace(-0.2, 1.2, 2001)
    np.testing.assert_allclose(ours(grid), theirs.predict(grid), atol=1e-12)
    np.testing.assert_allclose(ours(scores), theirs.predict(scores), atol=1e-12)
    # On its training points it is the weighted least-squares monotone fit: no monotone map
    # (the raw scores are one) has a lower weighted Brier score there.
    brier = np.average((ours(scores) - labels) ** 2, weights=weights)
    assert brier < np.average((scores - labels) ** 2, weights=weights)


def test_isotonic_output_is_monotone():
    rng = np.random.default_rng(0)
    scores = rng.random(2000)
    labels = rng.random(2000) < scores ** 2
    calibrator = calibration.IsotonicCalibrator().fit(scores, labels)
    out = calibrator(np.linspace(-0.5, 1.5, 1001))
    assert np.all(np.diff(out) >= 0)
    assert np.all(np.diff(calibrator.knots_x) > 0)


def test_isotonic_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        calibration.IsotonicCalibrator().fit([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="one length"):
        calibration.IsotonicCalibrator().fit([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="not fitted"):
        calibration.IsotonicCalibrator()([0.5])


def test_calibration_improves_ece_on_miscalibrated_scores():
    rng = np.random.default_rng(1)
    true_p = rng.random(20_000)
    labels = rng.random(20_000) < true_p
    overconfident = true_p ** 3  # systematically too low
    fit_half, eval_half = slice(0, 10_000), slice(10_000, None)
    calibrator = calibration.IsotonicCalibrator().fit(overconfident[fit_half], labels[fit_half])
    calibrated = calibrator(overconfident[eval_half])
    ece_before = calibration.expected_calibration_error(overconfident[eval_half], labels[eval_half])
    ece_after = calibration.expected_calibration_error(calibrated, labels[eval_half])
    assert ece_before > 0.15
    assert ece_after < 0.03
    assert (calibration.brier_score(calibrated, labels[eval_half])
            < calibration.brier_score(overconfident[eval_half], labels[eval_half]))


def test_ece_and_reliability_hand_example():
    # Two equal-mass bins: {0.1, 0.2} with labels {0, 1}, {0.8, 0.9} with {1, 1}.
    curve = calibration.reliability_curve([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 1], bins=2)
    np.testing.assert_allclose(curve["mean_predicted"], [0.15, 0.85])
    np.testing.assert_allclose(curve["fraction_positive"], [0.5, 1.0])
    assert curve["count"] == [2, 2]
    # ECE = 0.5 * |0.15 - 0.5| + 0.5 * |0.85 - 1| = 0.25
    assert calibration.expected_calibration_error([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 1], 2) == pytest.approx(0.25)
    assert calibration.brier_score([1.0, 0.0, 0.5], [1, 0, 1]) == pytest.approx(0.25 / 3)


def _position_data(rng, n=6000):
    positions = rng.integers(0, 12, n)
    scores = rng.random(n)
    examine = (1.0 + positions) ** -0.8
    labels = rng.random(n) < scores * examine
    return scores, labels, positions


def test_position_aware_buckets_and_fallback():
    rng = np.random.default_rng(2)
    scores, labels, positions = _position_data(rng)
    # Keep only a handful of examples in bucket 5-9 so it must fall back to the global map.
    sparse = (positions >= 5) & (positions <= 9)
    keep = ~sparse | (np.cumsum(sparse) <= 20)
    scores, labels, positions = scores[keep], labels[keep], positions[keep]
    calibrator = calibration.PositionAwareCalibrator(min_examples=100).fit(scores, labels, positions)
    assert calibrator.bucket_names() == ["0", "1", "2", "3-4", "5-9", "10+"]
    np.testing.assert_array_equal(calibrator.bucket_of([0, 1, 2, 3, 4, 5, 9, 10, 30]),
                                  [0, 1, 2, 3, 3, 4, 4, 5, 5])
    fitted = [m is not None for m in calibrator.bucket_maps]
    assert fitted == [True, True, True, True, False, True]
    grid = np.linspace(0, 1, 11)
    np.testing.assert_allclose(calibrator(grid, 7), calibrator.global_map(grid))
    np.testing.assert_allclose(calibrator(grid, 0), calibrator.bucket_maps[0](grid))
    # Position bias is learnt: the same score is worth more at the top.
    assert calibrator(0.9, 0) > calibrator(0.9, 11) + 0.2


def test_round_trip_through_json():
    rng = np.random.default_rng(3)
    scores, labels, positions = _position_data(rng)
    for fitted in (calibration.IsotonicCalibrator().fit(scores, labels),
                   calibration.PositionAwareCalibrator(min_examples=100).fit(scores, labels, positions)):
        restored = calibration.calibrator_from_dict(json.loads(json.dumps(fitted.to_dict())))
        assert type(restored) is type(fitted)
        args = (scores,) if isinstance(fitted, calibration.IsotonicCalibrator) else (scores, positions)
        np.testing.assert_array_equal(restored(*args), fitted(*args))
    with pytest.raises(ValueError, match="unknown calibrator kind"):
        calibration.calibrator_from_dict({"kind": "platt"})
    with pytest.raises(ValueError, match="knots_y"):
        calibration.IsotonicCalibrator.from_dict({"kind": "isotonic", "knots_x": [0, 1]})


def test_calibrate_heads_with_mask_and_summary():
    rng = np.random.default_rng(4)
    scores_QxN = rng.random((300, 10))
    mask_QxN = np.ones((300, 10), bool)
    mask_QxN[:, 8:] = False
    positions_QxN = np.tile(np.arange(10), (300, 1))
    scores = {"relevance": scores_QxN, "click": scores_QxN}
    labels = {"relevance": rng.random((300, 10)) < scores_QxN ** 2,
              "click": rng.random((300, 10)) < scores_QxN * (1 + positions_QxN) ** -0.8}
    calibrators = calibration.calibrate_heads(scores, labels, mask=mask_QxN, positions=positions_QxN,
                                              position_aware=["click"], min_examples=100)
    assert isinstance(calibrators["relevance"], calibration.IsotonicCalibrator)
    assert isinstance(calibrators["click"], calibration.PositionAwareCalibrator)
    summary = calibration.calibration_summary(calibrators, scores, labels, mask=mask_QxN,
                                              positions=positions_QxN)
    for head in ("relevance", "click"):
        assert summary[head]["ece_after"] < summary[head]["ece_before"]
        assert sum(summary[head]["after"]["count"]) == 300 * 8
    json.dumps(summary)
