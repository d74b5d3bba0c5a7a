"""Distillation losses: pure jax functions fn(student, target, mask=None, **hparams) -> f32 scalar.

Longer than ~400 lines because it holds every loss with its validation, in one module that
imports nothing but jax.

Conventions shared by every loss here:

* Reduction is a masked mean over the valid rows (or entries, for the per-action
  sigmoid losses), with the count guarded by max(count, 1): an all-masked batch gives 0,
  never NaN. Masks may be bool or 0/1 numbers; other non-negative numbers act as row
  weights, sum(w * loss) / max(sum(w), 1) (objectives' confidence weighting relies on
  this; ranking losses use their candidate mask as membership only). Masked rows are
  selected away with `jnp.where`, so whatever they hold (padding, huge values) cannot
  leak into the value.
* Leading dims are arbitrary ([B, C], [B, N, C], ...); the class/candidate/feature axis
  is last.
* Everything is computed in float32 whatever the input dtype (bf16 activations are
  common), and the result is a float32 scalar.
* Temperature-softened losses (forward_kl, reverse_kl, generalized_jsd, soft_bce,
  listnet, token_kl) multiply by T**2 at the very end of the per-row value. Softening
  by T shrinks the gradient w.r.t. the student logits by about 1/T**2 (Hinton et al.,
  2015, "Distilling the knowledge in a neural network", sec. 2), so the T**2 factor keeps
  the gradient magnitude independent of T and lets T be tuned without retuning the
  loss weight.
* Only the token-level losses put the teacher under `stop_gradient` (its teacher weights
  are arguments). The other losses are plain functions of their inputs; teachers are
  frozen by the trainer, not here.
* Token-level losses take (hidden [B, T, D], unembedding [D, V]) pairs and compute logits
  in sequence chunks (`_chunked_token_sum`), so no [B, T, V] array ever exists; each
  chunk's vocabulary axis is constrained to the `vocab` logical axis.
* Hyper-parameters are validated on entry (ValueError naming the argument, what was
  expected and what was found); a hyper-parameter that is a JAX tracer (a schedule
  under jit) is not value-checked. `check_hparams` runs the same checks at config load.

This module imports nothing but jax, the standard library and `jaxdistill.parallel` (for
the logical-axis sharding constraint; itself jax and numpy only).
"""

from collections.abc import Callable, Mapping
import dataclasses
import inspect
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxdistill.parallel import constrain

_F32 = jnp.float32


# --------------------------------------------------------------------------- checks


def _is_tracer(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return hasattr(value, "dtype") and getattr(value, "shape", None) == () and (
        jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))


def _check_temperature(loss: str, temperature) -> None:
    if _is_tracer(temperature):
        return
    if not _is_number(temperature) or not float(temperature) > 0:
        raise ValueError(f"{loss}: temperature must be a number > 0, got {temperature!r}")


def _check_beta(loss: str, beta) -> None:
    if _is_tracer(beta):
        return
    if not _is_number(beta) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"{loss}: beta must be a number in [0, 1], got {beta!r}")


def _check_label_smoothing(loss: str, label_smoothing) -> None:
    if _is_tracer(label_smoothing):
        return
    if not _is_number(label_smoothing) or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(
            f"{loss}: label_smoothing must be a number in [0, 1), got {label_smoothing!r}")


def _check_chunk_size(loss: str, chunk_size) -> None:
    # Shapes depend on it, so it is always a static Python int.
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{loss}: chunk_size must be an int >= 1, got {chunk_size!r}")


_TOKEN_KL_KINDS = ("forward", "reverse", "jsd")


def _check_kind(loss: str, kind) -> None:
    if kind not in _TOKEN_KL_KINDS:
        raise ValueError(f"{loss}: kind must be one of {list(_TOKEN_KL_KINDS)}, got {kind!r}")


def _check_vocab_size(loss: str, vocab_size) -> None:
    if vocab_size is None:
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{loss}: vocab_size must be None or an int >= 1, got {vocab_size!r}")


# Config-level hyper-parameters and their checks; `check_hparams` uses this table and the
# losses call the same functions, so config loading and the call agree.
_HPARAM_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "temperature": _check_temperature,
    "beta": _check_beta,
    "label_smoothing": _check_label_smoothing,
    "chunk_size": _check_chunk_size,
    "kind": _check_kind,
    "vocab_size": _check_vocab_size,
}


def _check_same_shape(loss: str, name_a: str, a, name_b: str, b) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{loss}: {name_b} must have the shape of {name_a} {tuple(a.shape)}, "
            f"got {tuple(b.shape)}")


def _check_mask(loss: str, mask, expected_shape, what: str):
    """Returns the mask as float32 weights after checking its shape against `what`."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != tuple(expected_shape):
        raise ValueError(
            f"{loss}: mask must have shape {tuple(expected_shape)} ({what}), "
            f"got {tuple(mask.shape)}")
    return mask.astype(_F32)


def _check_rank(loss: str, name: str, x, min_ndim: int) -> None:
    if x.ndim < min_ndim:
        raise ValueError(
            f"{loss}: {name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------------- helpers


def _masked_mean(values_x, weight_x) -> jax.Array:
    """sum(w * values) / max(sum(w), 1) (None = all rows weigh 1); 0 when all w are 0."""
    values_x = values_x.astype(_F32)
    if weight_x is None:
        return jnp.mean(values_x)
    total = jnp.sum(jnp.where(weight_x != 0, values_x * weight_x, 0.0))
    return total / jnp.maximum(jnp.sum(weight_x), 1.0)


def _kl_rows(log_p_xC, log_q_xC) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities.

    Where p == 0 (a -inf logit, e.g. a banned token) the term is 0 by convention; the
    inner `where` keeps 0 * -inf from making NaN values or NaN gradients.
    """
    p_xC = jnp.exp(log_p_xC)
    safe_log_p_xC = jnp.where(p_xC > 0, log_p_xC, 0.0)
    return jnp.sum(jnp.where(p_xC > 0, p_xC * (safe_log_p_xC - log_q_xC), 0.0), axis=-1)


def _softened_log_probs(logits_xC, temperature):
    return jax.nn.log_softmax(logits_xC.astype(_F32) / temperature, axis=-1)


def _logit_pair(loss: str, student_logits_xC, teacher_logits_xC, mask):
    student_logits_xC = jnp.asarray(student_logits_xC)
    teacher_logits_xC = jnp.asarray(teacher_logits_xC)
    _check_rank(loss, "student_logits", student_logits_xC, 1)
    _check_same_shape(loss, "student_logits", student_logits_xC, "teacher_logits",
                      teacher_logits_xC)
    weight_x = _check_mask(loss, mask, student_logits_xC.shape[:-1],
                          "the logits' leading dims")
    return student_logits_xC, teacher_logits_xC, weight_x


# ---------------------------------------------------------------- softmax (classes)


