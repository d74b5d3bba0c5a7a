"""Tests for jaxdistill.evaluate: ranking metrics, AUROC, grade thresholds, kappa, agreement."""
import itertools
import warnings

import numpy as np
import pytest

from jaxdistill import evaluate
from jaxdistill.judge import weighted_kappa


def test_ndcg_hand_example():
    # Ranked by score: grades 0, 2, 1 -> gains 0, 3, 1.
    # DCG@3  = 0/log2(2) + 3/log2(3) + 1/log2(4) = 1.892789 + 0.5 = 2.392789
    # IDCG@3 = 3/log2(2) + 1/log2(3) + 0         = 3 + 0.630930   = 3.630930
    # NDCG@3 = 0.659002; at k=2: 1.892789 / 3.630930 = 0.521297
    scores, grades = [[3.0, 2.0, 1.0]], [[0, 2, 1]]
    assert evaluate.ndcg_at_k(scores, grades, k=3) == pytest.approx(0.659002, abs=1e-6)
    assert evaluate.ndcg_at_k(scores, grades, k=2) == pytest.approx(0.521297, abs=1e-6)
    assert evaluate.ndcg_at_k(scores, grades, k=10) == pytest.approx(0.659002, abs=1e-6)


def test_ndcg_perfect_and_reversed():
    grades_QxN = np.array([[4, 3, 2, 1, 0], [0, 1, 1, 3, 2]])
    assert evaluate.ndcg_at_k(grades_QxN.astype(float), grades_QxN) == pytest.approx(1.0)
    assert evaluate.ndcg_at_k(-grades_QxN.astype(float), grades_QxN) < 0.7


def test_ndcg_mask_ignores_padding_and_excludes_zero_ideal():
    # Padded slots hold a high score and a high grade: both must be ignored.
    scores_QxN = np.array([[3.0, 2.0, 1.0, 9.0, 9.0], [1.0, 2.0, 0.0, 0.0, 0.0]])
    grades_QxN = np.array([[0, 2, 1, 4, 4], [0, 0, 0, 4, 4]])
    mask_QxN = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], bool)
    per_query = evaluate.ndcg_per_query(scores_QxN, grades_QxN, mask_QxN, k=10)
    assert per_query[0] == pytest.approx(0.659002, abs=1e-6)
    assert np.isnan(per_query[1])  # no valid candidate with grade > 0: excluded
    assert evaluate.ndcg_at_k(scores_QxN, grades_QxN, mask_QxN) == pytest.approx(0.659002, abs=1e-6)
    # NaN in a padded slot is fine; in a valid slot it is an error.
    scores_QxN[0, 4] = np.nan
    evaluate.ndcg_at_k(scores_QxN, grades_QxN, mask_QxN)
    scores_QxN[0, 0] = np.nan
    with pytest.raises(ValueError, match="query 0, slot 0"):
        evaluate.ndcg_at_k(scores_QxN, grades_QxN, mask_QxN)


def test_poor_match_hand_example():
    scores_QxN = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.6, 0.0, 0.0]])
    grades_QxN = np.array([[1, 3, 0, 0], [4, 2, 0, 0]])
    mask_QxN = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    # k=3: query 0 shows grades 1, 3, 0 (2 poor); query 1 has 2 valid, shows 2, 4 (0 poor).
    assert evaluate.poor_match_rate_at_k(scores_QxN, grades_QxN, mask_QxN, k=3) == pytest.approx(2 / 5)
    # poor_grade=0 counts only the grade-0 slot.
    assert evaluate.poor_match_rate_at_k(scores_QxN, grades_QxN, mask_QxN, k=3,
                                         poor_grade=0) == pytest.approx(1 / 5)


