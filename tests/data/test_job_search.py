"""Tests for the built-in job-search workload: determinism, labels, text, engagement, golden."""
from pathlib import Path

import numpy as np
import pytest

from jaxdistill import judge as judge_lib
from jaxdistill.data import job_search as js
from jaxdistill.data.records import validate_record

POLICY = Path(__file__).resolve().parents[2] / "configs" / "job_search" / "policy.md"
SMALL = dict(n_members=400, n_jobs=600, train_queries=150, validation_queries=20,
             test_queries=20, golden_queries=20)


@pytest.fixture(scope="module")
def laptop():
    return js.generate_splits(js.JobSearchConfig.preset("laptop"))


def _candidates(records):
    return [c for r in records for c in r["candidates"]]


def _column(candidates, get):
    return np.array([get(c) for c in candidates])


def _visible(record):
    """What a model sees: the record without the evaluation-only hidden dicts."""
    return {**record, "candidates": [{k: v for k, v in c.items() if k != "hidden"}
                                     for c in record["candidates"]]}


def test_laptop_sizes_and_schema(laptop):
    config = js.JobSearchConfig.preset("laptop")
    assert set(laptop) == set(js.SPLITS)
    assert len(laptop["train"]) == config.train_queries
    assert all(len(r["candidates"]) == config.list_size for r in laptop["train"])
    assert 2000 <= len(_candidates(laptop["golden"])) <= 5000
    for i, record in enumerate(laptop["train"][:200] + laptop["golden"][:50]):
        validate_record("listwise", record, source="job_search", index=i)
        assert len(record["member_features"]) == len(js.MEMBER_FEATURE_NAMES)
        assert sorted(c["position"] for c in record["candidates"]) == list(range(config.list_size))
    assert laptop.metadata["policy_hash"] == judge_lib.load_policy(POLICY).content_hash
    assert laptop.metadata["judge"] == "rule_oracle"


def test_same_seed_same_records_different_seed_differs():
    a = js.generate_splits(js.JobSearchConfig(**SMALL))
    b = js.generate_splits(js.JobSearchConfig(**SMALL))
    c = js.generate_splits(js.JobSearchConfig(**SMALL, seed=1))
    assert a == b and a.metadata == b.metadata
    assert a["train"] != c["train"]


def test_grades_cover_all_levels(laptop):
    grades = _column(_candidates(laptop["train"]), lambda c: c["grade"])
    shares = np.bincount(grades, minlength=5) / len(grades)
    assert shares.min() >= 0.03, shares
    for c in _candidates(laptop["train"][:300]):
        assert np.argmax(c["grade_probs"]) == c["grade"]


def test_models_see_no_hidden_variables(laptop):
    hidden_names = ("hidden", "oracle_grade", "dimension_grades", "attractiveness", "glamour",
                    "utility", "function_match", "location_case", "job_id", "member_id")
    for record in laptop["train"][:200]:
        visible = _visible(record)
        assert set(visible) == {"query", "member", "member_features", "candidates"}
        assert all(set(c) == {"document", "grade", "grade_probs", "position", "actions",
                              "offline"} for c in visible["candidates"])
        texts = [visible["query"], visible["member"]] + [c["document"] for c in visible["candidates"]]
        assert not any(name in text.lower() for text in texts for name in hidden_names)


def test_function_match_is_readable_from_text():
    """With typos off, the query's title and the job's title text give the function match."""
    splits = js.generate_splits(js.JobSearchConfig(**SMALL, typo_rate=0.0))
    form_to_title = {form: t for f in js.FUNCTIONS for t, forms in f.titles.items() for form in forms}
    title_to_function = {t: f.name for f in js.FUNCTIONS for t in f.titles}
    adjacent = {frozenset(p) for p in js.ADJACENT_PAIRS}
    for record in splits["train"]:
        query = " " + record["query"] + " "
        typed = max((f for f in form_to_title if f" {f} " in query), key=len)
        wanted = form_to_title[typed]
        for c in record["candidates"]:
            heading = c["document"].split(" at ")[0].lower()
            job_title = max((t for t in title_to_function if heading.endswith(t)), key=len)
            a, b = title_to_function[wanted], title_to_function[job_title]
            expected = ("same_title" if job_title == wanted else "same_function" if a == b
                        else "adjacent_function" if frozenset((a, b)) in adjacent else "unrelated")
            assert c["hidden"]["function_match"] == expected, (record["query"], c["document"])