def forward_kl(student_logits_xC, teacher_logits_xC, mask=None, *, temperature=1.0):
    """T**2 * KL(softmax(teacher/T) || softmax(student/T)), masked mean over rows.

    The mode-covering direction of classic distillation (Hinton et al.). The T**2 factor is
    applied to each row's KL after softening, so the gradient w.r.t. the student logits
    keeps the same magnitude whatever T (it would otherwise shrink like 1/T**2).
    """
    _check_temperature("forward_kl", temperature)
    student_logits_xC, teacher_logits_xC, weight_x = _logit_pair(
        "forward_kl", student_logits_xC, teacher_logits_xC, mask)
    kl_x = _kl_rows(_softened_log_probs(teacher_logits_xC, temperature),
                    _softened_log_probs(student_logits_xC, temperature))
    return _masked_mean(kl_x * temperature**2, weight_x)


def reverse_kl(student_logits_xC, teacher_logits_xC, mask=None, *, temperature=1.0):
    """T**2 * KL(softmax(student/T) || softmax(teacher/T)), masked mean over rows.

    The mode-seeking direction (MiniLLM, GKD). T**2 scaling as in `forward_kl`.
    """
    _check_temperature("reverse_kl", temperature)
    student_logits_xC, teacher_logits_xC, weight_x = _logit_pair(
        "reverse_kl", student_logits_xC, teacher_logits_xC, mask)
    kl_x = _kl_rows(_softened_log_probs(student_logits_xC, temperature),
                    _softened_log_probs(teacher_logits_xC, temperature))
    return _masked_mean(kl_x * temperature**2, weight_x)


def _jsd_rows(log_t_xC, log_s_xC, beta):
    """beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s, for 0 < beta < 1."""
    # The mixture in log space: log(beta*t + (1-beta)*s) stays finite where both
    # probabilities underflow, which a log of the summed probabilities would not.
    log_m_xC = jnp.logaddexp(log_t_xC + jnp.log(beta), log_s_xC + jnp.log1p(-beta))
    return beta * _kl_rows(log_t_xC, log_m_xC) + (1.0 - beta) * _kl_rows(log_s_xC, log_m_xC)


