"""Sparse top-k teacher: the cache against a float64 reference, the tail-bucket KL, mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill import losses as L
from jaxdistill.distill.objectives import Term, compute_objective

B, T, D, V, K, CHUNK = 2, 7, 8, 32, 5, 3


def _case(seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.7
    mask[0, 0] = True
    return dict(
        student_hidden=jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32),
        student_unembed=jnp.asarray(rng.standard_normal((D, V)), jnp.float32),
        teacher_hidden=jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32),
        teacher_unembed=jnp.asarray(1.5 * rng.standard_normal((D, V)), jnp.float32),
        mask=jnp.asarray(mask))


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_topk_teacher_matches_float64_reference():
    case = _case()
    temperature = 1.5
    topk = jax.jit(lambda h, u, m: L.topk_teacher(h, u, K, m, CHUNK, temperature=temperature))(
        case["teacher_hidden"], case["teacher_unembed"], case["mask"])
    assert topk["topk_ids"].dtype == jnp.int32 and topk["topk_ids"].shape == (B, T, K)
    assert topk["topk_logprobs"].dtype == jnp.float32 and topk["tail_logprob"].shape == (B, T)
    log_p = _log_softmax64(np.asarray(case["teacher_hidden"] @ case["teacher_unembed"])
                           / temperature)
    ids = np.argsort(-log_p, axis=-1)[..., :K]
    mask = np.asarray(case["mask"])
    np.testing.assert_array_equal(np.asarray(topk["topk_ids"])[mask], ids[mask])
    top_log_p = np.take_along_axis(log_p, ids, -1)
    np.testing.assert_allclose(np.asarray(topk["topk_logprobs"])[mask], top_log_p[mask],
                               rtol=1e-5, atol=1e-5)
    tail = np.log1p(-np.exp(top_log_p).sum(-1))
    np.testing.assert_allclose(np.asarray(topk["tail_logprob"])[mask], tail[mask], rtol=1e-4)
    # Masked positions are not stored (ids -1, zeros), so a cache does not depend on padding.
    assert np.all(np.asarray(topk["topk_ids"])[~mask] == -1)
    for key in ("topk_logprobs", "tail_logprob"):
        assert np.all(np.asarray(topk[key])[~mask] == 0), key
    # bf16 log-probabilities: k * (4 + 2) + 4 bytes per token.
    small = L.topk_teacher(case["teacher_hidden"], case["teacher_unembed"], K, case["mask"],
                           CHUNK, logprob_dtype=jnp.bfloat16)
    assert small["topk_logprobs"].dtype == jnp.bfloat16
    assert sum(small[key].nbytes for key in L.TOPK_KEYS) == B * T * (K * 6 + 4)


def test_topk_records_are_per_record_arrays():
    case = _case()
    topk = L.topk_teacher(case["teacher_hidden"], case["teacher_unembed"], K, case["mask"])
    records = L.topk_records(topk)
    assert len(records) == B
    assert {k: v.shape for k, v in records[1].items()} == {
        "topk_ids": (T, K), "topk_logprobs": (T, K), "tail_logprob": (T,)}
    np.testing.assert_array_equal(records[1]["topk_ids"], np.asarray(topk["topk_ids"])[1])


def _bucket_kl_reference(student_logits, topk, mask):
    """KL over (top-k tokens, tail) buckets in float64, mean over valid tokens."""
    mask = np.asarray(mask)  # masked positions hold zeros, not a distribution: left out
    log_s = _log_softmax64(student_logits)[mask]
    ids = np.asarray(topk["topk_ids"])[mask]
    p_t = np.concatenate([np.exp(np.asarray(topk["topk_logprobs"], np.float64)[mask]),
                          np.exp(np.asarray(topk["tail_logprob"], np.float64)[mask])[..., None]],
                         -1)
    s_top = np.exp(np.take_along_axis(log_s, ids, -1))
    p_s = np.concatenate([s_top, 1.0 - s_top.sum(-1, keepdims=True)], -1)
    return np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1).mean()


def test_sparse_token_kl_is_the_tail_bucket_kl():
    case = _case(1)
    run = jax.jit(lambda sh, su, th, tu, m: L.sparse_token_kl(
        sh, su, L.topk_teacher(th, tu, K, m), m, chunk_size=CHUNK))
    value = run(*case.values())
    topk = L.topk_teacher(case["teacher_hidden"], case["teacher_unembed"], K, case["mask"])
    expected = _bucket_kl_reference(case["student_hidden"] @ case["student_unembed"], topk,
                                    case["mask"])
    np.testing.assert_allclose(value, expected, rtol=1e-4)
    # Coarsening to buckets can only lose divergence: below the dense KL.
    dense = L.chunked_token_kl(*case.values())
    assert 0 < float(value) < float(dense)
    # Unstored positions never count, even where the loss's own mask would take them.
    np.testing.assert_allclose(L.sparse_token_kl(case["student_hidden"], case["student_unembed"],
                                                 topk, chunk_size=CHUNK), value, rtol=1e-6)


def test_sparse_with_full_vocabulary_equals_dense_kl():
    # k = V: the tail is empty (log 0 = -inf on both sides); sparse KL is the dense KL, and
    # the gradient is finite.
    case = _case(2)
    temperature = 2.0

    @jax.jit
    def run(sh, su, th, tu, m):
        topk = L.topk_teacher(th, tu, V, m, temperature=temperature)
        sparse = jax.value_and_grad(lambda h: L.sparse_token_kl(
            h, su, topk, m, temperature=temperature, chunk_size=CHUNK))(sh)
        dense = jax.value_and_grad(lambda h: L.chunked_token_kl(
            h, su, th, tu, m, temperature=temperature, chunk_size=CHUNK))(sh)
        return topk["tail_logprob"], sparse, dense

    tail, (value, grad), (dense, dense_grad) = run(*case.values())
    assert np.all(np.isneginf(np.asarray(tail)[np.asarray(case["mask"])]))
    np.testing.assert_allclose(value, dense, rtol=1e-5)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-6)


def test_cached_and_live_teachers_in_one_objective():
    case = _case(3)
    sh, su, th, tu, mask = case.values()
    other_tu = jnp.flip(tu, axis=1)  # a second, different live teacher
    cache = L.topk_teacher(th, tu, K, mask)
    terms = (
        Term(name="accuracy", loss="sparse_token_kl", student="lm", teacher="accuracy",
             mask="loss_mask", weight=0.5),
        Term(name="tone", loss="token_kl", student="lm", teacher="tone", mask="loss_mask",
             hparams={"kind": "reverse"}),
    )
    batch = {"loss_mask": mask, "offline": {"accuracy": {"lm": cache}}}
    total, metrics = jax.jit(lambda s, t, b: compute_objective(terms, s, t, b, jnp.asarray(0)))(
        {"lm": (sh, su)}, {"tone": {"lm": (th, other_tu)}}, batch)
    accuracy = L.sparse_token_kl(sh, su, cache, mask)
    tone = L.chunked_token_kl(sh, su, th, other_tu, mask, kind="reverse")
    np.testing.assert_allclose(metrics["loss/accuracy"], accuracy, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/tone"], tone, rtol=1e-5)
    np.testing.assert_allclose(total, 0.5 * accuracy + tone, rtol=1e-5)


def test_sparse_validation_errors():
    case = _case()
    sh, su, th, tu, mask = case.values()
    cache = L.topk_teacher(th, tu, K, mask)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, vocabulary 32\], got 33"):
        L.topk_teacher(th, tu, V + 1)
    with pytest.raises(ValueError, match=r"top-k cache with keys \['topk_ids', 'topk_logprobs', "
                                         r"'tail_logprob'\].*got \['topk_ids'\]"):
        L.sparse_token_kl(sh, su, {"topk_ids": cache["topk_ids"]})
    with pytest.raises(ValueError, match=r"topk_ids must be \[B, T, k\] with the student's "
                                         r"\[B, T\] = \(2, 7\), got shape \(2, 6, 5\)"):
        L.sparse_token_kl(sh, su, {k: v[:, :6] for k, v in cache.items()})
    with pytest.raises(ValueError, match=r"topk_ids must be integer token ids"):
        L.sparse_token_kl(sh, su, {**cache, "topk_ids": cache["topk_logprobs"]})
    with pytest.raises(ValueError, match=r"tail_logprob \[B, T\] = \(2, 7\), got \(2, 7, 5\) "
                                         r"and \(2, 7\)|topk_logprobs must have"):
        L.sparse_token_kl(sh, su, {**cache, "topk_logprobs": cache["topk_logprobs"][..., :4]})
