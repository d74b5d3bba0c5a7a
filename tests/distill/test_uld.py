"""Cross-tokenizer ULD loss: hand-computed values, alignment by response position, invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill import losses as L
from jaxdistill.distill.objectives import Term, compute_objective


def _log(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


def test_uld_hand_different_vocabularies():
    # Identity unembeddings, so hidden states are logits. Student [0.5, 0.3, 0.2] (V=3),
    # teacher [0.6, 0.4] (W=2) padded to [0.6, 0.4, 0]: |0.5-0.6| + |0.3-0.4| + |0.2-0| = 0.4.
    # Token identities do not matter: the teacher's order is reversed.
    student = _log([[[0.5, 0.3, 0.2]]])
    teacher = _log([[[0.4, 0.6]]])
    value = jax.jit(L.uld_token_loss)(student, jnp.eye(3), teacher, jnp.eye(2))
    np.testing.assert_allclose(value, 0.4, rtol=1e-5)


def test_uld_aligns_by_response_position():
    # Student T=4 with 2 response tokens (positions 1, 2); teacher S=5 with 3 (positions 2,
    # 3, 4): pairs (1, 2) and (2, 3); the teacher's third response token has no partner.
    filler = [0.34, 0.33, 0.33]
    student = _log([[filler, [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], filler]])
    teacher = _log([[[0.5, 0.5], [0.5, 0.5], [0.6, 0.4], [0.7, 0.3], [0.99, 0.01]]])
    mask = jnp.array([[0, 1, 1, 0]])
    teacher_mask = jnp.array([[0, 0, 1, 1, 1]])
    first = 0.1 + 0.1 + 0.2  # [0.5, 0.3, 0.2] vs [0.6, 0.4, 0]
    second = 0.2 + 0.25 + 0.05  # [0.9, 0.05, 0.05] vs [0.7, 0.3, 0]
    for chunk_size in (1, 128):  # chunking does not change the value
        value = jax.jit(lambda *args, c=chunk_size: L.uld_token_loss(
            *args, teacher_mask_BxS=teacher_mask, chunk_size=c))(
                student, jnp.eye(3), teacher, jnp.eye(2), mask)
        np.testing.assert_allclose(value, (first + second) / 2, rtol=1e-5)


def test_uld_is_zero_for_identical_distributions_under_permutation():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    unembed = jnp.asarray(rng.standard_normal((8, 40)), jnp.float32)
    permuted = unembed[:, rng.permutation(40)]
    mask = jnp.asarray(rng.random((2, 6)) < 0.7)

    @jax.jit
    def run(hidden, unembed, permuted, mask):
        same = L.uld_token_loss(hidden, unembed, hidden, permuted, mask, chunk_size=4)
        value, grad = jax.value_and_grad(lambda h: L.uld_token_loss(
            h, unembed, hidden[:, ::-1], permuted, mask, chunk_size=4))(hidden)
        return same, value, grad

    same, different, grad = run(hidden, unembed, permuted, mask)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    assert float(different) > 0.05 and np.all(np.isfinite(grad))


def test_uld_in_an_objective_and_vocabulary_checks():
    student = (_log([[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]]), jnp.eye(3))
    teacher = (_log([[[0.6, 0.4], [0.5, 0.5], [0.4, 0.6]]]), jnp.eye(2))
    batch = {"loss_mask": jnp.array([[1, 0]]), "teacher_loss_mask": jnp.array([[0, 1, 0]])}
    assert L.LOSSES["uld"].cross_vocab and not L.LOSSES["token_kl"].cross_vocab
    uld = Term(name="tone", loss="uld", student="lm", teacher="tone", mask="loss_mask",
               teacher_mask="teacher_loss_mask")
    _, metrics = compute_objective((uld,), {"lm": student}, {"tone": {"lm": teacher}}, batch,
                                   jnp.asarray(0))
    # Student token 0 [0.5, 0.3, 0.2] vs teacher token 1 [0.5, 0.5, 0]: 0 + 0.2 + 0.2.
    np.testing.assert_allclose(metrics["loss/tone"], 0.4, rtol=1e-5)
    # A same-vocabulary loss refuses the mismatch, naming both sizes.
    same_length_teacher = (teacher[0][:, :2], teacher[1])
    kl = Term(name="tone", loss="token_kl", student="lm", teacher="tone")
    with pytest.raises(ValueError, match=r"student vocabulary 3 != teacher vocabulary 2"):
        compute_objective((kl,), {"lm": student}, {"tone": {"lm": same_length_teacher}}, batch,
                          jnp.asarray(0))
    with pytest.raises(ValueError, match=r"teacher sequence length 3 != student's 2; pass "
                                         r"teacher_mask_BxS"):
        L.uld_token_loss(*student, *teacher)
    L.check_hparams("uld", {"chunk_size": 16})
    with pytest.raises(ValueError, match=r"allowed: \['chunk_size'\]"):
        L.check_hparams("uld", {"teacher_mask_BxS": 1})