def _pairwise_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    labels = (rng.random(200) < 0.2 + 0.15 * scores).astype(int)
    assert evaluate.auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels))
    assert evaluate.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_mask_and_single_class():
    scores_QxN = np.array([[0.9, 0.1, 5.0], [0.8, 0.2, -5.0]])
    labels_QxN = np.array([[1, 0, 0], [1, 0, 1]])
    mask_QxN = np.array([[1, 1, 0], [1, 1, 0]], bool)
    assert evaluate.auroc(scores_QxN, labels_QxN, mask_QxN) == 1.0
    with pytest.warns(evaluate.UndefinedMetricWarning, match="only one class"):
        assert np.isnan(evaluate.auroc([0.1, 0.2, 0.3], [0, 0, 0]))
    value, reason = evaluate.auroc_with_reason([0.1, 0.2], [1, 1])
    assert np.isnan(value) and "2 positive, 0 negative" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evaluate.UndefinedMetricWarning)
        per_action = evaluate.auroc_per_action(
            {"click": [0.1, 0.9], "apply": [0.3, 0.4]}, {"click": [0, 1], "apply": [0, 0]})
    assert per_action["click"] == 1.0 and np.isnan(per_action["apply"])


def test_threshold_fitting_reproduces_label_distribution():
    rng = np.random.default_rng(1)
    grades = rng.choice(5, 5000, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    scores = np.clip(0.2 * grades + rng.normal(0, 0.15, 5000), 0, 1)
    thresholds = evaluate.fit_grade_thresholds(scores, grades)
    assert thresholds == sorted(thresholds)
    predicted = evaluate.scores_to_grades(scores, thresholds)
    np.testing.assert_array_equal(np.bincount(predicted, minlength=5), np.bincount(grades, minlength=5))
    # A grade absent from the labels is absent from the predictions.
    no_twos = np.where(grades == 2, 3, grades)
    predicted = evaluate.scores_to_grades(scores, evaluate.fit_grade_thresholds(scores, no_twos))
    np.testing.assert_array_equal(np.bincount(predicted, minlength=5), np.bincount(no_twos, minlength=5))


def test_scores_to_grades_and_expected_grades():
    np.testing.assert_array_equal(evaluate.scores_to_grades([0.0, 0.2, 0.5, 0.95], [0.2, 0.4, 0.6, 0.8]),
                                  [0, 1, 2, 4])
    np.testing.assert_allclose(evaluate.expected_grades([[0, 0, 1, 0, 0], [0.5, 0, 0, 0, 0.5]]), [2, 2])


def test_kappa_by_dimension_reuses_weighted_kappa():
    rng = np.random.default_rng(2)
    golden = rng.integers(0, 5, 400)
    predicted = np.clip(golden + rng.integers(-1, 2, 400), 0, 4)
    function = np.clip(golden + rng.integers(-2, 3, 400), 0, 4)
    mask = rng.random(400) < 0.9
    kappas = evaluate.kappa_by_dimension(predicted, golden, {"function": function}, mask=mask)
    assert kappas["overall"] == pytest.approx(weighted_kappa(predicted[mask], golden[mask]))
    assert kappas["function"] == pytest.approx(weighted_kappa(predicted[mask], function[mask]))
    per_head = evaluate.kappa_by_dimension({"overall": predicted, "function": function}, golden,
                                           {"function": function})
    assert per_head["function"] == 1.0
    with pytest.raises(ValueError, match="unknown policy dimensions"):
        evaluate.kappa_by_dimension(predicted, golden, {"salary": golden})


def test_agreement_identical_is_perfect_and_shuffled_is_not():
    rng = np.random.default_rng(3)
    teacher_QxN = rng.random((50, 20))
    mask_QxN = np.ones((50, 20), bool)
    mask_QxN[::2, 15:] = False
    same = evaluate.agreement(teacher_QxN, teacher_QxN.copy(), mask_QxN, k=10)
    assert same == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0),
                    "overlap_at_k": 1.0, "mean_abs_diff": 0.0}
    other = evaluate.agreement(teacher_QxN, rng.random((50, 20)), mask_QxN, k=10)
    assert other["overlap_at_k"] < 0.8 and abs(other["spearman"]) < 0.2
    # A monotone transform keeps ranks: spearman and overlap stay perfect, pearson does not.
    squashed = evaluate.agreement(teacher_QxN, teacher_QxN ** 4, mask_QxN)
    assert squashed["spearman"] == pytest.approx(1.0) and squashed["overlap_at_k"] == 1.0
    assert squashed["pearson"] < 0.99
    per_head = evaluate.agreement_per_head({"relevance": teacher_QxN, "click": teacher_QxN},
                                           {"relevance": teacher_QxN}, mask_QxN)
    assert list(per_head) == ["relevance"]