def generalized_jsd(student_logits_xC, teacher_logits_xC, mask=None, *, beta=0.5,
                    temperature=1.0):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024), times T**2.

    For 0 < beta < 1, with t = softmax(teacher/T), s = softmax(student/T):

        JSD(beta) = beta * KL(t || m) + (1 - beta) * KL(s || m),  m = beta*t + (1-beta)*s.

    Convention at the ends, following the GKD reading of beta (0 ~ forward KL, 1 ~
    reverse KL, as TRL's GKDTrainer also documents it): beta = 0 is defined as forward
    KL(t || s) and beta = 1 as reverse KL(s || t), i.e. `generalized_jsd(beta=0) == forward_kl` and
    `generalized_jsd(beta=1) == reverse_kl`. The formula above would give 0 at both ends;
    near them it behaves like beta * KL(t || s) (beta -> 0) and (1 - beta) * KL(s || t)
    (beta -> 1), so it has the direction of the endpoint but a scale that vanishes: the
    endpoints are a jump in scale, not a continuous limit. beta may be a tracer (a
    schedule); the endpoints are then selected with `jnp.where`.
    """
    _check_beta("generalized_jsd", beta)
    _check_temperature("generalized_jsd", temperature)
    student_logits_xC, teacher_logits_xC, weight_x = _logit_pair(
        "generalized_jsd", student_logits_xC, teacher_logits_xC, mask)
    div_x = _divergence_rows("jsd", _softened_log_probs(teacher_logits_xC, temperature),
                             _softened_log_probs(student_logits_xC, temperature), beta)
    return _masked_mean(div_x * temperature**2, weight_x)


def logit_mse(student_logits_xC, teacher_logits_xC, mask=None):
    """Mean squared logit difference over the last axis, masked mean over rows."""
    student_logits_xC, teacher_logits_xC, weight_x = _logit_pair(
        "logit_mse", student_logits_xC, teacher_logits_xC, mask)
    sq_err_x = jnp.mean(
        jnp.square(student_logits_xC.astype(_F32) - teacher_logits_xC.astype(_F32)), axis=-1)
    return _masked_mean(sq_err_x, weight_x)


def cross_entropy(student_logits_xC, labels_x, mask=None, *, label_smoothing=0.0):
    """Softmax cross-entropy against integer labels, masked mean over rows.

    Label smoothing follows torch/optax: the target is (1 - ls) * one_hot + ls / C.
    Labels of masked rows are ignored, so padding may carry any integer (e.g. -100).
    """
    _check_label_smoothing("cross_entropy", label_smoothing)
    student_logits_xC = jnp.asarray(student_logits_xC)
    labels_x = jnp.asarray(labels_x)
    _check_rank("cross_entropy", "student_logits", student_logits_xC, 1)
    if not jnp.issubdtype(labels_x.dtype, jnp.integer):
        raise ValueError(f"cross_entropy: labels must be integer class ids, got dtype "
                         f"{labels_x.dtype}")
    if labels_x.shape != student_logits_xC.shape[:-1]:
        raise ValueError(
            f"cross_entropy: labels must have the logits' leading dims "
            f"{tuple(student_logits_xC.shape[:-1])}, got {tuple(labels_x.shape)}")
    weight_x = _check_mask("cross_entropy", mask, labels_x.shape, "the labels' shape")
    num_classes = student_logits_xC.shape[-1]
    log_probs_xC = jax.nn.log_softmax(student_logits_xC.astype(_F32), axis=-1)
    targets_xC = jax.nn.one_hot(labels_x, num_classes, dtype=_F32)
    targets_xC = (1.0 - label_smoothing) * targets_xC + label_smoothing / num_classes
    return _masked_mean(-jnp.sum(targets_xC * log_probs_xC, axis=-1), weight_x)


# ------------------------------------------------------------- sigmoid (per action)


def _sigmoid_ce(logits_xK, targets_xK):
    # -[y log sigmoid(x) + (1-y) log sigmoid(-x)], in log-sigmoid form: no log(0) for
    # large |x|.
    return -(targets_xK * jax.nn.log_sigmoid(logits_xK)
             + (1.0 - targets_xK) * jax.nn.log_sigmoid(-logits_xK))


def _sigmoid_pair(loss, student_logits_xK, target_xK, mask, target_name):
    student_logits_xK = jnp.asarray(student_logits_xK)
    target_xK = jnp.asarray(target_xK)
    _check_same_shape(loss, "student_logits", student_logits_xK, target_name, target_xK)
    weight_xK = _check_mask(loss, mask, student_logits_xK.shape,
                           "one entry per logit: per-action masking")
    return student_logits_xK, target_xK, weight_xK


def binary_cross_entropy(student_logits_xK, targets_xK, mask=None):
    """Sigmoid cross-entropy against targets in [0, 1] (hard labels or probabilities).

    The mask has the logits' full shape ([..., K]) so single actions can be left out (e.g.
    an action never shown to the user); the mean is over valid entries.
    """
    student_logits_xK, targets_xK, weight_xK = _sigmoid_pair(
        "binary_cross_entropy", student_logits_xK, targets_xK, mask, "targets")
    loss_xK = _sigmoid_ce(student_logits_xK.astype(_F32), targets_xK.astype(_F32))
    return _masked_mean(loss_xK, weight_xK)


def soft_binary_cross_entropy(student_logits_xK, teacher_logits_xK, mask=None, *,
                              temperature=1.0):
    """T**2 * sigmoid cross-entropy of student/T against sigmoid(teacher/T), per entry.

    Cross-entropy, not KL: its minimum is the teacher's entropy, not 0; the gradient is
    the same. T**2 keeps the gradient magnitude independent of T, as in `forward_kl`.
    """
    _check_temperature("soft_binary_cross_entropy", temperature)
    student_logits_xK, teacher_logits_xK, weight_xK = _sigmoid_pair(
        "soft_binary_cross_entropy", student_logits_xK, teacher_logits_xK, mask,
        "teacher_logits")
    targets_xK = jax.nn.sigmoid(teacher_logits_xK.astype(_F32) / temperature)
    loss_xK = _sigmoid_ce(student_logits_xK.astype(_F32) / temperature, targets_xK)
    return _masked_mean(loss_xK * temperature**2, weight_xK)


# --------------------------------------------------------------- ranking (per list)


def _score_pair(loss, student_scores_xN, teacher_scores_xN, mask):
    student_scores_xN = jnp.asarray(student_scores_xN)
    teacher_scores_xN = jnp.asarray(teacher_scores_xN)
    _check_rank(loss, "student_scores", student_scores_xN, 1)
    _check_same_shape(loss, "student_scores", student_scores_xN, "teacher_scores",
                      teacher_scores_xN)
    valid_xN = _check_mask(loss, mask, student_scores_xN.shape,
                           "one entry per candidate")
    # Candidates are in or out of the list; a weight would have no meaning here.
    valid_xN = jnp.ones(student_scores_xN.shape, bool) if valid_xN is None else valid_xN != 0
    return student_scores_xN.astype(_F32), teacher_scores_xN.astype(_F32), valid_xN


def listwise_softmax_cross_entropy(student_scores_BxN, teacher_scores_BxN, mask=None, *,
                                   temperature=1.0):
    """ListNet: T**2 * CE(softmax(teacher/T), softmax(student/T)) over candidates (last axis).

    Masked candidates are left out of both softmaxes; the mean is over lists with at least
    one valid candidate. T**2 as in `forward_kl`.
    """
    loss = "listwise_softmax_cross_entropy"
    _check_temperature(loss, temperature)
    student_scores_BxN, teacher_scores_BxN, valid_BxN = _score_pair(
        loss, student_scores_BxN, teacher_scores_BxN, mask)
    # A finite fill, not -inf: a fully masked list then gives a uniform softmax instead of
    # NaN (its value is discarded, and so is its gradient).
    fill = jnp.finfo(_F32).min
    log_s_BxN = jax.nn.log_softmax(
        jnp.where(valid_BxN, student_scores_BxN / temperature, fill), axis=-1)
    teacher_probs_BxN = jax.nn.softmax(
        jnp.where(valid_BxN, teacher_scores_BxN / temperature, fill), axis=-1)
    ce_B = -jnp.sum(jnp.where(valid_BxN, teacher_probs_BxN * log_s_BxN, 0.0), axis=-1)
    return _masked_mean(ce_B * temperature**2, jnp.any(valid_BxN, axis=-1).astype(_F32))


def pairwise_margin_mse(student_scores_BxN, teacher_scores_BxN, mask=None):
    """Margin-MSE: mean over valid ordered pairs (i != j) of ((s_i - s_j) - (t_i - t_j))**2.

    The mean is over all valid pairs in the batch, so a list with n valid candidates
    weighs n*(n-1). With e = s - t the pair term is (e_i - e_j)**2 and the per-list sum is
    2 * n * sum((e - mean(e))**2): O(N) memory instead of an [N, N] pair matrix, and
    centring first avoids the cancellation of n*sum(e**2) - sum(e)**2 when student and
    teacher scores differ by a large offset (to which this loss is blind).
    """
    loss = "pairwise_margin_mse"
    student_scores_BxN, teacher_scores_BxN, valid_BxN = _score_pair(
        loss, student_scores_BxN, teacher_scores_BxN, mask)
    valid_f_BxN = valid_BxN.astype(_F32)
    err_BxN = jnp.where(valid_BxN, student_scores_BxN - teacher_scores_BxN, 0.0)
    n_B = jnp.sum(valid_f_BxN, axis=-1)
    mean_err_B = jnp.sum(err_BxN, axis=-1) / jnp.maximum(n_B, 1.0)
    centred_BxN = jnp.where(valid_BxN, err_BxN - mean_err_B[..., None], 0.0)
    pair_sum_B = 2.0 * n_B * jnp.sum(jnp.square(centred_BxN), axis=-1)
    num_pairs = jnp.sum(n_B * (n_B - 1.0))
    return jnp.sum(pair_sum_B) / jnp.maximum(num_pairs, 1.0)


# -------------------------------------------------------------------------- hidden


def _hidden_pair(loss, student_hidden_xDs, teacher_hidden_xDt, mask, projection_DsxDt):
    """Projects the student to the teacher width; returns f32 pair and the row mask."""
    student_hidden_xDs = jnp.asarray(student_hidden_xDs)
    teacher_hidden_xDt = jnp.asarray(teacher_hidden_xDt)
    _check_rank(loss, "student_hidden", student_hidden_xDs, 1)
    _check_rank(loss, "teacher_hidden", teacher_hidden_xDt, 1)
    width_s, width_t = student_hidden_xDs.shape[-1], teacher_hidden_xDt.shape[-1]
    if student_hidden_xDs.shape[:-1] != teacher_hidden_xDt.shape[:-1]:
        raise ValueError(
            f"{loss}: teacher_hidden must have the leading dims of student_hidden "
            f"{tuple(student_hidden_xDs.shape[:-1])}, got {tuple(teacher_hidden_xDt.shape[:-1])}")
    student_xDs = student_hidden_xDs.astype(_F32)
    if projection_DsxDt is None:
        if width_s != width_t:
            raise ValueError(
                f"{loss}: student width {width_s} != teacher width {width_t}; pass "
                f"projection_DsxDt of shape ({width_s}, {width_t}) (a learned student-side "
                f"parameter)")
        student_xDt = student_xDs
    else:
        projection_DsxDt = jnp.asarray(projection_DsxDt)
        if projection_DsxDt.shape != (width_s, width_t):
            raise ValueError(
                f"{loss}: projection_DsxDt must have shape (student width {width_s}, teacher "
                f"width {width_t}), got {tuple(projection_DsxDt.shape)}")
        student_xDt = student_xDs @ projection_DsxDt.astype(_F32)
    weight_x = _check_mask(loss, mask, student_hidden_xDs.shape[:-1],
                          "the hidden states' leading dims")
    return student_xDt, teacher_hidden_xDt.astype(_F32), weight_x


def hidden_mse(student_hidden_xDs, teacher_hidden_xDt, mask=None, *, projection_DsxDt=None):
    """Mean squared error of (projected) student vs teacher hidden states, masked rows."""
    student_xDt, teacher_xDt, weight_x = _hidden_pair(
        "hidden_mse", student_hidden_xDs, teacher_hidden_xDt, mask, projection_DsxDt)
    return _masked_mean(jnp.mean(jnp.square(student_xDt - teacher_xDt), axis=-1), weight_x)


_COSINE_EPS = 1e-8


def hidden_cosine(student_hidden_xDs, teacher_hidden_xDt, mask=None, *,
                  projection_DsxDt=None):
    """1 - cosine similarity of (projected) student vs teacher hidden states, masked rows.

    Norms are clamped at 1e-8 like torch's cosine_similarity; the clamp is inside the
    sqrt so a zero vector has a zero, not NaN, gradient.
    """
    student_xDt, teacher_xDt, weight_x = _hidden_pair(
        "hidden_cosine", student_hidden_xDs, teacher_hidden_xDt, mask, projection_DsxDt)

    def norm(v_xD):
        return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(v_xD), axis=-1), _COSINE_EPS**2))

    cosine_x = jnp.sum(student_xDt * teacher_xDt, axis=-1) / (
        norm(student_xDt) * norm(teacher_xDt))
    return _masked_mean(1.0 - cosine_x, weight_x)


# ------------------------------------------------------------------ token-level


def _check_token_pair(loss, hidden_BxTxD, unembed_DxV, side: str):
    hidden_BxTxD, unembed_DxV = jnp.asarray(hidden_BxTxD), jnp.asarray(unembed_DxV)
    if hidden_BxTxD.ndim != 3:
        raise ValueError(f"{loss}: {side}_hidden must be [B, T, D], got shape "
                         f"{tuple(hidden_BxTxD.shape)}")
    if unembed_DxV.ndim != 2 or unembed_DxV.shape[0] != hidden_BxTxD.shape[-1]:
        raise ValueError(
            f"{loss}: {side}_unembed must be [{hidden_BxTxD.shape[-1]}, V] to match "
            f"{side}_hidden's width {hidden_BxTxD.shape[-1]}, got shape "
            f"{tuple(unembed_DxV.shape)}")
    return hidden_BxTxD, unembed_DxV


def _check_teacher_tokens(loss, student_hidden_BxTxD, teacher_hidden_BxTxE):
    if teacher_hidden_BxTxE.shape[:2] != student_hidden_BxTxD.shape[:2]:
        raise ValueError(
            f"{loss}: teacher_hidden must be [B, T, E] with the student's [B, T] = "
            f"{tuple(student_hidden_BxTxD.shape[:2])}, got shape "
            f"{tuple(teacher_hidden_BxTxE.shape)}")


def _shared_vocab(loss, student_unembed_DxV, teacher_unembed_ExV, vocab_size):
    """Both unembeddings cut to one vocabulary; a mismatch without `vocab_size` is refused."""
    vocab_s, vocab_t = student_unembed_DxV.shape[1], teacher_unembed_ExV.shape[1]
    if vocab_size is None:
        if vocab_s != vocab_t:
            raise ValueError(
                f"{loss}: student vocabulary {vocab_s} != teacher vocabulary {vocab_t}; pass "
                f"vocab_size=<shared real vocabulary> to compare the first columns only, or "
                f"use a cross-tokenizer loss ('uld')")
        return student_unembed_DxV, teacher_unembed_ExV
    if vocab_size > min(vocab_s, vocab_t):
        raise ValueError(
            f"{loss}: vocab_size {vocab_size} exceeds an unembedding width (student "
            f"{vocab_s}, teacher {vocab_t})")
    return student_unembed_DxV[:, :vocab_size], teacher_unembed_ExV[:, :vocab_size]


def _token_weights(loss, mask_BxT, batch, seq_len):
    weight_BxT = _check_mask(loss, mask_BxT, (batch, seq_len), "[B, T] of the hidden states")
    return jnp.ones((batch, seq_len), _F32) if weight_BxT is None else weight_BxT


def _chunk_logits(hidden_BxCxD, unembed_DxV):
    """One chunk's f32 logits, vocabulary axis on the `vocab` mesh axis.

    Accumulated in float32 from bf16 operands (no f32 copy of the unembedding). Under
    `parallel.activation_rules` with vocab -> tensor, no device holds a whole [B, C, V]
    block; softmax statistics become small all-reduces over the vocabulary shards.
    """
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, unembed_DxV,
                              preferred_element_type=_F32)
    return constrain(logits_BxCxV, ("batch", "seq", "vocab"))


def _chunk_count(seq_len, chunk_size):
    """(chunk length, number of chunks); a short sequence is one chunk of its own length."""
    chunk = min(chunk_size, seq_len) if seq_len > 0 else 1
    return chunk, -(-seq_len // chunk)


def _to_chunks(x_BxT___, chunk, num_chunks):
    """[B, T, ...] -> [num_chunks, B, chunk, ...], T padded with zeros (scan's leading axis)."""
    batch, seq_len = x_BxT___.shape[:2]
    pad = num_chunks * chunk - seq_len
    x_BxT___ = jnp.pad(x_BxT___, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxT___.ndim - 2))
    return jnp.swapaxes(x_BxT___.reshape((batch, num_chunks, chunk) + x_BxT___.shape[2:]), 0, 1)


