"""Token-level losses: chunked == dense (also vocab-sharded), bounded memory, teacher mixing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill import parallel
from jaxdistill.distill import losses as L
from jaxdistill.distill.objectives import Term, compute_objective

LN3 = math.log(3.0)
B, T, D, E, V, CHUNK = 2, 12, 8, 12, 64, 5  # T not a multiple of CHUNK: padding is exercised
KINDS = {"forward": L.forward_kl, "reverse": L.reverse_kl, "jsd": L.generalized_jsd}
VOCAB_RULES = {**parallel.DEFAULT_RULES, "batch": None, "vocab": "tensor"}


def _case(seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.7
    mask[0, 0] = True
    return dict(
        student_hidden=jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32),
        student_unembed=jnp.asarray(0.7 * rng.standard_normal((D, vocab)), jnp.float32),
        teacher_hidden=jnp.asarray(rng.standard_normal((B, T, E)), jnp.float32),
        teacher_unembed=jnp.asarray(0.7 * rng.standard_normal((E, vocab)), jnp.float32),
        mask=jnp.asarray(mask))


def _hparams(kind):
    return dict(temperature=2.0, **({"beta": 0.3} if kind == "jsd" else {}))


def _dense_and_chunked(student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask):
    """Value and student-hidden gradient of every kind, dense (full logits) and chunked."""
    out = {}
    for kind, dense_loss in KINDS.items():
        def dense(h, dense_loss=dense_loss, kind=kind):
            return dense_loss(h @ student_unembed, teacher_hidden @ teacher_unembed, mask,
                              **_hparams(kind))

        def chunked(h, kind=kind):
            return L.chunked_token_kl(h, student_unembed, teacher_hidden, teacher_unembed, mask,
                                      chunk_size=CHUNK, kind=kind, **_hparams(kind))

        out[kind] = (jax.value_and_grad(dense)(student_hidden),
                     jax.value_and_grad(chunked)(student_hidden))
    return out


def _assert_kinds_match(out):
    for kind, ((dense, dense_grad), (chunked, chunked_grad)) in out.items():
        assert float(dense) > 1e-3, kind  # a case where the divergence is not trivially 0
        np.testing.assert_allclose(chunked, dense, rtol=1e-5, atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(chunked_grad, dense_grad, rtol=1e-5, atol=1e-6, err_msg=kind)


def test_chunked_matches_dense_for_each_kind():
    case = _case()
    _assert_kinds_match(jax.jit(_dense_and_chunked)(*case.values()))


def test_jsd_kind_hand():
    # beta = 0.5, s = [1/2, 1/2], t = [3/4, 1/4]: m = [0.625, 0.375].
    kl_t_m = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    kl_s_m = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    identity = jnp.eye(2)
    value = jax.jit(lambda s, t: L.chunked_token_kl(s, identity, t, identity, kind="jsd"))(
        jnp.array([[[0.0, 0.0]]]), jnp.array([[[LN3, 0.0]]]))
    np.testing.assert_allclose(value, 0.5 * kl_t_m + 0.5 * kl_s_m, rtol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8), (2, 1, 4)])
def test_chunked_matches_dense_with_vocabulary_sharding(mesh_shape):
    mesh = parallel.make_mesh(mesh_shape)
    rules = {**VOCAB_RULES, "batch": "data"}
    case = _case(1)
    vocab_sharded = NamedSharding(mesh, PartitionSpec(None, "tensor"))
    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
    args = [jax.device_put(case[k], batch_sharded) for k in ("student_hidden",)] + [
        jax.device_put(case["student_unembed"], vocab_sharded),
        jax.device_put(case["teacher_hidden"], batch_sharded),
        jax.device_put(case["teacher_unembed"], vocab_sharded),
        jax.device_put(case["mask"], batch_sharded)]
    with parallel.activation_rules(mesh, rules):
        out = jax.jit(_dense_and_chunked)(*args)
    _assert_kinds_match(out)


def _temp_bytes(fn, *shapes):
    compiled = jax.jit(fn).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _loss_shapes(seq_len, vocab, dtype=jnp.float32):
    return (jax.ShapeDtypeStruct((B, seq_len, D), dtype), jax.ShapeDtypeStruct((D, vocab), dtype),
            jax.ShapeDtypeStruct((B, seq_len, D), dtype), jax.ShapeDtypeStruct((D, vocab), dtype),
            jax.ShapeDtypeStruct((B, seq_len), jnp.float32))


def _grad_of(loss):
    return jax.value_and_grad(loss, argnums=(0, 1))


def test_compiled_temporary_memory_is_flat_in_sequence_length():
    vocab, chunk = 2048, 16

    def chunked(sh, su, th, tu, m):
        return L.chunked_token_kl(sh, su, th, tu, m, chunk_size=chunk)

    def dense(sh, su, th, tu, m):
        return L.forward_kl(sh @ su, th @ tu, m)

    short, long = 64, 512  # 4 -> 32 chunks
    chunked_short, chunked_long = (_temp_bytes(_grad_of(chunked), *_loss_shapes(t, vocab))
                                   for t in (short, long))
    dense_short, dense_long = (_temp_bytes(_grad_of(dense), *_loss_shapes(t, vocab))
                               for t in (short, long))
    one_chunk_logits = B * chunk * vocab * 4
    # Chunked: a few chunks' worth of [B, C, V] whatever T (the [B, T, D]-sized copies of the
    # hidden states are the only thing that grows, and D << V).
    assert chunked_long < 1.25 * chunked_short, (chunked_short, chunked_long)
    assert chunked_long < 16 * one_chunk_logits, (chunked_long, one_chunk_logits)
    # Dense: grows with T, and holds at least one [B, T, V] f32 array.
    assert dense_long > 6 * dense_short, (dense_short, dense_long)
    assert dense_long >= B * long * vocab * 4
    assert chunked_long < dense_long / 10


def test_vocabulary_sharding_splits_each_chunk_over_devices():
    # On a (1, 1, 8) mesh with vocab -> tensor, no device holds a whole [B, C, V] block: the
    # per-device temporary memory is a fraction of the unsharded program's.
    vocab, chunk, seq_len = 4096, 32, 64
    mesh = parallel.make_mesh((1, 1, 8))

    def chunked(sh, su, th, tu, m):
        return L.chunked_token_kl(sh, su, th, tu, m, chunk_size=chunk)

    shapes = _loss_shapes(seq_len, vocab)
    unsharded = _temp_bytes(_grad_of(chunked), *shapes)
    one_chunk_logits = B * chunk * vocab * 4
    vocab_sharded = NamedSharding(mesh, PartitionSpec(None, "tensor"))
    replicated = NamedSharding(mesh, PartitionSpec())
    # Unembeddings sharded on the vocabulary, or replicated: then only the constraint on each
    # chunk's logits keeps them split (without it this program holds whole chunks).
    for unembed_sharding in (vocab_sharded, replicated):
        sharded_shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh) for s, sh in zip(
            shapes, (replicated, unembed_sharding, replicated, unembed_sharding, replicated))]
        with parallel.activation_rules(mesh, VOCAB_RULES):
            sharded = _temp_bytes(_grad_of(chunked), *sharded_shapes)
        assert sharded < one_chunk_logits, (unembed_sharding, sharded, one_chunk_logits)
        assert sharded < unsharded / 4, (unembed_sharding, sharded, unsharded)


# ------------------------------------------------------------------ teacher mixing

_S_LOGITS = [0.0, 0.0]  # student: s = [1/2, 1/2] everywhere
_KL_HAND = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL([3/4, 1/4] || s)


def _two_teacher_setup():
    identity = jnp.eye(2)
    student = (jnp.array([[_S_LOGITS] * 2] * B), identity)  # [B=2, T=2, V=2]
    accuracy = (jnp.array([[[LN3, 0.0]] * 2] * B), identity)  # KL 0.1308 at every token
    # Tone: KL 0.1308 at (0, 0) only; 0 at (0, 1) and (1, 1); (1, 0) masked out, so garbage.
    tone = (jnp.array([[[LN3, 0.0], [0.0, 0.0]], [[50.0, -50.0], [0.0, 0.0]]]), identity)
    batch = {
        "answer_mask": jnp.array([[0, 1], [0, 0]]),
        "loss_mask": jnp.array([[1, 1], [0, 1]]),
        "teacher_route": jnp.array([0, 1]),
    }
    return student, {"accuracy": {"lm": accuracy}, "tone": {"lm": tone}}, batch


def test_two_teacher_token_mixture_by_masks():
    student, teachers, batch = _two_teacher_setup()
    terms = (
        Term(name="accuracy", loss="token_kl", student="lm", teacher="accuracy",
             mask="answer_mask", weight=0.7),
        Term(name="tone", loss="token_kl", student="lm", teacher="tone", mask="loss_mask",
             weight=0.3),
    )
    total, metrics = jax.jit(lambda s, t, b: compute_objective(terms, s, t, b, jnp.asarray(0)))(
        {"lm": student}, teachers, batch)
    np.testing.assert_allclose(metrics["loss/accuracy"], _KL_HAND, rtol=1e-5)  # 1 token
    np.testing.assert_allclose(metrics["loss/tone"], _KL_HAND / 3, rtol=1e-5)  # 3 tokens
    np.testing.assert_allclose(total, 0.7 * _KL_HAND + 0.3 * _KL_HAND / 3, rtol=1e-5)


def test_two_teacher_token_mixture_by_routing_field():
    student, teachers, batch = _two_teacher_setup()
    # Row 0 goes to the accuracy teacher, row 1 to the tone teacher, over the response.
    terms = (
        Term(name="accuracy", loss="token_kl", student="lm", teacher="accuracy",
             mask="loss_mask", route="teacher_route", route_id=0),
        Term(name="tone", loss="token_kl", student="lm", teacher="tone", mask="loss_mask",
             route="teacher_route", route_id=1),
    )
    _, metrics = compute_objective(terms, {"lm": student}, teachers, batch, jnp.asarray(0))
    np.testing.assert_allclose(metrics["loss/accuracy"], _KL_HAND, rtol=1e-5)  # (0,0), (0,1)
    np.testing.assert_allclose(metrics["loss/tone"], 0.0, atol=1e-6)  # (1,1) only, KL 0
    np.testing.assert_allclose(metrics["loss/total"], _KL_HAND, rtol=1e-5)


def test_token_term_validation():
    with pytest.raises(ValueError, match="set both 'route' and 'route_id'"):
        Term(name="a", loss="token_kl", student="lm", teacher="acc", route="teacher_route")
    with pytest.raises(ValueError, match="'route' selects examples of a token-level loss"):
        Term(name="a", loss="forward_kl", student="rel", teacher="acc", route="r", route_id=0)
    with pytest.raises(ValueError, match="token-level and reads a teacher"):
        Term(name="a", loss="token_kl", student="lm", label="input_ids")
    with pytest.raises(ValueError, match="'teacher_mask' is for cross-vocabulary losses"):
        Term(name="a", loss="token_kl", student="lm", teacher="acc", teacher_mask="t_mask")
    student, teachers, batch = _two_teacher_setup()
    term = Term(name="a", loss="token_kl", student="lm", teacher="accuracy")
    with pytest.raises(ValueError, match=r"needs the student's \(hidden, unembedding\) pair"):
        compute_objective((term,), {"lm": student[0]}, teachers, batch, jnp.asarray(0))
    sparse = Term(name="a", loss="sparse_token_kl", student="lm", teacher="accuracy")
    with pytest.raises(ValueError, match="reads a cached top-k teacher"):
        compute_objective((sparse,), {"lm": student}, teachers, batch, jnp.asarray(0))
    routed = Term(name="a", loss="token_kl", student="lm", teacher="accuracy",
                  route="loss_mask", route_id=1)
    with pytest.raises(ValueError, match=r"one teacher id per example \(2,\), got \(2, 2\)"):
        compute_objective((routed,), {"lm": student}, teachers, batch, jnp.asarray(0))


def test_next_token_mask():
    np.testing.assert_array_equal(L.next_token_mask(jnp.array([[0, 0, 1, 1, 0]])),
                                  [[0, 1, 1, 0, 0]])


def test_gradients_reach_the_student_only_in_its_dtypes():
    case = _case(2)
    args = [case[k] for k in ("student_hidden", "student_unembed", "teacher_hidden",
                              "teacher_unembed")]

    @jax.jit
    def grads(*args):
        def loss(*args):
            return L.chunked_token_kl(*args, case["mask"], chunk_size=CHUNK)
        bf16 = [a.astype(jnp.bfloat16) for a in args]
        return jax.grad(loss, argnums=(0, 1, 2, 3))(*args), jax.grad(loss, argnums=(0, 1))(*bf16)

    (g_sh, g_su, g_th, g_tu), (b_sh, b_su) = grads(*args)
    assert float(jnp.abs(g_sh).max()) > 0 and float(jnp.abs(g_su).max()) > 0
    assert np.all(np.asarray(g_th) == 0) and np.all(np.asarray(g_tu) == 0)  # frozen teacher
    assert b_sh.dtype == jnp.bfloat16 and b_su.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(b_su, np.float32), g_su, rtol=0.1, atol=2e-3)


def test_token_cross_entropy_matches_shifted_dense_nll():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, size=(2, 7)), jnp.int32)
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], jnp.float32)
    mask = L.next_token_mask(loss_mask)
    log_p = jax.nn.log_softmax(hidden @ unembed, axis=-1)
    nll = -np.take_along_axis(np.asarray(log_p[:, :-1]), np.asarray(ids[:, 1:, None]), -1)[..., 0]
    expected = np.sum(nll * np.asarray(mask[:, :-1])) / np.sum(np.asarray(mask))
    value = L.token_cross_entropy(hidden, unembed, ids, mask, chunk_size=3)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    grad = jax.grad(lambda h: L.token_cross_entropy(h, unembed, ids, mask, chunk_size=3))(hidden)
    dense = jax.grad(lambda h: jnp.sum(-jnp.take_along_axis(
        jax.nn.log_softmax(h @ unembed, -1)[:, :-1], ids[:, 1:, None], -1)[..., 0]
        * mask[:, :-1]) / jnp.sum(mask))(hidden)
    np.testing.assert_allclose(grad, dense, rtol=1e-4, atol=1e-6)
    term = Term(name="lm", loss="token_ce", student="lm", label="input_ids", mask="m")
    total, _ = compute_objective((term,), {"lm": (hidden, unembed)}, {},
                                 {"input_ids": ids, "m": mask}, jnp.asarray(0))
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="token-level and reads a label"):
        Term(name="lm", loss="token_ce", student="lm", teacher="t")