def test_overlap_hand_example():
    teacher = [[0.9, 0.8, 0.1, 0.0]]
    student = [[0.9, 0.1, 0.8, 0.0]]
    assert evaluate.agreement(teacher, student, k=2)["overlap_at_k"] == 0.5
    # Only 2 valid candidates with k=3: both lists show the same two.
    assert evaluate.agreement(teacher, student, [[1, 0, 1, 0]], k=3)["overlap_at_k"] == 1.0


def test_measure_throughput_counts_items():
    calls = []

    def score_fn(batch):
        calls.append(len(batch))

    batches = [np.zeros((32, 4)), np.zeros((16, 4))]
    items_per_second = evaluate.measure_throughput(score_fn, batches, warmup=2)
    assert calls == [32, 16, 32, 16]
    assert items_per_second > 0
    dict_batches = [{"tokens": np.zeros((8, 3)), "mask": np.zeros((8, 3))}]
    assert evaluate.measure_throughput(lambda b: None, dict_batches, warmup=0) > 0


def test_summarize_is_flat():
    rng = np.random.default_rng(4)
    grades_QxN = rng.integers(0, 5, (40, 10))
    scores_QxN = grades_QxN + rng.normal(0, 1, (40, 10))
    clicks_QxN = (rng.random((40, 10)) < 0.3).astype(int)
    thresholds = evaluate.fit_grade_thresholds(scores_QxN, grades_QxN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing undefined here
        summary = evaluate.summarize(
            scores_QxN, grades_QxN, k=10,
            action_scores={"click": scores_QxN, "apply": scores_QxN},
            action_labels={"click": clicks_QxN, "apply": np.zeros((40, 10), int)},
            golden_scores=scores_QxN, golden_grades=grades_QxN,
            golden_dimension_grades={"skills": grades_QxN}, grade_thresholds=thresholds,
            teacher_scores={"relevance": scores_QxN}, student_scores={"relevance": scores_QxN},
            items_per_second=1234.0)
    assert {"ndcg_at_10", "poor_match_rate_at_10", "auroc_click", "auroc_apply", "auroc_apply_note",
            "kappa", "kappa_skills", "agreement_relevance_spearman", "items_per_second"} <= set(summary)
    assert summary["kappa"] == summary["kappa_skills"]
    assert summary["agreement_relevance_overlap_at_k"] == 1.0
    assert all(isinstance(v, (float, str)) for v in summary.values())


# --- equal to scikit-learn ------------------------------------------------------------------


def test_ndcg_auroc_and_kappa_equal_scikit_learn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(7)
    scores = rng.normal(size=(40, 12))
    grades = rng.integers(0, 5, size=(40, 12))
    grades[:, 0] = 4  # every query has a relevant candidate (sklearn scores an all-zero list 0)
    gains = 2.0 ** grades - 1  # our gain is 2^g - 1; sklearn's relevance is the gain itself
    for k in (3, 10):
        np.testing.assert_allclose(evaluate.ndcg_at_k(scores, grades, k=k),
                                   skm.ndcg_score(gains, scores, k=k), rtol=1e-9)
    labels = rng.integers(0, 2, 500)
    probs = np.round(rng.random(500) + 0.3 * labels, 2)  # ties on purpose
    assert evaluate.auroc(probs, labels) == pytest.approx(skm.roc_auc_score(labels, probs),
                                                          abs=1e-12)
    a, b = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    assert weighted_kappa(a, b) == pytest.approx(
        skm.cohen_kappa_score(a, b, weights="quadratic"), abs=1e-12)


def test_classification_metrics_equal_scikit_learn_for_2_and_3_classes():
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    for classes in (2, 3):
        logits = rng.normal(size=(200, classes))
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        labels = rng.integers(0, classes, 200)
        mask = rng.random(200) > 0.1
        out = evaluate.classification_metrics(probs, labels, mask)
        p, y = probs[mask], labels[mask]
        assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(-1)))
        assert out["macro_f1"] == pytest.approx(skm.f1_score(y, p.argmax(-1), average="macro"))
        assert out["log_loss"] == pytest.approx(skm.log_loss(y, p, labels=list(range(classes))))
        assert np.array_equal(out["confusion_matrix"], skm.confusion_matrix(y, p.argmax(-1)))
        if classes == 2:
            assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
        else:
            for c in range(classes):
                assert out[f"auroc_class_{c}"] == pytest.approx(
                    skm.roc_auc_score(y == c, p[:, c]))
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 2\); found \[2\]"):
        evaluate.classification_metrics(np.full((3, 2), 0.5), [0, 1, 2])