def _from_chunks(x_NxBxC___, seq_len):
    """The inverse of `_to_chunks`: [num_chunks, B, chunk, ...] -> [B, seq_len, ...]."""
    num_chunks, batch, chunk = x_NxBxC___.shape[:3]
    x_BxT___ = jnp.swapaxes(x_NxBxC___, 0, 1)
    return x_BxT___.reshape((batch, num_chunks * chunk) + x_BxT___.shape[3:])[:, :seq_len]


def _chunked_token_sum(token_fn, per_token, weight_BxT, consts, chunk_size):
    """sum_{b,t} w[b,t] * token_fn(*chunk_of(per_token), *consts)[b, t], in sequence chunks.

    per_token: arrays [B, T, ...]; consts: arrays every chunk sees whole (unembeddings). The
    student's are per_token[0] (hidden states) and consts[0] (its unembedding); only they
    get a gradient, the others are frozen teacher inputs, ids, log-probs.

    The sequence is padded up to whole chunks (weight 0) and `jax.lax.scan` walks the
    chunks, so only one chunk's [B, C, V] logits exist at a time, forward or backward. Under
    differentiation each chunk's gradient w.r.t. the student's hidden states and
    unembedding is computed in the same pass as its value (a custom VJP, as fused
    linear-cross-entropy kernels do): the backward pass only scales the stored [B, T, D]
    and [D, V] gradients, so nothing is recomputed and no chunk's logits are kept.
    """
    chunk, num_chunks = _chunk_count(weight_BxT.shape[1], chunk_size)

    def chunk_value(hidden_BxCxD, unembed_DxV, weight_BxC, frozen_chunk, frozen_consts):
        value_BxC = token_fn(hidden_BxCxD, *frozen_chunk, unembed_DxV, *frozen_consts)
        return jnp.sum(jnp.where(weight_BxC != 0, value_BxC * weight_BxC, 0.0))

    def scan(hidden_BxTxD, unembed_DxV, weight_BxT, frozen_per_token, frozen_consts, grads):
        xs = (_to_chunks(weight_BxT, chunk, num_chunks),
              _to_chunks(hidden_BxTxD, chunk, num_chunks),
              tuple(_to_chunks(x, chunk, num_chunks) for x in frozen_per_token))

        def body(carry, xs):
            total, grad_unembed_DxV = carry
            weight_BxC, hidden_BxCxD, frozen_chunk = xs
            value_of = lambda h, u: chunk_value(h, u, weight_BxC, frozen_chunk,  # noqa: E731
                                                frozen_consts)
            if not grads:
                return (total + value_of(hidden_BxCxD, unembed_DxV), grad_unembed_DxV), None
            value, vjp = jax.vjp(value_of, hidden_BxCxD, unembed_DxV)
            grad_hidden_BxCxD, grad_unembed = vjp(jnp.ones((), _F32))
            grad_unembed_DxV = grad_unembed_DxV + grad_unembed.astype(_F32)
            return (total + value, grad_unembed_DxV), grad_hidden_BxCxD

        # The unembedding's gradient accumulates in f32 (bf16 sums over chunks would drift).
        grad_unembed_DxV = jnp.zeros(unembed_DxV.shape, _F32) if grads else None
        (total, grad_unembed_DxV), grad_hidden = jax.lax.scan(
            body, (jnp.zeros((), _F32), grad_unembed_DxV), xs)
        if not grads:
            return total
        return total, _from_chunks(grad_hidden, hidden_BxTxD.shape[1]), grad_unembed_DxV

    @jax.custom_vjp
    def total_of(hidden_BxTxD, unembed_DxV, weight_BxT, frozen_per_token, frozen_consts):
        return scan(hidden_BxTxD, unembed_DxV, weight_BxT, frozen_per_token, frozen_consts,
                    grads=False)

    def forward(hidden_BxTxD, unembed_DxV, weight_BxT, frozen_per_token, frozen_consts):
        total, grad_hidden_BxTxD, grad_unembed_DxV = scan(
            hidden_BxTxD, unembed_DxV, weight_BxT, frozen_per_token, frozen_consts, grads=True)
        grad_unembed_DxV = constrain(grad_unembed_DxV, (None, "vocab"))
        return total, (grad_hidden_BxTxD, grad_unembed_DxV)

    unembed_dtype = jnp.asarray(consts[0]).dtype

    def backward(residuals, cotangent):
        grad_hidden_BxTxD, grad_unembed_DxV = residuals
        # Masks, frozen inputs and teachers get no gradient (None: zeros of any dtype).
        return ((cotangent * grad_hidden_BxTxD).astype(grad_hidden_BxTxD.dtype),
                (cotangent * grad_unembed_DxV).astype(unembed_dtype), None, None, None)

    total_of.defvjp(forward, backward)
    return total_of(per_token[0], consts[0], weight_BxT, tuple(per_token[1:]),
                    tuple(consts[1:]))


