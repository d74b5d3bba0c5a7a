"""Tests for the policy loader, the rule oracle, the model judge and weighted kappa."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from jaxdistill import judge as judge_lib
from jaxdistill.judge import (
    LOCATION_CASES, FUNCTION_MATCHES, ModelJudge, Pairs, PolicyError, RuleOracleJudge,
    label, load_policy, weighted_kappa)

POLICY = Path(__file__).resolve().parents[1] / "configs" / "job_search" / "policy.md"


def _pairs(rows):
    """rows: (function_match, seniority_gap, skill_overlap, location_case) by name."""
    n = len(rows)
    return Pairs(
        query=[f"query {i}" for i in range(n)], member=[f"member {i}" for i in range(n)],
        document=[f"job {i}" for i in range(n)],
        hidden={
            "function_match": np.array([FUNCTION_MATCHES.index(r[0]) for r in rows]),
            "seniority_gap": np.array([r[1] for r in rows]),
            "skill_overlap": np.array([r[2] for r in rows], dtype=float),
            "location_case": np.array([LOCATION_CASES.index(r[3]) for r in rows]),
        })


ROWS = [
    ("same_title", 0, 1.0, "remote_job_wanted"),          # everything right: Perfect
    ("same_function", -1, 0.5, "remote_job"),             # 0.4*3+0.2*3+0.25*3+0.15*3 = 3.0
    ("same_title", 2, 1.0, "same_city_workplace_match"),  # two levels above: capped at 2
    ("adjacent_function", 0, 1.0, "remote_job_wanted"),   # wrong function: capped at 1
    ("same_title", 0, 1.0, "other_city"),                 # cannot work there: capped at 1
    ("unrelated", 3, 0.0, "other_city"),                  # nothing right: Irrelevant
]


@pytest.fixture(scope="module")
def policy():
    return load_policy(POLICY)


def test_policy_loads_with_hash_of_file_bytes(policy):
    assert policy.content_hash == hashlib.sha256(POLICY.read_bytes()).hexdigest()
    assert policy.rules.dimensions.function.weight == pytest.approx(0.4)
    assert "```" not in policy.text and "Perfect" in policy.text


@pytest.mark.parametrize("body, expected", [
    ("# Policy\nno rules here\n", "exactly one fenced ```yaml"),
    ("# Policy\n```yaml\nversion: [1\n```\n", "not valid YAML"),
    ("# Policy\n```yaml\n- 1\n- 2\n```\n", "expected a mapping"),
])
def test_malformed_policy_error_names_file(tmp_path, body, expected):
    path = tmp_path / "broken_policy.md"
    path.write_text(body)
    with pytest.raises(PolicyError, match=expected) as err:
        load_policy(path)
    assert str(path) in str(err.value)


def test_policy_schema_errors_name_file_and_key(tmp_path):
    text = POLICY.read_text()
    path = tmp_path / "policy.md"
    path.write_text(text.replace("thresholds: [1.0, 1.9, 2.7, 3.5]",
                                 "thresholds: [2.0, 1.9, 2.7, 3.5]"))
    with pytest.raises(PolicyError, match=r"combine\.thresholds") as err:
        load_policy(path)
    assert str(path) in str(err.value)
    path.write_text(text.replace("  temperature: 0.5", "  temprature: 0.5"))
    with pytest.raises(PolicyError, match="temprature"):
        load_policy(path)
    with pytest.raises(PolicyError, match="missing.md"):
        load_policy(tmp_path / "missing.md")


def test_rule_oracle_applies_weights_and_caps(policy):
    oracle = RuleOracleJudge(policy)
    pairs = _pairs(ROWS)
    np.testing.assert_array_equal(oracle.grades(pairs), [4, 3, 2, 1, 1, 0])
    dims = oracle.dimension_grades(pairs)
    np.testing.assert_array_equal(dims["function"], [4, 3, 4, 1, 4, 0])
    np.testing.assert_array_equal(dims["seniority"], [4, 3, 0, 4, 4, 0])
    np.testing.assert_array_equal(dims["skills"], [4, 3, 4, 4, 4, 0])
    np.testing.assert_array_equal(dims["location"], [4, 3, 4, 4, 0, 0])
    probs = oracle.grade_distribution(pairs)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_array_equal(probs.argmax(1), oracle.grades(pairs))
    assert np.all(probs.max(1) < 1.0)  # smoothed, not one-hot


def test_soft_labels_lean_towards_the_nearer_threshold(policy):
    oracle = RuleOracleJudge(policy)
    # Both grade 3; the first scores 2.8 (just above 2.7), the second 3.45 (just below 3.5).
    pairs = _pairs([("same_function", 1, 0.5, "remote_job"),
                    ("same_title", 0, 0.5, "same_city_workplace_mismatch")])
    assert list(oracle.grades(pairs)) == [3, 3]
    probs = oracle.grade_distribution(pairs)
    assert probs[0, 2] > probs[0, 4] and probs[1, 4] > probs[1, 2]


def test_policy_edit_changes_grades_and_hash(tmp_path, policy):
    edited = tmp_path / "policy.md"
    edited.write_text(POLICY.read_text().replace(
        "{dimension: function, at_most: 1, grade_cap: 1}",
        "{dimension: function, at_most: 1, grade_cap: 3}"))
    new_policy = load_policy(edited)
    assert new_policy.content_hash != policy.content_hash
    pairs = _pairs(ROWS)
    before, after = RuleOracleJudge(policy).grades(pairs), RuleOracleJudge(new_policy).grades(pairs)
    assert before[3] == 1 and after[3] == 3  # adjacent function no longer capped at Poor


def test_label_set_records_policy_hash_and_judge(policy):
    labels = label(RuleOracleJudge(policy), _pairs(ROWS))
    assert labels.policy_hash == policy.content_hash
    assert labels.judge_name == "rule_oracle"
    assert labels.grades_N.shape == (6,) and labels.grade_probs_Nx5.shape == (6, 5)


def test_model_judge_maps_p_yes_to_grades_by_thresholds(policy):
    p_yes = np.array([0.05, 0.3, 0.5, 0.7, 0.95, 0.8])
    seen = []

    def score_fn(prompts):
        seen.extend(prompts)
        return p_yes[: len(prompts)]

    judge = ModelJudge(score_fn, policy, tokenizer=None)
    pairs = _pairs(ROWS)
    np.testing.assert_array_equal(judge.grades(pairs), [0, 1, 2, 3, 4, 4])  # 0.8 is grade 4
    probs = judge.grade_distribution(pairs)
    np.testing.assert_array_equal(probs.argmax(1), [0, 1, 2, 3, 4, 4])
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert "Perfect" in seen[0] and "query 0" in seen[0] and "job 0" in seen[0]
    assert "```yaml" not in seen[0]  # the readable policy, not the rules block
    assert label(judge, pairs).judge_name == "model_judge"


def test_model_judge_uses_chat_template_and_checks_scores(policy):
    class ChatTokenizer:
        chat_template = "<chat>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    judge = ModelJudge(lambda prompts: np.full(len(prompts), 0.5), policy, ChatTokenizer())
    assert judge.prompts(_pairs(ROWS[:1]))[0].startswith("<user>")
    bad = ModelJudge(lambda prompts: np.full(len(prompts) + 1, 0.5), policy)
    with pytest.raises(ValueError, match="score_fn must return 6"):
        bad.grades(_pairs(ROWS))


def test_weighted_kappa_hand_computed():
    # 3 classes, weights (i-j)^2/4. Observed disagreement: one of three pairs off by one
    # -> 1/12. Expected: rows uniform, columns [1/3, 0, 2/3] -> (2/3 + 1/4 + 1/3)/3 = 5/12.
    assert weighted_kappa([0, 1, 2], [0, 2, 2], n_classes=3) == pytest.approx(1 - (1 / 12) / (5 / 12))
    # Two classes: quadratic weighted kappa is Cohen's kappa: (0.75 - 0.5) / (1 - 0.5).
    assert weighted_kappa([0, 0, 1, 1], [0, 1, 1, 1], n_classes=2) == pytest.approx(0.5)
    assert weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == 1.0


def _kappa_reference(a, b, k):
    """Textbook double loop over the confusion matrix."""
    n = len(a)
    observed = [[0.0] * k for _ in range(k)]
    for x, y in zip(a, b):
        observed[x][y] += 1 / n
    row = [sum(observed[i]) for i in range(k)]
    col = [sum(observed[i][j] for i in range(k)) for j in range(k)]
    num = sum((i - j) ** 2 * observed[i][j] for i in range(k) for j in range(k))
    den = sum((i - j) ** 2 * row[i] * col[j] for i in range(k) for j in range(k))
    return 1 - num / den


def test_weighted_kappa_matches_reference_and_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 500)
    b = np.clip(a + rng.integers(-1, 2, 500) * (rng.random(500) < 0.3), 0, 4)
    assert weighted_kappa(a, b) == pytest.approx(_kappa_reference(a.tolist(), b.tolist(), 5))
    assert weighted_kappa(a, b) == pytest.approx(weighted_kappa(b, a))
    assert abs(weighted_kappa(a, rng.permutation(a))) < 0.1  # chance agreement near 0
    with pytest.raises(ValueError, match="equal-length"):
        weighted_kappa([0, 1], [0])


def test_judge_protocol_is_satisfied(policy):
    judges: list[judge_lib.Judge] = [RuleOracleJudge(policy),
                                     ModelJudge(lambda p: np.zeros(len(p)), policy)]
    for judge in judges:
        assert judge.grade_distribution(_pairs(ROWS)).shape == (6, 5)


def test_model_judge_scores_with_a_decoder_of_ours():
    """lm_score_fn: p(Yes) from a real (tiny, random) decoder, equal to its token-score head."""
    import jax

    from jaxdistill.data.tokenizer import load_tokenizer, yes_no_token_ids
    from jaxdistill.judge import ModelJudge, Pairs, lm_score_fn, load_policy
    from jaxdistill.models.model import ModelConfig, functional

    tokenizer = load_tokenizer("builtin:wordpiece")
    yes_id, no_id = yes_no_token_ids(tokenizer)
    model = functional(ModelConfig(
        backbone={"type": "decoder", "vocab_size": len(tokenizer), "hidden": 32, "layers": 1,
                  "heads": 2, "kv_heads": 1, "head_dim": 16, "mlp": 64, "dtype": "float32"},
        heads={"relevance": {"type": "token_score", "token_ids": (no_id, yes_id)}}))
    params = model.init(0)
    score = lm_score_fn(model, params, tokenizer, max_len=64, batch_size=4)
    policy = load_policy(POLICY)
    pairs = Pairs(query=["data scientist remote"] * 5, member=["senior data scientist"] * 5,
                  document=[f"job {i} python sql" for i in range(5)])
    judge = ModelJudge(score, policy)
    p_yes = judge.p_yes(pairs)
    # The same probabilities through the model's own token-score head on the same tokens.
    enc = tokenizer(judge.prompts(pairs), padding="max_length", truncation=True, max_length=64,
                    truncation_side="left", return_tensors="np", add_special_tokens=False)
    logits = model.apply(params, {"input_ids": enc["input_ids"].astype("int32"),
                                  "attention_mask": enc["attention_mask"].astype("int32")})
    expected = jax.nn.softmax(logits["relevance"], axis=-1)[:, 1]
    np.testing.assert_allclose(p_yes, expected, rtol=1e-5)
    assert judge.grades(pairs).shape == (5,)
    np.testing.assert_allclose(judge.grade_distribution(pairs).sum(-1), 1.0, rtol=1e-6)


def test_dimension_distribution_peaks_at_each_dimension_grade(policy):
    oracle = RuleOracleJudge(policy)
    pairs = _pairs(ROWS)
    dims, soft = oracle.dimension_grades(pairs), oracle.dimension_distribution(pairs)
    assert set(soft) == set(judge_lib.DIMENSIONS)
    for d in judge_lib.DIMENSIONS:
        assert soft[d].shape == (len(ROWS), 5)
        np.testing.assert_allclose(soft[d].sum(axis=1), 1.0)
        np.testing.assert_array_equal(soft[d].argmax(axis=1), dims[d])
    # exp(-(g - c)^2 / T) at T = 0.5: a neighbour gets e^-2 of the peak's mass.
    row = soft["function"][0]  # same title: grade 4
    assert row[3] / row[4] == pytest.approx(np.exp(-2.0))