def test_binary_metrics_and_class_agreement():
    from sklearn import metrics as skm

    rng = np.random.default_rng(2)
    probs, labels = rng.random(300), rng.integers(0, 2, 300)
    out = evaluate.binary_metrics(probs, labels)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert out["average_precision"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert np.isnan(evaluate.binary_metrics(probs, np.ones(300))["auroc"])
    teacher = np.array([[2.0, 0.0], [0.0, 1.0]])
    same = evaluate.class_agreement(teacher, teacher)
    assert same == {"argmax_agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-12)}
    flipped = evaluate.class_agreement(teacher, teacher[:, ::-1])
    assert flipped["argmax_agreement"] == 0.0 and flipped["kl"] > 0


def test_position_rates_hand_example():
    positions = [[0, 1, 2], [0, 1, 2]]
    clicks = [[1, 0, 0], [1, 1, 0]]
    # overall rate 0.5; position 0: (2 + 0.5) / (2 + 1), 1: (1 + 0.5) / 3, 2: (0 + 0.5) / 3
    rates = evaluate.position_rates(positions, clicks, smoothing=1.0)
    np.testing.assert_allclose(rates, [2.5 / 3, 1.5 / 3, 0.5 / 3])
    masked = evaluate.position_rates(positions, clicks, [[1, 1, 1], [0, 0, 0]], smoothing=0.0)
    np.testing.assert_allclose(masked, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(evaluate.score_by_position(rates, [[2, 0, 7]]),
                               [[0.5 / 3, 2.5 / 3, 0.5 / 3]])  # beyond the fit: the last rate
    with pytest.raises(ValueError, match="one shape"):
        evaluate.position_rates([0, 1], [1])


def test_relative_score_averages_ratios_and_zeroes_missing():
    refs = {"ndcg_at_10": 0.8, "auroc_click": 0.5}
    assert evaluate.relative_score({"ndcg_at_10": 0.4, "auroc_click": 0.5}, refs) == 0.75
    assert evaluate.relative_score({"ndcg_at_10": 0.8}, refs) == 0.5
    assert evaluate.relative_score({"ndcg_at_10": 0.8, "auroc_click": float("nan")}, refs) == 0.5
    with pytest.raises(ValueError, match="must be > 0"):
        evaluate.relative_score({}, {"ndcg_at_10": 0.0})


def test_forward_flops_per_item_hand_example():
    # 2 * 1000 params * 10 tokens + 4 * 2 layers * 10^2 * 8 = 20000 + 6400
    assert evaluate.forward_flops_per_item(1000, 2, 8, 10) == 26400.0