def _divergence_rows(kind, log_t_xC, log_s_xC, beta):
    """Per-row forward KL(t||s), reverse KL(s||t) or generalised JSD(beta) (see below)."""
    if kind == "forward":
        return _kl_rows(log_t_xC, log_s_xC)
    if kind == "reverse":
        return _kl_rows(log_s_xC, log_t_xC)
    if _is_tracer(beta):
        beta = jnp.asarray(beta, _F32)
        # Keep the interior formula's beta strictly inside (0, 1) so the unselected branch
        # of the `where` never evaluates log(0) and poisons the gradient.
        inner_beta = jnp.clip(beta, 1e-6, 1.0 - 1e-6)
        return jnp.where(
            beta == 0.0, _kl_rows(log_t_xC, log_s_xC),
            jnp.where(beta == 1.0, _kl_rows(log_s_xC, log_t_xC),
                      _jsd_rows(log_t_xC, log_s_xC, inner_beta)))
    if float(beta) == 0.0:
        return _kl_rows(log_t_xC, log_s_xC)
    if float(beta) == 1.0:
        return _kl_rows(log_s_xC, log_t_xC)
    return _jsd_rows(log_t_xC, log_s_xC, float(beta))


def chunked_token_kl(student_hidden_BxTxD, student_unembed_DxV, teacher_hidden_BxTxE,
                     teacher_unembed_ExV, mask_BxT=None, *, temperature=1.0,
                     chunk_size=128, kind="forward", beta=0.5, vocab_size=None):
    """Token-level T**2 * divergence for chat distillation, never materialising [B, T, V].

    kind: "forward" is KL(teacher || student), "reverse" is KL(student || teacher), "jsd"
      the generalised JSD of `generalized_jsd` with its `beta` (and its endpoint
      convention: beta=0 is forward KL, beta=1 reverse KL).
    mask_BxT: the tokens that count (the response: prompt and padding 0); other non-negative
      values weigh tokens. Position t's distribution predicts token t+1, so the mask marks
      positions whose *next* token is a response token (`next_token_mask(loss_mask)`).
    vocab_size: use only the first `vocab_size` unembedding columns of both models (the
      shared real vocabulary when embedding tables are padded to a round size).

    Both models' logits are computed one [B, chunk_size, V] block at a time (see
    `_chunked_token_sum`), vocabulary axis constrained to the `vocab` logical axis. The
    teacher side is under `stop_gradient`. Mean over valid tokens; T**2 is applied to each
    token's divergence, as in `forward_kl`.
    """
    loss = "chunked_token_kl"
    _check_temperature(loss, temperature)
    _check_chunk_size(loss, chunk_size)
    _check_kind(loss, kind)
    _check_beta(loss, beta)
    _check_vocab_size(loss, vocab_size)
    student_hidden_BxTxD, student_unembed_DxV = _check_token_pair(
        loss, student_hidden_BxTxD, student_unembed_DxV, "student")
    teacher_hidden_BxTxE, teacher_unembed_ExV = _check_token_pair(
        loss, teacher_hidden_BxTxE, teacher_unembed_ExV, "teacher")
    _check_teacher_tokens(loss, student_hidden_BxTxD, teacher_hidden_BxTxE)
    student_unembed_DxV, teacher_unembed_ExV = _shared_vocab(
        loss, student_unembed_DxV, teacher_unembed_ExV, vocab_size)
    weight_BxT = _token_weights(loss, mask_BxT, *student_hidden_BxTxD.shape[:2])

    def token_divergence(student_BxCxD, teacher_BxCxE, student_unembed, teacher_unembed):
        log_s = _softened_log_probs(_chunk_logits(student_BxCxD, student_unembed), temperature)
        log_t = _softened_log_probs(_chunk_logits(teacher_BxCxE, teacher_unembed), temperature)
        return _divergence_rows(kind, log_t, log_s, beta)

    total = _chunked_token_sum(
        token_divergence,
        (student_hidden_BxTxD, jax.lax.stop_gradient(teacher_hidden_BxTxE)), weight_BxT,
        (student_unembed_DxV, jax.lax.stop_gradient(teacher_unembed_ExV)), chunk_size)
    return total * temperature**2 / jnp.maximum(jnp.sum(weight_BxT), 1.0)


