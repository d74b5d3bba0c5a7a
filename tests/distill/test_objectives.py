"""Objectives: weight schedules, term validation, transforms, the weighted total and its errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

from jaxdistill.distill import losses
from jaxdistill.distill.objectives import (
    Term,
    WeightSchedule,
    apply_transform,
    compute_objective,
    confidence_weights,
)

B, C, K = 6, 2, 3


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "s_rel_BxC": rng.normal(size=(B, C)).astype(np.float32),
        "t_rel_BxC": rng.normal(size=(B, C)).astype(np.float32) * 2,
        "s_act_BxK": rng.normal(size=(B, K)).astype(np.float32),
        "t_act_BxK": rng.normal(size=(B, K)).astype(np.float32),
        "clicks_BxK": (rng.random((B, K)) > 0.5).astype(np.float32),
        "grade_B": rng.integers(0, C, size=(B,)).astype(np.int32),
    }


# ------------------------------------------------------------------ weight schedules


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        (WeightSchedule(kind="constant", start=0.3, end=5.0), 0, 0.3),
        (WeightSchedule(kind="constant", start=0.3, end=5.0), 10_000, 0.3),
        (WeightSchedule(kind="linear", start=0.0, end=2.0, steps=10), 0, 0.0),
        (WeightSchedule(kind="linear", start=0.0, end=2.0, steps=10), 5, 1.0),
        (WeightSchedule(kind="linear", start=0.0, end=2.0, steps=10), 10, 2.0),
        (WeightSchedule(kind="linear", start=0.0, end=2.0, steps=10), 25, 2.0),  # held at end
        (WeightSchedule(kind="linear", start=1.0, end=0.0, steps=4), 1, 0.75),  # decreasing
        (WeightSchedule(kind="cosine", start=1.0, end=3.0, steps=10), 0, 1.0),
        (WeightSchedule(kind="cosine", start=1.0, end=3.0, steps=10), 5, 2.0),
        (WeightSchedule(kind="cosine", start=1.0, end=3.0, steps=10), 2,
         1.0 + 2.0 * 0.5 * (1 - math.cos(math.pi * 0.2))),
        (WeightSchedule(kind="cosine", start=1.0, end=3.0, steps=10), 10, 3.0),
        (WeightSchedule(kind="cosine", start=1.0, end=3.0, steps=10), 99, 3.0),
    ],
)
def test_weight_schedule_values(schedule, step, expected):
    value = schedule(jnp.asarray(step, jnp.int32))
    np.testing.assert_allclose(float(value), expected, rtol=1e-6, atol=1e-7)
    # The same value under jit with a traced step (the fused step's case).
    np.testing.assert_allclose(float(jax.jit(schedule)(jnp.asarray(step))), expected, rtol=1e-6,
                               atol=1e-7)


def test_weight_schedule_validation():
    with pytest.raises(ValidationError, match="start"):
        WeightSchedule(kind="linear", start=-0.1)
    with pytest.raises(ValidationError, match="steps"):
        WeightSchedule(kind="linear", steps=0)
    with pytest.raises(ValidationError, match="kind"):
        WeightSchedule(kind="exponential")
    with pytest.raises(ValidationError, match="stpes"):
        WeightSchedule(kind="linear", stpes=3)


def test_term_weight_at_scheduled():
    term = Term(name="r", loss="forward_kl", student="relevance", teacher="rel",
                weight=WeightSchedule(kind="linear", start=0.0, end=1.0, steps=4))
    assert float(term.weight_at(jnp.asarray(2))) == pytest.approx(0.5)
    fixed = Term(name="r", loss="forward_kl", student="relevance", teacher="rel", weight=0.25)
    assert float(fixed.weight_at(jnp.asarray(2))) == pytest.approx(0.25)


# ------------------------------------------------------------------ term validation


def test_term_unknown_loss_lists_known_losses():
    with pytest.raises(ValidationError) as err:
        Term(name="rel", loss="kl_forward", student="relevance", teacher="rel")
    message = str(err.value)
    assert "kl_forward" in message and "'rel'" in message
    for known in losses.LOSSES:
        assert known in message


def test_term_needs_exactly_one_of_teacher_or_label():
    with pytest.raises(ValidationError, match="exactly one of 'teacher' or 'label'"):
        Term(name="both", loss="bce", student="actions", teacher="eng", label="clicks")
    with pytest.raises(ValidationError, match="exactly one of 'teacher' or 'label'"):
        Term(name="neither", loss="bce", student="actions")


def test_term_negative_weight_refused():
    with pytest.raises(ValidationError, match=r"weight must be >= 0, got -0.5"):
        Term(name="r", loss="forward_kl", student="relevance", teacher="rel", weight=-0.5)
    with pytest.raises(ValidationError, match="start"):
        Term(name="r", loss="forward_kl", student="relevance", teacher="rel",
             weight={"kind": "linear", "start": -1.0})


@pytest.mark.parametrize(
    "loss, hparams, match",
    [
        ("forward_kl", {"temperature": 0.0}, "temperature must be a number > 0"),
        ("forward_kl", {"temperature": -1.0}, "temperature must be a number > 0"),
        ("forward_kl", {"temperature": "hot"}, "temperature"),
        ("forward_kl", {"temprature": 2.0}, "unknown hyper-parameter.*temprature"),
        ("logit_mse", {"temperature": 2.0}, "unknown hyper-parameter.*temperature"),
        ("jsd", {"beta": 1.5}, "beta must be a number in"),
        ("cross_entropy", {"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_term_bad_hparams(loss, hparams, match):
    teacher_or_label = {"label": "grade"} if loss == "cross_entropy" else {"teacher": "rel"}
    with pytest.raises(ValidationError, match=match):
        Term(name="t", loss=loss, student="relevance", hparams=hparams, **teacher_or_label)


def test_term_other_validation():
    with pytest.raises(ValidationError, match="confidence_label needs a teacher"):
        Term(name="t", loss="bce", student="actions", label="clicks", confidence_label="clicks")
    with pytest.raises(ValidationError, match="teachr"):  # unknown keys refused
        Term(name="t", loss="bce", student="actions", teachr="eng")
    with pytest.raises(ValidationError, match="transform"):
        Term(name="t", loss="bce", student="actions", teacher="eng", transform="logit")
    term = Term(name="t", loss="soft_bce", student="actions", teacher="eng")
    assert term.source_output == "actions"
    renamed = Term(name="t", loss="soft_bce", student="actions", teacher="eng",
                   teacher_output="engagement")
    assert renamed.source_output == "engagement"


# ------------------------------------------------------------------ transforms


def test_transforms():
    logits_Bx2 = jnp.asarray([[0.5, 2.0], [3.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(apply_transform(logits_Bx2, "log_odds"), [1.5, -4.0, 0.0],
                               rtol=1e-6)
    p_yes = apply_transform(logits_Bx2, "yes_prob")
    np.testing.assert_allclose(p_yes, jax.nn.softmax(logits_Bx2, axis=-1)[:, 1], rtol=1e-6)
    np.testing.assert_allclose(p_yes, [1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(4.0)), 0.5],
                               rtol=1e-6)
    assert apply_transform(logits_Bx2, None) is logits_Bx2
    # bf16 logits are transformed in fp32.
    assert apply_transform(logits_Bx2.astype(jnp.bfloat16), "log_odds").dtype == jnp.float32
    # Leading dims are kept: a listwise [B, N, 2] becomes [B, N].
    assert apply_transform(jnp.zeros((2, 5, 2)), "log_odds").shape == (2, 5)
    with pytest.raises(ValueError, match=r"\(No, Yes\) logits, got \(3, 3\)"):
        apply_transform(jnp.zeros((3, 3)), "yes_prob")


# ------------------------------------------------------------------ compute_objective


def _terms():
    return (
        Term(name="relevance_teacher", loss="forward_kl", student="relevance", teacher="rel",
             hparams={"temperature": 2.0}, weight=0.7),
        Term(name="engagement_teacher", loss="soft_bce", student="actions", teacher="eng",
             weight=WeightSchedule(kind="linear", start=0.0, end=2.0, steps=10)),
        Term(name="clicks", loss="bce", student="actions", label="clicks", mask="shown",
             weight=0.3),
        Term(name="grade", loss="cross_entropy", student="relevance", label="grade"),
    )


def test_compute_objective_total_is_weighted_sum_of_terms():
    a = _arrays()
    shown_BxK = np.ones((B, K), np.float32)
    shown_BxK[0] = 0
    student = {"relevance": a["s_rel_BxC"], "actions": a["s_act_BxK"], "pooled": np.zeros((B, 4))}
    teachers = {"rel": {"relevance": a["t_rel_BxC"]}, "eng": {"actions": a["t_act_BxK"]}}
    batch = {"clicks": a["clicks_BxK"], "shown": shown_BxK, "grade": a["grade_B"]}
    step = jnp.asarray(5)
    total, metrics = compute_objective(_terms(), student, teachers, batch, step)

    expected = {
        "loss/relevance_teacher": losses.forward_kl(a["s_rel_BxC"], a["t_rel_BxC"],
                                                    temperature=2.0),
        "loss/engagement_teacher": losses.soft_binary_cross_entropy(a["s_act_BxK"],
                                                                    a["t_act_BxK"]),
        "loss/clicks": losses.binary_cross_entropy(a["s_act_BxK"], a["clicks_BxK"], shown_BxK),
        "loss/grade": losses.cross_entropy(a["s_rel_BxC"], a["grade_B"]),
    }
    assert set(metrics) == set(expected) | {"loss/total"}
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)
    # The masked row counts: the clicks term differs from the unmasked one.
    assert abs(float(metrics["loss/clicks"]) - float(
        losses.binary_cross_entropy(a["s_act_BxK"], a["clicks_BxK"]))) > 1e-4
    weights = {"relevance_teacher": 0.7, "engagement_teacher": 1.0, "clicks": 0.3, "grade": 1.0}
    weighted = sum(w * float(expected[f"loss/{n}"]) for n, w in weights.items())
    np.testing.assert_allclose(total, weighted, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/total"], total, rtol=0)
    # The schedule is read at the given step.
    total_0, _ = compute_objective(_terms(), student, teachers, batch, jnp.asarray(0))
    np.testing.assert_allclose(
        total_0, weighted - float(expected["loss/engagement_teacher"]), rtol=1e-6)


def test_compute_objective_teacher_is_not_differentiated():
    a = _arrays(1)
    terms = _terms()[:2]

    def total(student, teachers):
        return compute_objective(terms, student, teachers, {}, jnp.asarray(10))[0]

    student = {"relevance": a["s_rel_BxC"], "actions": a["s_act_BxK"]}
    teachers = {"rel": {"relevance": a["t_rel_BxC"]}, "eng": {"actions": a["t_act_BxK"]}}
    g_student, g_teachers = jax.grad(total, argnums=(0, 1))(student, teachers)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_student))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_teachers))


def test_compute_objective_transform_applies_to_both_sides():
    a = _arrays(2)
    s_score_B = a["s_rel_BxC"][:, 1] - a["s_rel_BxC"][:, 0]
    t_score_B = a["t_rel_BxC"][:, 1] - a["t_rel_BxC"][:, 0]
    term_prob = Term(name="p", loss="bce", student="relevance", label="p_yes",
                     transform="log_odds")
    target_B = jax.nn.sigmoid(t_score_B)
    _, metrics = compute_objective(
        (term_prob,), {"relevance": a["s_rel_BxC"]}, {}, {"p_yes": target_B}, jnp.asarray(0))
    np.testing.assert_allclose(
        metrics["loss/p"], losses.binary_cross_entropy(s_score_B, target_B), rtol=1e-6)
    # Teacher side transformed too: log-odds scores of both, as a listwise [1, B] list.
    listwise = Term(name="l", loss="listnet", student="relevance", teacher="rel",
                    transform="log_odds")
    _, metrics = compute_objective(
        (listwise,), {"relevance": a["s_rel_BxC"][None]},
        {"rel": {"relevance": a["t_rel_BxC"][None]}}, {}, jnp.asarray(0))
    np.testing.assert_allclose(
        metrics["loss/l"],
        losses.listwise_softmax_cross_entropy(s_score_B[None], t_score_B[None]), rtol=1e-6)


def test_compute_objective_offline_teacher_and_precedence():
    a = _arrays(3)
    term = _terms()[0]
    student = {"relevance": a["s_rel_BxC"]}
    online = {"rel": {"relevance": a["t_rel_BxC"]}}
    offline_batch = {"offline": {"rel": {"relevance": a["t_rel_BxC"]}}}
    _, m_online = compute_objective((term,), student, online, {}, jnp.asarray(0))
    _, m_offline = compute_objective((term,), student, {}, offline_batch, jnp.asarray(0))
    np.testing.assert_allclose(m_offline["loss/relevance_teacher"],
                               m_online["loss/relevance_teacher"], rtol=0)
    # Online outputs take precedence over a stale offline cache of the same teacher.
    stale = {"offline": {"rel": {"relevance": -a["t_rel_BxC"]}}}
    _, m_both = compute_objective((term,), student, online, stale, jnp.asarray(0))
    np.testing.assert_allclose(m_both["loss/relevance_teacher"],
                               m_online["loss/relevance_teacher"], rtol=0)


def test_compute_objective_missing_inputs_name_what_is_missing():
    a = _arrays()
    student = {"relevance": a["s_rel_BxC"], "actions": a["s_act_BxK"]}
    teachers = {"rel": {"relevance": a["t_rel_BxC"]}}
    step = jnp.asarray(0)

    head = Term(name="h", loss="forward_kl", student="relevence", teacher="rel")
    with pytest.raises(KeyError, match=r"student has no head 'relevence'.*'actions', 'relevance'"):
        compute_objective((head,), student, teachers, {}, step)

    teacher = Term(name="e", loss="soft_bce", student="actions", teacher="eng")
    with pytest.raises(KeyError, match=r"teacher 'eng' is neither online nor in "
                                       r"batch\['offline'\] \(offline teachers: \['other'\]\)"):
        compute_objective((teacher,), student, teachers, {"offline": {"other": {}}}, step)

    output = Term(name="o", loss="forward_kl", student="relevance", teacher="rel",
                  teacher_output="grade_logits")
    with pytest.raises(KeyError, match=r"teacher 'rel' has no output 'grade_logits'.*relevance"):
        compute_objective((output,), student, teachers, {}, step)

    label = Term(name="c", loss="bce", student="actions", label="clicks")
    with pytest.raises(KeyError, match=r"term 'c' reads batch key 'clicks', batch has \['shown'\]"):
        compute_objective((label,), student, teachers, {"shown": a["clicks_BxK"]}, step)

    mask = Term(name="m", loss="bce", student="actions", label="clicks", mask="shown")
    with pytest.raises(KeyError, match=r"term 'm' reads batch key 'shown'"):
        compute_objective((mask,), student, teachers, {"clicks": a["clicks_BxK"]}, step)


# ------------------------------------------------------------------ confidence weights


def test_confidence_weights_binary():
    teacher_BxK = jnp.asarray([[4.0, -4.0], [4.0, -4.0], [0.0, 0.0]])
    labels_BxK = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    w = confidence_weights(teacher_BxK, labels_BxK, None)
    assert w.shape == (3, 2)
    np.testing.assert_allclose(jnp.mean(w), 1.0, rtol=1e-6)
    # Agreeing entries (row 0) weigh more than uncertain ones (row 2) than disagreeing (row 1).
    assert float(w[0, 0]) > float(w[2, 0]) > float(w[1, 0])
    p = jax.nn.sigmoid(4.0)
    agreement = np.asarray([[p, p], [1 - p, 1 - p], [0.5, 0.5]])
    np.testing.assert_allclose(w, agreement / agreement.mean(), rtol=1e-5)

    mask_BxK = jnp.asarray([[1, 1], [0, 0], [1, 1]])
    wm = confidence_weights(teacher_BxK, labels_BxK, mask_BxK)
    np.testing.assert_allclose(wm[1], 0.0)
    np.testing.assert_allclose(jnp.sum(wm) / jnp.sum(mask_BxK), 1.0, rtol=1e-6)  # mean 1 on valid


def test_confidence_weights_classes_and_no_gradient():
    teacher_BxC = jnp.asarray([[0.0, 3.0], [0.0, 3.0], [2.0, 0.0], [0.0, 0.0]])
    labels_B = jnp.asarray([1, 0, 0, 1])
    w = confidence_weights(teacher_BxC, labels_B, None)
    assert w.shape == (4,)
    np.testing.assert_allclose(jnp.mean(w), 1.0, rtol=1e-6)
    assert float(w[0]) > float(w[2]) > float(w[3]) > float(w[1])
    grad = jax.grad(lambda t: jnp.sum(confidence_weights(t, labels_B, None) * jnp.arange(4.0)))(
        teacher_BxC)
    np.testing.assert_allclose(grad, 0.0)


def test_confidence_label_weights_the_term():
    """A term with `confidence_label` is the per-example weighted mean of the loss."""
    a = _arrays(4)
    term = Term(name="r", loss="forward_kl", student="relevance", teacher="rel",
                confidence_label="grade")
    plain = Term(name="r", loss="forward_kl", student="relevance", teacher="rel")
    student = {"relevance": a["s_rel_BxC"]}
    teachers = {"rel": {"relevance": a["t_rel_BxC"]}}
    batch = {"grade": a["grade_B"]}
    _, weighted = compute_objective((term,), student, teachers, batch, jnp.asarray(0))
    _, unweighted = compute_objective((plain,), student, teachers, batch, jnp.asarray(0))

    w_B = np.asarray(confidence_weights(a["t_rel_BxC"], a["grade_B"], None))
    per_row_B = np.asarray([
        losses.forward_kl(a["s_rel_BxC"][i:i + 1], a["t_rel_BxC"][i:i + 1]) for i in range(B)
    ])
    np.testing.assert_allclose(unweighted["loss/r"], per_row_B.mean(), rtol=1e-5)
    np.testing.assert_allclose(weighted["loss/r"], (w_B * per_row_B).mean(), rtol=1e-5)
    assert abs(float(weighted["loss/r"]) - float(unweighted["loss/r"])) > 1e-3

    # Per-entry weights for a multi-action term, with a mask.
    eng = Term(name="e", loss="soft_bce", student="actions", teacher="eng",
               confidence_label="clicks", mask="shown")
    shown_BxK = np.ones((B, K), np.float32)
    shown_BxK[1, :2] = 0
    _, m = compute_objective((eng,), {"actions": a["s_act_BxK"]},
                             {"eng": {"actions": a["t_act_BxK"]}},
                             {"clicks": a["clicks_BxK"], "shown": shown_BxK}, jnp.asarray(0))
    w_BxK = np.asarray(confidence_weights(a["t_act_BxK"], a["clicks_BxK"], shown_BxK))
    per_entry_BxK = np.asarray(jax.vmap(jax.vmap(
        lambda s, t: losses.soft_binary_cross_entropy(s[None], t[None])))(
            a["s_act_BxK"], a["t_act_BxK"]))
    np.testing.assert_allclose(m["loss/e"], (w_BxK * per_entry_BxK).sum() / shown_BxK.sum(),
                               rtol=1e-5)


# ------------------------------------------------------------ rare-action masking, hard grades


def _bce(logits, targets):
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return -(targets * np.log(p) + (1 - targets) * np.log(1 - p))


def test_given_counts_an_action_only_where_its_precondition_happened():
    # apply (column 0) only where click (column 1) is 1; click and dismiss everywhere valid.
    rng = np.random.default_rng(3)
    logits_BxNxK = rng.normal(size=(2, 4, K)).astype(np.float32)
    labels_BxNxK = (rng.random((2, 4, K)) > 0.5).astype(np.float32)
    action_mask_BxNxK = np.ones((2, 4, K), np.float32)
    action_mask_BxNxK[1, 3] = 0  # a padded candidate
    term = Term(name="actions", loss="bce", student="actions", label="actions",
                mask="action_mask", given_columns=((0, 1),))
    batch = {"actions": jnp.asarray(labels_BxNxK), "action_mask": jnp.asarray(action_mask_BxNxK)}
    total, _ = compute_objective((term,), {"actions": jnp.asarray(logits_BxNxK)}, {}, batch,
                                 jnp.asarray(0))
    keep_BxNxK = action_mask_BxNxK.copy()
    keep_BxNxK[..., 0] *= labels_BxNxK[..., 1]
    expected = (_bce(logits_BxNxK, labels_BxNxK) * keep_BxNxK).sum() / keep_BxNxK.sum()
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    # A per-row mask (candidate_mask [B, N]) is broadcast over the actions first.
    row_mask = jnp.asarray(action_mask_BxNxK[..., 0])
    from jaxdistill.distill.objectives import given_mask
    np.testing.assert_array_equal(
        np.asarray(given_mask(row_mask, batch["actions"], ((0, 1),), (2, 4, K))), keep_BxNxK)


def test_given_names_resolve_against_the_action_names(tmp_path):
    from jaxdistill import config as config_lib

    raw = {"name": "e", "model": {"backbone": {"type": "decoder", "family": "qwen3",
                                               "vocab_size": 64, "hidden": 16, "layers": 1,
                                               "heads": 2, "kv_heads": 1, "head_dim": 8,
                                               "mlp": 32},
                                  "heads": {"actions": {"type": "actions",
                                                        "names": ["apply", "click", "dismiss"],
                                                        "features": 0}}},
           "data": {"path": "x", "tokenizer": "x", "kind": "listwise",
                    "action_names": ["apply", "click", "dismiss"]},
           "objective": [{"name": "a", "loss": "bce", "student": "actions", "label": "actions",
                          "given": {"dismiss": "apply"}}]}
    assert config_lib.validate(raw, source="e.yaml").objective[0].given_columns == ((2, 0),)
    raw["objective"][0]["given"] = {"apply": "view"}
    with pytest.raises(config_lib.ConfigError, match=r"\['view'\] are not in data.action_names"):
        config_lib.validate(raw, source="e.yaml")
    with pytest.raises(ValidationError, match="per-entry losses"):
        Term(name="l", loss="listnet", student="r", label="grade", given={"apply": "click"})


def test_grades_argmax_to_yes_no_is_the_one_hot_grade_target():
    from jaxdistill.distill.objectives import label_view

    probs_Bx5 = jnp.asarray([[0.1, 0.2, 0.3, 0.35, 0.05], [0.6, 0.1, 0.1, 0.1, 0.1]])
    hard = np.exp(np.asarray(label_view(probs_Bx5, "grades_argmax_to_yes_no")))
    np.testing.assert_allclose(hard[:, 1], [3 / 4, 1e-6], rtol=1e-5)  # p(Yes) = grade / 4
    np.testing.assert_allclose(hard.sum(-1), 1.0, rtol=1e-6)
    soft = np.exp(np.asarray(label_view(probs_Bx5, "grades_to_yes_no")))
    np.testing.assert_allclose(soft[0, 1], (0.2 + 0.6 + 1.05 + 0.2) / 4, rtol=1e-5)