def test_queries_look_typed(laptop):
    queries = [r["query"] for r in laptop["train"]]
    assert any(q.split()[0] in ("sr", "jr") for q in queries)
    assert any(w in q.split() for q in queries for w in ("swe", "nyc", "sf", "ds", "pm"))
    known = {w for f in js.FUNCTIONS for forms in f.titles.values() for form in forms
             for w in form.split()}
    words = {w for q in queries for w in q.split()}
    assert len(words - known) > 50  # typos, places, seniority words
    assert 0.9 < np.mean([q == q.lower() for q in queries]) <= 1.0


def test_click_rate_decreases_with_position_at_equal_grade(laptop):
    cands = _candidates(laptop["train"])
    grade = _column(cands, lambda c: c["grade"])
    position = _column(cands, lambda c: c["position"])
    click = _column(cands, lambda c: c["actions"]["click"])
    for g in (1, 2, 3):
        top = click[(grade == g) & (position <= 2)].mean()
        bottom = click[(grade == g) & (position >= 6)].mean()
        assert top > 2 * bottom, (g, top, bottom)


def test_engagement_is_relevance_correlated_but_not_relevance(laptop):
    cands = _candidates(laptop["train"])
    grade = _column(cands, lambda c: c["grade"])
    attractive = _column(cands, lambda c: c["hidden"]["attractiveness"])
    actions = {a: _column(cands, lambda c, a=a: c["actions"][a]) for a in js.ACTIONS}
    click, apply, dismiss = actions["click"], actions["apply"], actions["dismiss"]
    poor = grade <= 1
    # Attractive-but-poor matches draw clicks; plain poor ones hardly do.
    assert click[poor & (attractive > 1.5)].mean() > 0.05
    assert click[poor & (attractive > 1.5)].mean() > 4 * click[poor & (attractive < 0)].mean()
    # Rare actions are rare, and land where the policy says they should.
    assert apply.mean() < 0.5 * click.mean() and apply.mean() < 0.03
    assert apply[grade >= 3].sum() / apply.sum() > 0.85
    assert dismiss.mean() < 0.1
    assert dismiss[poor].sum() / dismiss.sum() > 0.6
    assert dismiss[poor].mean() > 3 * dismiss[grade >= 3].mean()
    assert not np.any(apply & ~click) and not np.any(dismiss & click)
    assert click[grade == 4].mean() > click[grade == 0].mean()


def test_splits_are_disjoint_by_query_and_member(laptop):
    members = {name: {c["hidden"]["member_id"] for c in _candidates(records)}
               for name, records in laptop.items()}
    for a in js.SPLITS:
        for b in js.SPLITS:
            if a < b:
                assert not members[a] & members[b], (a, b)


def test_golden_agrees_with_clean_oracle_but_not_perfectly(laptop):
    golden = _candidates(laptop["golden"])
    noisy = _column(golden, lambda c: c["grade"])
    clean = _column(golden, lambda c: c["hidden"]["oracle_grade"])
    kappa = judge_lib.weighted_kappa(noisy, clean)
    assert 0.85 < kappa < 0.995, kappa
    assert np.all(np.abs(noisy - clean) <= 1)