def token_cross_entropy(student_hidden_BxTxD, student_unembed_DxV, input_ids_BxT, mask_BxT=None,
                        *, chunk_size=128):
    """Next-token cross-entropy of an `lm` head against the sequence itself (teacher forcing),
    never materialising [B, T, V].

    input_ids_BxT: the batch's token ids; position t is scored on token t+1 (the last
    position predicts nothing). mask_BxT marks positions, as for `chunked_token_kl`: the
    response's `next_token_mask(loss_mask)`; other non-negative values weigh positions.
    Mean over valid positions, logits one [B, chunk_size, V] block at a time.
    """
    loss = "token_cross_entropy"
    _check_chunk_size(loss, chunk_size)
    student_hidden_BxTxD, student_unembed_DxV = _check_token_pair(
        loss, student_hidden_BxTxD, student_unembed_DxV, "student")
    input_ids_BxT = jnp.asarray(input_ids_BxT)
    batch, seq_len = student_hidden_BxTxD.shape[:2]
    if input_ids_BxT.shape != (batch, seq_len) or not jnp.issubdtype(input_ids_BxT.dtype,
                                                                       jnp.integer):
        raise ValueError(f"{loss}: input_ids must be integer ids [B, T] = {(batch, seq_len)} "
                         f"(the hidden states'), got {input_ids_BxT.dtype} "
                         f"{tuple(input_ids_BxT.shape)}")
    weight_BxT = _token_weights(loss, mask_BxT, batch, seq_len)
    next_ids_BxT = jnp.pad(input_ids_BxT[:, 1:], ((0, 0), (0, 1)))
    weight_BxT = weight_BxT.at[:, -1].set(0.0)

    def token_nll(hidden_BxCxD, ids_BxC, unembed_DxV):
        log_p_BxCxV = jax.nn.log_softmax(_chunk_logits(hidden_BxCxD, unembed_DxV), axis=-1)
        return -jnp.take_along_axis(log_p_BxCxV, ids_BxC[..., None], axis=-1)[..., 0]

    total = _chunked_token_sum(token_nll, (student_hidden_BxTxD, next_ids_BxT), weight_BxT,
                               (student_unembed_DxV,), chunk_size)
    return total / jnp.maximum(jnp.sum(weight_BxT), 1.0)


def next_token_mask(loss_mask_BxT):
    """Positions whose next token is a response token: loss_mask shifted left by one.

    A decoder's position t predicts token t+1, so the distributions to distil for a response
    are those at the positions just before its tokens. The last position predicts nothing.
    """
    loss_mask_BxT = jnp.asarray(loss_mask_BxT)
    return jnp.pad(loss_mask_BxT[:, 1:], ((0, 0), (0, 1)))


# ------------------------------------------------------------- sparse top-k teacher

TOPK_KEYS = ("topk_ids", "topk_logprobs", "tail_logprob")


def _topk_member_mask(ids_BxCxK, vocab):
    """[B, C, V] bool: which vocabulary entries are among a token's top-k ids."""
    b, c, _ = ids_BxCxK.shape
    rows = jnp.arange(b)[:, None, None]
    cols = jnp.arange(c)[None, :, None]
    return jnp.zeros((b, c, vocab), bool).at[rows, cols, ids_BxCxK].set(True)


def _log_mass_outside(log_p_BxCxV, member_BxCxV):
    """log of the total probability outside the members; -inf (no NaN gradient) if none."""
    has_tail_BxC = jnp.any(~member_BxCxV, axis=-1)
    outside = jnp.where(member_BxCxV, -jnp.inf, log_p_BxCxV)
    outside = jnp.where(has_tail_BxC[..., None], outside, 0.0)
    return jnp.where(has_tail_BxC, jax.nn.logsumexp(outside, axis=-1), -jnp.inf)


def topk_teacher(hidden_BxTxD, unembed_DxV, k, mask_BxT=None, chunk_size=128, *,
                 temperature=1.0, logprob_dtype=jnp.float32):
    """A teacher's sparse token distributions: per token its top-k ids, log-probs and tail.

    Returns {"topk_ids": [B, T, k] int32, "topk_logprobs": [B, T, k] (logprob_dtype),
    "tail_logprob": [B, T] f32 = log(1 - sum of the top-k probabilities)}, the distribution
    softened by `temperature` (train the student with the same one). Computed in sequence
    chunks like `chunked_token_kl` (no [B, T, V] array). Positions with mask 0 are not
    stored: their ids are -1 (log-probs and tail 0), and `sparse_token_kl` leaves them out
    whatever its own mask says, so a cache never passes padding off as a distribution.
    Bytes per token: k * (4 + itemsize(logprob_dtype)) + 4.
    """
    loss = "topk_teacher"
    _check_temperature(loss, temperature)
    _check_chunk_size(loss, chunk_size)
    hidden_BxTxD, unembed_DxV = _check_token_pair(loss, hidden_BxTxD, unembed_DxV, "teacher")
    vocab = unembed_DxV.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"{loss}: k must be an int in [1, vocabulary {vocab}], got {k!r}")
    batch, seq_len = hidden_BxTxD.shape[:2]
    keep_BxT = _token_weights(loss, mask_BxT, batch, seq_len) != 0
    chunk, num_chunks = _chunk_count(seq_len, chunk_size)
    hidden_NxBxCxD = _to_chunks(jax.lax.stop_gradient(hidden_BxTxD), chunk, num_chunks)

    def one_chunk(hidden_BxCxD):
        log_p_BxCxV = _softened_log_probs(_chunk_logits(hidden_BxCxD, unembed_DxV),
                                          temperature)
        logprobs_BxCxK, ids_BxCxK = jax.lax.top_k(log_p_BxCxV, k)
        tail_BxC = _log_mass_outside(log_p_BxCxV, _topk_member_mask(ids_BxCxK, vocab))
        return ids_BxCxK.astype(jnp.int32), logprobs_BxCxK, tail_BxC

    ids, logprobs, tail = (_from_chunks(x, seq_len)
                           for x in jax.lax.map(one_chunk, hidden_NxBxCxD))
    return {
        "topk_ids": jnp.where(keep_BxT[..., None], ids, -1),
        "topk_logprobs": jnp.where(keep_BxT[..., None], logprobs, 0.0).astype(logprob_dtype),
        "tail_logprob": jnp.where(keep_BxT, tail, 0.0),
    }


def topk_records(topk_BxT: Mapping[str, jax.Array]) -> list[dict[str, Any]]:
    """`topk_teacher`'s batch output as one host dict per record ([T, k], [T, k], [T])."""
    host = jax.device_get(dict(topk_BxT))
    return [{key: host[key][i] for key in TOPK_KEYS} for i in range(len(host[TOPK_KEYS[0]]))]


def _check_topk(loss, teacher_topk, batch, seq_len):
    if not isinstance(teacher_topk, Mapping) or set(TOPK_KEYS) - set(teacher_topk):
        found = sorted(teacher_topk) if isinstance(teacher_topk, Mapping) else type(
            teacher_topk).__name__
        raise ValueError(f"{loss}: the teacher must be a top-k cache with keys "
                         f"{list(TOPK_KEYS)} (from topk_teacher), got {found}")
    ids_BxTxK = jnp.asarray(teacher_topk["topk_ids"])
    logprobs_BxTxK = jnp.asarray(teacher_topk["topk_logprobs"])
    tail_BxT = jnp.asarray(teacher_topk["tail_logprob"])
    if ids_BxTxK.ndim != 3 or ids_BxTxK.shape[:2] != (batch, seq_len):
        raise ValueError(f"{loss}: topk_ids must be [B, T, k] with the student's [B, T] = "
                         f"{(batch, seq_len)}, got shape {tuple(ids_BxTxK.shape)}")
    if not jnp.issubdtype(ids_BxTxK.dtype, jnp.integer):
        raise ValueError(f"{loss}: topk_ids must be integer token ids, got {ids_BxTxK.dtype}")
    if logprobs_BxTxK.shape != ids_BxTxK.shape or tail_BxT.shape != (batch, seq_len):
        raise ValueError(
            f"{loss}: topk_logprobs must have topk_ids' shape {tuple(ids_BxTxK.shape)} and "
            f"tail_logprob [B, T] = {(batch, seq_len)}, got {tuple(logprobs_BxTxK.shape)} and "
            f"{tuple(tail_BxT.shape)}")
    return ids_BxTxK.astype(jnp.int32), logprobs_BxTxK, tail_BxT


def sparse_token_kl(student_hidden_BxTxD, student_unembed_DxV, teacher_topk, mask_BxT=None,
                    *, temperature=1.0, chunk_size=128):
    """T**2 * KL(teacher || student) over k+1 buckets from a cached top-k teacher.

    teacher_topk: `topk_teacher`'s output (made with the same temperature); its unstored
    positions (ids -1) do not count, whatever the mask. The buckets are
    the teacher's k tokens plus a tail: the student's tail is its total probability on every
    other token, matched to the teacher's tail mass. Exact when the teacher's tail is 0; else
    KL of the two distributions coarsened to the buckets (a lower bound on the dense KL).
    Student logits are computed in chunks as in `chunked_token_kl`; mean over valid tokens.
    """
    loss = "sparse_token_kl"
    _check_temperature(loss, temperature)
    _check_chunk_size(loss, chunk_size)
    student_hidden_BxTxD, student_unembed_DxV = _check_token_pair(
        loss, student_hidden_BxTxD, student_unembed_DxV, "student")
    batch, seq_len = student_hidden_BxTxD.shape[:2]
    ids_BxTxK, logprobs_BxTxK, tail_BxT = _check_topk(loss, teacher_topk, batch, seq_len)
    stored_BxT = ids_BxTxK[..., 0] >= 0
    weight_BxT = jnp.where(stored_BxT, _token_weights(loss, mask_BxT, batch, seq_len), 0.0)
    ids_BxTxK = jnp.maximum(ids_BxTxK, 0)  # unstored rows gather a real (unused) token
    vocab = student_unembed_DxV.shape[1]

    def bucket_kl(student_BxCxD, ids_BxCxK, logprobs_BxCxK, tail_BxC, student_unembed):
        log_s_BxCxV = _softened_log_probs(_chunk_logits(student_BxCxD, student_unembed),
                                          temperature)
        log_s_BxCxK = jnp.take_along_axis(log_s_BxCxV, ids_BxCxK, axis=-1)
        log_s_tail_BxC = _log_mass_outside(log_s_BxCxV, _topk_member_mask(ids_BxCxK, vocab))
        log_t = jnp.concatenate([logprobs_BxCxK.astype(_F32), tail_BxC[..., None]], -1)
        log_s = jnp.concatenate([log_s_BxCxK, log_s_tail_BxC[..., None]], -1)
        return _kl_rows(log_t, log_s)

    teacher = jax.lax.stop_gradient((ids_BxTxK, logprobs_BxTxK, tail_BxT.astype(_F32)))
    total = _chunked_token_sum(bucket_kl, (student_hidden_BxTxD, *teacher), weight_BxT,
                               (student_unembed_DxV,), chunk_size)
    return total * temperature**2 / jnp.maximum(jnp.sum(weight_BxT), 1.0)


# ----------------------------------------------------------- cross-tokenizer (ULD)


def _response_order(mask_BxT):
    """Indices of each row's response tokens first (in order), and how many there are."""
    member_BxT = jnp.asarray(mask_BxT) != 0
    # A stable sort of "not a response token" keeps the response tokens in their order.
    order_BxT = jnp.argsort(~member_BxT, axis=-1, stable=True)
    return order_BxT, jnp.sum(member_BxT, axis=-1)