def test_policy_edit_changes_labels_and_hash(tmp_path):
    edited = tmp_path / "policy.md"
    edited.write_text(POLICY.read_text().replace(
        "thresholds: [1.0, 1.9, 2.7, 3.5]", "thresholds: [1.0, 1.9, 2.7, 3.2]"))
    base = js.generate_splits(js.JobSearchConfig(**SMALL))
    changed = js.generate_splits(js.JobSearchConfig(**SMALL, policy_path=str(edited)))
    assert base.metadata["policy_hash"] != changed.metadata["policy_hash"]
    before = _column(_candidates(base["train"]), lambda c: c["grade"])
    after = _column(_candidates(changed["train"]), lambda c: c["grade"])
    assert np.any(before != after) and np.all(after >= before)
    # The world itself (texts, positions, actions) does not depend on the policy.
    assert [r["query"] for r in base["train"]] == [r["query"] for r in changed["train"]]


def test_malformed_policy_fails_naming_file(tmp_path):
    bad = tmp_path / "no_rules.md"
    bad.write_text("# A policy without its rules block\n")
    with pytest.raises(judge_lib.PolicyError, match="no_rules.md"):
        js.generate_splits(js.JobSearchConfig(**SMALL, policy_path=str(bad)))


def test_labels_come_from_the_judge_passed_in():
    policy = judge_lib.load_policy(POLICY)
    model_judge = judge_lib.ModelJudge(lambda prompts: np.full(len(prompts), 0.65), policy)
    splits = js.generate_splits(js.JobSearchConfig(**SMALL), judge=model_judge)
    assert splits.metadata["judge"] == "model_judge"
    assert {c["grade"] for c in _candidates(splits["train"])} == {3}
    # A judge without per-dimension grades leaves no per-dimension labels to distil.
    assert not any("offline" in c for c in _candidates(splits["train"]))
    assert len({c["grade"] for c in _candidates(splits["golden"])}) > 1  # golden: oracle + noise


def test_presets_and_config_errors():
    full = js.JobSearchConfig.preset("full")
    assert full.train_queries * full.list_size >= 1_000_000
    with pytest.raises(ValueError, match="unknown job-search preset"):
        js.JobSearchConfig.preset("huge")
    with pytest.raises(ValueError, match="list_sise"):
        js.JobSearchConfig(list_sise=5)


def test_dimension_labels_name_their_grader():
    """Train pairs carry the judge's per-dimension log-probs, peaked at the oracle's dimension
    grades; golden pairs the annotators' (one-hot); golden_train is disjoint from golden."""
    splits = js.generate_splits(js.JobSearchConfig(**SMALL, golden_train_queries=12))
    assert len(splits["golden_train"]) == 12
    for split, grader in (("train", "judge"), ("golden", "annotators"),
                          ("golden_train", "annotators")):
        for c in _candidates(splits[split])[:300]:
            assert set(c["offline"]) == {grader}
            for d, log_probs in c["offline"][grader].items():
                probs = np.exp(log_probs)
                assert abs(probs.sum() - 1) < 2e-3 * (5 if grader == "annotators" else 1)
                assert np.argmax(probs) == c["hidden"]["dimension_grades"][d]
                if grader == "annotators":
                    assert probs.max() > 0.999
    members = {split: {c["hidden"]["member_id"] for c in _candidates(splits[split])}
               for split in js.GOLDEN_SPLITS}
    assert not members["golden"] & members["golden_train"]


def test_text_is_uncased_so_a_typed_title_is_the_documents_words():
    """A query typing the canonical title finds the same tokens in a same-title job."""
    splits = js.generate_splits(js.JobSearchConfig(**SMALL, typo_rate=0.0))
    checked = 0
    for record in splits["train"]:
        assert record["member"] == record["member"].lower()
        for c in record["candidates"]:
            assert c["document"] == c["document"].lower()
            title = " ".join(c["document"].split(" at ")[0].split()[-2:])
            if c["hidden"]["function_match"] == "same_title" and f"{title}" in record["query"]:
                checked += 1
    assert checked > 20