def uld_token_loss(student_hidden_BxTxD, student_unembed_DxV, teacher_hidden_BxSxE,
                   teacher_unembed_ExW, mask_BxT=None, *, teacher_mask_BxS=None,
                   chunk_size=128):
    """Universal Logit Distillation (Boizard et al., 2024) across tokenizers.

    Per aligned response token: the Wasserstein-1 distance between the two models'
    probability vectors each sorted in decreasing order, the shorter vocabulary padded with
    zeros: sum_i |sort(p_student)_i - sort(p_teacher)_i|. It ignores token identities, so
    student and teacher may have different vocabularies (V != W) and sequence lengths.
    Alignment is by response-token position: the n-th response token of the student (mask
    1) is paired with the n-th of the teacher (teacher_mask_BxS, the teacher's own
    tokenisation; None = the student's mask on the same positions), each row truncated to
    the shorter response. Masks are membership (non-zero = response). Mean over aligned
    tokens; computed in chunks over the aligned responses. No temperature (ULD has none).
    """
    loss = "uld_token_loss"
    _check_chunk_size(loss, chunk_size)
    student_hidden_BxTxD, student_unembed_DxV = _check_token_pair(
        loss, student_hidden_BxTxD, student_unembed_DxV, "student")
    teacher_hidden_BxSxE, teacher_unembed_ExW = _check_token_pair(
        loss, teacher_hidden_BxSxE, teacher_unembed_ExW, "teacher")
    batch, seq_s = student_hidden_BxTxD.shape[:2]
    seq_t = teacher_hidden_BxSxE.shape[1]
    if teacher_hidden_BxSxE.shape[0] != batch:
        raise ValueError(f"{loss}: teacher_hidden must have the student's batch size {batch}, "
                         f"got shape {tuple(teacher_hidden_BxSxE.shape)}")
    mask_BxT = _token_weights(loss, mask_BxT, batch, seq_s)
    if teacher_mask_BxS is None:
        if seq_t != seq_s:
            raise ValueError(
                f"{loss}: teacher sequence length {seq_t} != student's {seq_s}; pass "
                f"teacher_mask_BxS (the teacher's response mask in its own tokenisation)")
        teacher_mask_BxS = mask_BxT
    teacher_mask_BxS = _token_weights(loss, teacher_mask_BxS, batch, seq_t)
    order_s_BxT, count_s_B = _response_order(mask_BxT)
    order_t_BxS, count_t_B = _response_order(teacher_mask_BxS)
    aligned = min(seq_s, seq_t)
    student_BxRxD = jnp.take_along_axis(
        student_hidden_BxTxD, order_s_BxT[:, :aligned, None], axis=1)
    teacher_BxRxE = jnp.take_along_axis(
        jax.lax.stop_gradient(teacher_hidden_BxSxE), order_t_BxS[:, :aligned, None], axis=1)
    valid_BxR = (jnp.arange(aligned)[None] < jnp.minimum(count_s_B, count_t_B)[:, None])
    valid_BxR = valid_BxR.astype(_F32)
    vocab_s, vocab_t = student_unembed_DxV.shape[1], teacher_unembed_ExW.shape[1]
    width = max(vocab_s, vocab_t)

    def sorted_probs(hidden_BxCxD, unembed_DxV):
        probs_BxCxV = jax.nn.softmax(_chunk_logits(hidden_BxCxD, unembed_DxV), axis=-1)
        descending_BxCxV = -jnp.sort(-probs_BxCxV, axis=-1)
        return jnp.pad(descending_BxCxV, ((0, 0), (0, 0), (0, width - probs_BxCxV.shape[-1])))

    def wasserstein(student_BxCxD, teacher_BxCxE, student_unembed, teacher_unembed):
        return jnp.sum(jnp.abs(sorted_probs(student_BxCxD, student_unembed)
                               - sorted_probs(teacher_BxCxE, teacher_unembed)), axis=-1)

    total = _chunked_token_sum(
        wasserstein, (student_BxRxD, teacher_BxRxE), valid_BxR,
        (student_unembed_DxV, jax.lax.stop_gradient(teacher_unembed_ExW)), chunk_size)
    return total / jnp.maximum(jnp.sum(valid_BxR), 1.0)


# ------------------------------------------------------------------------ registry


@dataclasses.dataclass(frozen=True)
class Loss:
    """A registered loss and what it compares, so callers never dispatch on loss names.

    level: "row" (one prediction per example or candidate: class logits, action logits,
    hidden states), "list" (a whole candidate list at once) or "token" (every response
    token of a sequence; the student and teacher sides are (hidden, unembedding) pairs).
    agreement: how a student's decision is compared with its target's in evaluation --
    "argmax" (same top class), "label" (top class equals the integer label), "threshold"
    (same side of the binary decision threshold), "top1" (same top candidate), or None
    (no decision to agree on: hidden states, tokens).
    teacher (token level only): what the teacher side is -- "lm", a live (hidden, unembedding)
    pair, or "topk", a cached `topk_teacher` dict; None for a label loss (`token_ce`: the
    batch's own ids). cross_vocab: whether student and teacher
    may have different vocabularies (the same-vocabulary losses refuse a mismatch).
    """

    fn: Callable[..., jax.Array]
    level: Literal["row", "list", "token"]
    agreement: Literal["argmax", "label", "threshold", "top1"] | None
    teacher: Literal["lm", "topk"] | None = None
    cross_vocab: bool = False

    def __call__(self, *args, **kwargs) -> jax.Array:
        return self.fn(*args, **kwargs)

    @property
    def weights_rows(self) -> bool:
        """Whether a non-binary mask acts as per-row weights (confidence weighting)."""
        return self.level == "row"


LOSSES: dict[str, Loss] = {
    "forward_kl": Loss(forward_kl, "row", "argmax"),
    "reverse_kl": Loss(reverse_kl, "row", "argmax"),
    "jsd": Loss(generalized_jsd, "row", "argmax"),
    "logit_mse": Loss(logit_mse, "row", "argmax"),
    "bce": Loss(binary_cross_entropy, "row", "threshold"),
    "soft_bce": Loss(soft_binary_cross_entropy, "row", "threshold"),
    "listnet": Loss(listwise_softmax_cross_entropy, "list", "top1"),
    "margin_mse": Loss(pairwise_margin_mse, "list", "top1"),
    "hidden_mse": Loss(hidden_mse, "row", None),
    "hidden_cosine": Loss(hidden_cosine, "row", None),
    "cross_entropy": Loss(cross_entropy, "row", "label"),
    "token_ce": Loss(token_cross_entropy, "token", None),
    "token_kl": Loss(chunked_token_kl, "token", None, teacher="lm"),
    "sparse_token_kl": Loss(sparse_token_kl, "token", None, teacher="topk"),
    "uld": Loss(uld_token_loss, "token", None, teacher="lm", cross_vocab=True),
}

# Keyword-only arguments that are arrays supplied by the model at call time, not
# hyper-parameters a config can set.
_CALL_TIME_ARGS = frozenset({"projection_DsxDt", "teacher_mask_BxS"})


def _config_hparams(fn: Callable) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CALL_TIME_ARGS]


def check_hparams(name: str, hparams: dict) -> None:
    """Validates a registered loss's config hyper-parameters; raises ValueError early.

    Checks the loss name, that every key is a hyper-parameter of that loss (the allowed
    ones are the loss's keyword-only arguments, less arrays such as projection_DsxDt that
    the model passes at call time), and each value (temperature > 0, 0 <= beta <= 1,
    0 <= label_smoothing < 1, chunk_size >= 1, kind in {forward, reverse, jsd}, vocab_size
    None or >= 1).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    allowed = _config_hparams(LOSSES[name].fn)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(
            f"loss {name!r}: unknown hyper-parameter(s) {unknown}; allowed: {allowed}")
    for key, value in hparams.items():
        _HPARAM_CHECKS[key](name, value)
