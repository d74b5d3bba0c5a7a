"""Tests for jaxdistill.distill.losses: hand-computed cases, torch/optax references, masks, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from jaxdistill.distill import losses as L

LN3 = math.log(3.0)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _t64(x):
    return torch.from_numpy(np.asarray(x, np.float64))


def _jit(fn, **hparams):
    """fn with hparams bound, under jit: one compile, not one per eager op (2 busy cores)."""
    return jax.jit(functools.partial(fn, **hparams))


def _close(actual, expected, tol=1e-5):
    """actual: a float32 scalar, or a thunk computing one (run under jit, for speed)."""
    if callable(actual):
        actual = jax.jit(actual)()
    actual = np.asarray(actual)
    assert actual.dtype == np.float32 and actual.shape == ()
    np.testing.assert_allclose(float(actual), float(expected), rtol=tol, atol=tol)


# --------------------------------------------------------------- (a) hand-computed
# student logits [0, 0] -> s = [1/2, 1/2]; teacher logits [ln 3, 0] -> t = [3/4, 1/4].


def test_forward_kl_hand():
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    _close(lambda: L.forward_kl([[0.0, 0.0]], [[LN3, 0.0]]), expected)


def test_reverse_kl_hand():
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.143841
    _close(lambda: L.reverse_kl([[0.0, 0.0]], [[LN3, 0.0]]), expected)


def test_generalized_jsd_hand_and_endpoints():
    # beta = 0.5: m = [0.625, 0.375].
    kl_t_m = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    kl_s_m = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    s, t = [[0.0, 0.0]], [[LN3, 0.0]]
    _close(lambda: L.generalized_jsd(s, t, beta=0.5), 0.5 * kl_t_m + 0.5 * kl_s_m)
    # beta = 0.25: m = 0.25 t + 0.75 s = [0.5625, 0.4375].
    m = [0.5625, 0.4375]
    kl_t_m = 0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    kl_s_m = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    _close(lambda: L.generalized_jsd(s, t, beta=0.25), 0.25 * kl_t_m + 0.75 * kl_s_m)
    # Convention: the endpoints are defined as forward (beta=0) and reverse (beta=1) KL.
    _close(lambda: L.generalized_jsd(s, t, beta=0.0), 0.130812, tol=1e-5)
    _close(lambda: L.generalized_jsd(s, t, beta=1.0), 0.143841, tol=1e-5)


def test_logit_mse_hand():
    _close(lambda: L.logit_mse([[1.0, 2.0]], [[0.0, 0.0]]), 2.5)


def test_binary_cross_entropy_hand():
    # logit 0 vs label 1: -ln(1/2); logit ln3 (p=3/4) vs soft label 1/2.
    first = math.log(2.0)
    second = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    logits, targets = [[0.0, LN3]], [[1.0, 0.5]]
    _close(lambda: L.binary_cross_entropy(logits, targets), (first + second) / 2)
    _close(lambda: L.binary_cross_entropy(logits, targets, [[0, 1]]), second)
    # Log-sigmoid form: saturated logits stay finite and exact.
    _close(lambda: L.binary_cross_entropy([[200.0, -200.0]], [[0.0, 0.0]]), 100.0)


def test_soft_binary_cross_entropy_hand():
    # Teacher logit 0 -> target 1/2; student logit ln3 -> p = 3/4.
    _close(lambda: L.soft_binary_cross_entropy([[LN3]], [[0.0]]),
           -(0.5 * math.log(0.75) + 0.5 * math.log(0.25)))


def test_listnet_hand():
    # teacher [ln3, 0] -> [3/4, 1/4]; student [0, ln3] -> [1/4, 3/4]; third candidate
    # masked with a score that would dominate both softmaxes.
    expected = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))  # 1.111641
    _close(lambda: L.listwise_softmax_cross_entropy([[0.0, LN3, 50.0]], [[LN3, 0.0, 50.0]],
                                            [[1, 1, 0]]), expected)


def test_margin_mse_hand():
    # s = [1, 2, 4], t = 0: unordered pair terms 1, 9, 4, each counted twice over 6 pairs.
    _close(lambda: L.pairwise_margin_mse([[1.0, 2.0, 4.0]], [[0.0, 0.0, 0.0]]), 28.0 / 6.0)
    # A masked candidate (score 99) is in no pair: pairs of [1, 4] only.
    _close(lambda: L.pairwise_margin_mse([[1.0, 99.0, 4.0]], [[0.0, 0.0, 0.0]], [[1, 0, 1]]), 9.0)


def test_hidden_hand():
    _close(lambda: L.hidden_mse([[1.0, 0.0]], [[0.0, 1.0]]), 1.0)
    projection = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]  # Ds=3 -> Dt=2: drops the 3rd dim
    _close(lambda: L.hidden_mse([[1.0, 2.0, 3.0]], [[1.0, 0.0]], projection_DsxDt=projection), 2.0)
    _close(lambda: L.hidden_cosine([[1.0, 0.0]], [[1.0, 1.0]]), 1.0 - 1.0 / math.sqrt(2.0))
    _close(lambda: L.hidden_cosine([[1.0, 0.0, 7.0]], [[0.0, 1.0]], projection_DsxDt=projection), 1.0)


def test_cross_entropy_hand():
    logits, labels = [[0.0, LN3]], [1]
    _close(lambda: L.cross_entropy(logits, labels), -math.log(0.75))
    # Smoothing 0.2 over 2 classes: target [0.1, 0.9].
    _close(lambda: L.cross_entropy(logits, labels, label_smoothing=0.2),
           -(0.1 * math.log(0.25) + 0.9 * math.log(0.75)))


def test_token_kl_hand():
    # Identity unembeddings: the hidden states are the logits.
    identity = jnp.eye(2)
    _close(lambda: L.chunked_token_kl(jnp.array([[[0.0, 0.0]]]), identity,
                              jnp.array([[[LN3, 0.0]]]), identity), 0.130812)
    _close(lambda: L.chunked_token_kl(jnp.array([[[0.0, 0.0]]]), identity,
                              jnp.array([[[LN3, 0.0]]]), identity, kind="reverse"), 0.143841)


def test_fractional_mask_is_a_row_weight():
    # Objectives pass confidence weights as the mask: sum(w * loss) / max(sum(w), 1).
    # Row 0 is the hand case above (KL 0.130812), row 1 has KL 0.
    s, t, weights = [[0.0, 0.0], [1.0, 2.0]], [[LN3, 0.0], [1.0, 2.0]], [1.5, 0.5]
    _close(lambda: L.forward_kl(s, t, weights), 1.5 * 0.130812 / 2.0)
    _close(lambda: L.chunked_token_kl(jnp.array([s]), jnp.eye(2), jnp.array([t]), jnp.eye(2),
                                      jnp.array([weights])), 1.5 * 0.130812 / 2.0)


# ---------------------------------------------------- (b) independent references


def _logits(rng, *shape, scale=2.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _row_mask(rng, *shape):
    mask = rng.random(shape) < 0.7
    mask.flat[0] = True
    return mask


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_torch(temperature):
    rng = _rng(1)
    s, t = _logits(rng, 3, 4, 7), _logits(rng, 3, 4, 7)
    mask = _row_mask(rng, 3, 4)
    log_s = F.log_softmax(_t64(s[mask]) / temperature, -1)
    log_t = F.log_softmax(_t64(t[mask]) / temperature, -1)
    # torch's kl_div(input, target) is KL(target || input).
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1).mean()
    _close(_jit(L.forward_kl, temperature=temperature)(s, t, mask), forward * temperature**2)
    _close(_jit(L.reverse_kl, temperature=temperature)(s, t, mask), reverse * temperature**2)


def test_generalized_jsd_matches_torch_and_limits():
    rng = _rng(2)
    s, t = _logits(rng, 5, 6), _logits(rng, 5, 6)
    mask = _row_mask(rng, 5)
    temperature = 1.5
    p_s = F.softmax(_t64(s[mask]) / temperature, -1)
    p_t = F.softmax(_t64(t[mask]) / temperature, -1)
    eps = 1e-3
    betas = (0.1, 0.5, 0.9, 0.0, 1.0, eps, 1 - eps)

    @jax.jit
    def run(s, t, mask):
        return ([L.generalized_jsd(s, t, mask, beta=beta, temperature=temperature)
                 for beta in betas],
                L.forward_kl(s, t, mask, temperature=temperature),
                L.reverse_kl(s, t, mask, temperature=temperature))

    jsd, forward, reverse = run(s, t, mask)
    for beta, value in zip(betas[:3], jsd):
        p_m = beta * p_t + (1 - beta) * p_s
        kl_t_m = F.kl_div(p_m.log(), p_t, reduction="none").sum(-1)
        kl_s_m = F.kl_div(p_m.log(), p_s, reduction="none").sum(-1)
        _close(value, (beta * kl_t_m + (1 - beta) * kl_s_m).mean() * temperature**2)
    _close(jsd[3], forward)
    _close(jsd[4], reverse)
    # Near the ends the formula has the endpoint's direction with a vanishing scale.
    np.testing.assert_allclose(jsd[5] / eps, forward, rtol=2e-2)
    np.testing.assert_allclose(jsd[6] / eps, reverse, rtol=2e-2)


def test_generalized_jsd_traced_beta():
    # A scheduled beta arrives as a tracer: no value check, endpoints chosen by jnp.where,
    # gradients finite at the endpoints.
    rng = _rng(3)
    s, t = _logits(rng, 4, 5), _logits(rng, 4, 5)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda s, beta: L.generalized_jsd(s, t, beta=beta)))
    for beta, expected in ((0.0, _jit(L.forward_kl)(s, t)), (0.3, None),
                           (1.0, _jit(L.reverse_kl)(s, t))):
        value, grad = value_and_grad(s, beta)
        if expected is not None:
            _close(value, expected)
        assert np.all(np.isfinite(grad))


def test_logit_mse_matches_torch():
    rng = _rng(4)
    s, t = _logits(rng, 3, 4, 5), _logits(rng, 3, 4, 5)
    mask = _row_mask(rng, 3, 4)
    _close(_jit(L.logit_mse)(s, t, mask), F.mse_loss(_t64(s[mask]), _t64(t[mask])))


def test_binary_cross_entropy_matches_torch():
    rng = _rng(5)
    logits = _logits(rng, 6, 4, scale=5.0)
    targets = rng.random((6, 4)).astype(np.float32)
    targets[:3] = targets[:3] > 0.5  # hard labels in some rows, probabilities in others
    mask = _row_mask(rng, 6, 4)  # per action
    expected = F.binary_cross_entropy_with_logits(_t64(logits[mask]), _t64(targets[mask]))
    _close(_jit(L.binary_cross_entropy)(logits, targets, mask), expected)
    _close(_jit(L.binary_cross_entropy)(logits, targets),
           optax.losses.sigmoid_binary_cross_entropy(logits, targets).mean())


def test_soft_binary_cross_entropy_matches_torch():
    rng = _rng(6)
    s, t = _logits(rng, 5, 3), _logits(rng, 5, 3)
    mask = _row_mask(rng, 5, 3)
    temperature = 3.0
    expected = F.binary_cross_entropy_with_logits(
        _t64(s[mask]) / temperature, torch.sigmoid(_t64(t[mask]) / temperature))
    _close(_jit(L.soft_binary_cross_entropy, temperature=temperature)(s, t, mask),
           expected * temperature**2)


def test_listnet_matches_torch_and_optax():
    rng = _rng(7)
    s, t = _logits(rng, 4, 6), _logits(rng, 4, 6)
    mask = _row_mask(rng, 4, 6)
    mask[2] = False  # an empty list is left out of the mean
    temperature = 2.0
    per_list = []
    for row in range(4):
        if mask[row].any():
            target = F.softmax(_t64(t[row][mask[row]]) / temperature, -1)
            per_list.append(F.cross_entropy(_t64(s[row][mask[row]])[None] / temperature,
                                            target[None]))
    expected = torch.stack(per_list).mean() * temperature**2
    listnet = _jit(L.listwise_softmax_cross_entropy, temperature=temperature)
    _close(listnet(s, t, mask), expected)
    full = listnet(s, t, np.ones_like(mask))
    _close(full, optax.losses.ranking_softmax_loss(
        s / temperature, jax.nn.softmax(t / temperature)) * temperature**2)


def _pairwise_reference(s, t, mask):
    s, t = s.astype(np.float64), t.astype(np.float64)
    diff = (s[:, :, None] - s[:, None, :]) - (t[:, :, None] - t[:, None, :])
    pairs = mask[:, :, None] & mask[:, None, :] & ~np.eye(s.shape[-1], dtype=bool)
    return (diff**2)[pairs].mean()


def test_margin_mse_matches_pairwise_reference():
    rng = _rng(8)
    s, t = _logits(rng, 3, 7), _logits(rng, 3, 7)
    mask = _row_mask(rng, 3, 7)
    margin_mse = _jit(L.pairwise_margin_mse)
    _close(margin_mse(s, t, mask), _pairwise_reference(s, t, mask))
    # Blind to a per-list offset, and no cancellation when the offset is large.
    offset = np.float32(1e4) + np.arange(3, dtype=np.float32)[:, None]
    _close(margin_mse(s + offset, t, mask), _pairwise_reference(s, t, mask),
           tol=1e-3)


def test_hidden_matches_torch():
    rng = _rng(9)
    s, t = _logits(rng, 2, 5, 3), _logits(rng, 2, 5, 4)
    projection = _logits(rng, 3, 4, scale=0.5)
    mask = _row_mask(rng, 2, 5)
    projected = _t64(s[mask]) @ _t64(projection)
    _close(_jit(L.hidden_mse)(s, t, mask, projection_DsxDt=projection),
           F.mse_loss(projected, _t64(t[mask])))
    _close(_jit(L.hidden_cosine)(s, t, mask, projection_DsxDt=projection),
           (1 - F.cosine_similarity(projected, _t64(t[mask]), dim=-1)).mean())
    same_width = _logits(rng, 2, 5, 3)
    _close(_jit(L.hidden_cosine)(s, same_width),
           (1 - F.cosine_similarity(_t64(s), _t64(same_width), dim=-1)).mean())


def test_hidden_cosine_zero_vector_has_finite_gradient():
    grad = jax.jit(jax.grad(L.hidden_cosine))(jnp.zeros((2, 3)), jnp.ones((2, 3)))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(label_smoothing):
    rng = _rng(10)
    logits = _logits(rng, 3, 4, 6)
    labels = rng.integers(0, 6, (3, 4))
    mask = _row_mask(rng, 3, 4)
    labels[~mask] = -100  # padding labels are ignored under the mask
    expected = F.cross_entropy(_t64(logits[mask]), torch.from_numpy(labels[mask]),
                               label_smoothing=label_smoothing)
    _close(_jit(L.cross_entropy, label_smoothing=label_smoothing)(logits, labels, mask),
           expected)


# ----------------------------------------------------------------- chunked token KL

B, T, D, E, CHUNK = 2, 20, 16, 24, 8  # T is not a multiple of CHUNK: padding is exercised


def _token_case(vocab_student=64, vocab_teacher=64, seed=11):
    rng = _rng(seed)
    return dict(
        student_hidden=jnp.asarray(_logits(rng, B, T, D, scale=1.0)),
        student_unembed=jnp.asarray(_logits(rng, D, vocab_student, scale=0.5)),
        teacher_hidden=jnp.asarray(_logits(rng, B, T, E, scale=1.0)),
        teacher_unembed=jnp.asarray(_logits(rng, E, vocab_teacher, scale=0.5)),
        mask=jnp.asarray(_row_mask(rng, B, T)))


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_token_kl_matches_full_logits(kind):
    # Padded embedding tables (70 and 80 columns) sharing a real vocabulary of 64.
    case = _token_case(vocab_student=70, vocab_teacher=80)
    vocab, temperature = 64, 2.0
    naive_loss = L.forward_kl if kind == "forward" else L.reverse_kl

    def naive(student_hidden, student_unembed):
        student_logits = student_hidden @ student_unembed[:, :vocab]
        teacher_logits = case["teacher_hidden"] @ case["teacher_unembed"][:, :vocab]
        return naive_loss(student_logits, teacher_logits, case["mask"],
                          temperature=temperature)

    def chunked(student_hidden, student_unembed):
        return L.chunked_token_kl(
            student_hidden, student_unembed, case["teacher_hidden"],
            case["teacher_unembed"], case["mask"], temperature=temperature,
            chunk_size=CHUNK, kind=kind, vocab_size=vocab)

    @jax.jit
    def run(*args):
        return (jax.value_and_grad(naive, argnums=(0, 1))(*args),
                jax.value_and_grad(chunked, argnums=(0, 1))(*args))

    (expected, expected_grads), (value, grads) = run(case["student_hidden"],
                                                     case["student_unembed"])
    _close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(grads[1])[:, vocab:] == 0)  # padded columns get no gradient


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, including those inside scan/checkpoint/jit bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)


def _all_avals(jaxpr):
    return (var.aval for eqn in _all_eqns(jaxpr) for var in eqn.outvars)


def _largest_intermediate(fn, *args):
    closed = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(*args)
    return max(int(np.prod(aval.shape)) for aval in _all_avals(closed.jaxpr)
               if hasattr(aval, "shape"))


def test_token_kl_never_materialises_full_logits():
    case = _token_case()
    vocab = 64
    full_logits_size = B * T * vocab
    args = (case["student_hidden"], case["student_unembed"])

    def naive(student_hidden, student_unembed):
        return L.forward_kl(student_hidden @ student_unembed,
                            case["teacher_hidden"] @ case["teacher_unembed"])

    def chunked(student_hidden, student_unembed):
        return L.chunked_token_kl(student_hidden, student_unembed, case["teacher_hidden"],
                                  case["teacher_unembed"], chunk_size=CHUNK)

    # The walk does see [B, T, V] when it exists...
    assert _largest_intermediate(naive, *args) >= full_logits_size
    # ...and the chunked loss's forward+backward has nothing that large: no [B, T, V]
    # logits, and no per-chunk stack of residuals ([T/CHUNK, D, V] would also trip it).
    assert _largest_intermediate(chunked, *args) < full_logits_size


def test_token_kl_masks_and_bf16():
    case = _token_case()
    garbled = case["student_hidden"].at[~case["mask"]].set(1e3)

    @jax.jit
    def run(student_hidden, garbled, student_unembed, teacher_hidden, teacher_unembed, mask):
        def loss(student_hidden, mask, dtype=jnp.float32):
            inputs = (student_hidden, student_unembed, teacher_hidden, teacher_unembed)
            return L.chunked_token_kl(*(x.astype(dtype) for x in inputs), mask,
                                      chunk_size=CHUNK)
        return (loss(student_hidden, mask), loss(garbled, mask),
                loss(student_hidden, jnp.zeros_like(mask)),
                loss(student_hidden, mask, jnp.bfloat16))

    value, garbled_value, all_masked_value, bf16_value = run(
        case["student_hidden"], garbled, case["student_unembed"], case["teacher_hidden"],
        case["teacher_unembed"], case["mask"])
    _close(garbled_value, value)
    _close(all_masked_value, 0.0)
    assert bf16_value.dtype == jnp.float32
    np.testing.assert_allclose(bf16_value, value, rtol=0.1)


# ------------------------------------------------- (c) masks, T**2, dtypes, registry

# name -> (student shape, target shape, mask shape, hparams); target "labels" = int labels.
_CASES = {
    "forward_kl": ((2, 3, 5), (2, 3, 5), (2, 3), dict(temperature=2.0)),
    "reverse_kl": ((2, 3, 5), (2, 3, 5), (2, 3), dict(temperature=2.0)),
    "jsd": ((2, 3, 5), (2, 3, 5), (2, 3), dict(beta=0.3, temperature=2.0)),
    "logit_mse": ((2, 3, 5), (2, 3, 5), (2, 3), {}),
    "bce": ((4, 3), (4, 3), (4, 3), {}),
    "soft_bce": ((4, 3), (4, 3), (4, 3), dict(temperature=2.0)),
    "listnet": ((3, 5), (3, 5), (3, 5), dict(temperature=2.0)),
    "margin_mse": ((3, 5), (3, 5), (3, 5), {}),
    "hidden_mse": ((2, 3, 3), (2, 3, 4), (2, 3), {}),
    "hidden_cosine": ((2, 3, 3), (2, 3, 4), (2, 3), {}),
    "cross_entropy": ((2, 3, 5), "labels", (2, 3), dict(label_smoothing=0.1)),
}


def _case(name, seed=12):
    rng = _rng(seed)
    student_shape, target_shape, mask_shape, hparams = _CASES[name]
    student = _logits(rng, *student_shape)
    if target_shape == "labels":
        target = rng.integers(0, student_shape[-1], mask_shape)
    elif name == "bce":
        target = rng.random(target_shape).astype(np.float32)
    else:
        target = _logits(rng, *target_shape)
    mask = (rng.random(mask_shape) < 0.6).astype(np.float32)  # 0/1 floats, not bool
    mask.flat[0] = 1.0
    if name.startswith("hidden"):
        hparams = dict(hparams, projection_DsxDt=_logits(rng, 3, 4, scale=0.5))
    return student, target, mask, hparams


def _garble(x, mask, value):
    # Masked positions get `value`; a [..., K] mask may cover fewer dims than x.
    keep = mask.astype(bool).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return np.where(keep, x, np.asarray(value, x.dtype))


@pytest.mark.parametrize("name", sorted(_CASES))
def test_masked_rows_change_nothing_and_all_masked_is_zero(name):
    fn = L.LOSSES[name]
    student, target, mask, hparams = _case(name)
    garbled_student = _garble(student, mask, -1e3)
    garbled_target = _garble(target, mask, 999 if target.dtype.kind == "i" else 1e3)

    @jax.jit  # one compile rather than one per eager op: the suite runs on 2 busy cores
    def run(student, target, garbled_student, garbled_target, mask):
        all_masked = jnp.zeros_like(mask)
        return (fn(student, target, mask, **hparams),
                fn(garbled_student, garbled_target, mask, **hparams),
                *jax.value_and_grad(lambda s: fn(s, target, all_masked, **hparams))(student))

    value, garbled_value, all_masked_value, all_masked_grad = run(
        student, target, garbled_student, garbled_target, mask)
    _close(garbled_value, value)
    # All masked: exactly 0 and a zero gradient, never NaN.
    _close(all_masked_value, 0.0)
    assert np.all(np.asarray(all_masked_grad) == 0)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "soft_bce", "listnet"])
def test_temperature_squared_scaling(name):
    fn = L.LOSSES[name]
    student, target, mask, hparams = _case(name)
    hparams = {k: v for k, v in hparams.items() if k != "temperature"}
    temperature = 4.0

    @jax.jit
    def run(student, target, mask):
        return (fn(student, target, mask, temperature=temperature, **hparams),
                temperature**2 * fn(student / temperature, target / temperature, mask,
                                    **hparams))

    _close(*run(student, target, mask))


def test_temperature_squared_keeps_gradient_scale():
    # Hinton et al.: for large T, d(T**2 KL)/d logits -> (centred s - centred t) / C, the
    # logit-matching gradient, whatever T. Without T**2 it would shrink like 1/T**2.
    rng = _rng(13)
    s, t = _logits(rng, 1, 6, scale=0.5), _logits(rng, 1, 6, scale=0.5)
    grad = jax.jit(jax.grad(_jit(L.forward_kl, temperature=100.0)))(s, t)
    centred = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
    np.testing.assert_allclose(grad, centred / 6, atol=2e-3)  # 1% of the scale


def test_traced_temperature_is_not_value_checked():
    s, t = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    s[0, 0] = 1.0
    scheduled = jax.jit(lambda temperature: L.forward_kl(s, t, temperature=temperature))
    _close(scheduled(2.0), _jit(L.forward_kl, temperature=2.0)(s, t))


# Primitives that only move or pad values (or wrap a sub-jaxpr, walked separately).
_LAYOUT_PRIMITIVES = {"stop_gradient", "pad", "reshape", "transpose", "slice", "jit",
                      "convert_element_type", "broadcast_in_dim", "squeeze"}


def test_bf16_inputs_are_computed_in_float32():
    # Traced, not compiled: in each loss's jaxpr bf16 values are only moved or padded,
    # never computed with (no bf16 arithmetic), and the result is a float32 scalar.
    cases = {name: _case(name) for name in _CASES}
    token = _token_case()
    cases["token_kl"] = (
        (token["student_hidden"], token["student_unembed"], token["teacher_hidden"],
         token["teacher_unembed"]), None, token["mask"], dict(chunk_size=CHUNK))
    for name, (student, target, mask, hparams) in cases.items():
        arrays = student if name == "token_kl" else (student, target)
        arrays = [a if a.dtype.kind == "i" else jnp.asarray(a, jnp.bfloat16) for a in arrays]
        if name.startswith("hidden"):
            hparams = dict(hparams, projection_DsxDt=jnp.asarray(hparams["projection_DsxDt"],
                                                                 jnp.bfloat16))
        fn = functools.partial(L.LOSSES[name], **hparams)
        closed = jax.make_jaxpr(lambda *arrays: fn(*arrays, mask))(*arrays)
        assert closed.out_avals[0].dtype == jnp.float32, name
        bf16_arithmetic = [
            eqn.primitive.name for eqn in _all_eqns(closed.jaxpr)
            if eqn.primitive.name not in _LAYOUT_PRIMITIVES
            and any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.outvars)]
        assert bf16_arithmetic == [], (name, bf16_arithmetic)


def test_kl_ignores_teacher_minus_inf_logits():
    # A teacher that bans a token (-inf logit) gives p=0 there: no NaN, value or gradient.
    s = np.array([[0.5, 0.0, -1.0]], np.float32)
    t = np.array([[LN3, 0.0, -np.inf]], np.float32)
    value, grad = jax.jit(jax.value_and_grad(L.forward_kl))(s, t)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    _close(lambda: L.generalized_jsd(s, t, beta=0.5),
           _jit(L.generalized_jsd, beta=0.5)(s, np.where(np.isinf(t), -1e4, t)))


def test_registry():
    assert set(L.LOSSES) == {
        "forward_kl", "reverse_kl", "jsd", "logit_mse", "bce", "soft_bce", "listnet",
        "margin_mse", "hidden_mse", "hidden_cosine", "cross_entropy", "token_kl",
        "sparse_token_kl", "uld", "token_ce"}
    assert L.LOSSES["token_kl"].fn is L.chunked_token_kl
    assert {name for name, loss in L.LOSSES.items() if loss.level == "token"} == {
        "token_kl", "sparse_token_kl", "uld", "token_ce"}


# -------------------------------------------------------------- (d) validation errors

_S, _T = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("call, match", [
    (lambda: L.forward_kl(_S, _T, temperature=0.0),
     r"forward_kl: temperature must be a number > 0, got 0.0"),
    (lambda: L.reverse_kl(_S, _T, temperature=-1),
     r"reverse_kl: temperature must be a number > 0, got -1"),
    (lambda: L.soft_binary_cross_entropy(_S, _T, temperature="2"),
     r"temperature must be a number > 0, got '2'"),
    (lambda: L.generalized_jsd(_S, _T, beta=1.5),
     r"generalized_jsd: beta must be a number in \[0, 1\], got 1.5"),
    (lambda: L.forward_kl(_S, np.zeros((2, 4))),
     r"teacher_logits must have the shape of student_logits \(2, 3\), got \(2, 4\)"),
    (lambda: L.logit_mse(_S, _T, np.ones(3)),
     r"logit_mse: mask must have shape \(2,\) \(the logits' leading dims\), got \(3,\)"),
    (lambda: L.binary_cross_entropy(_S, _T, np.ones(2)),
     r"mask must have shape \(2, 3\) \(one entry per logit.*\), got \(2,\)"),
    (lambda: L.listwise_softmax_cross_entropy(_S, _T, np.ones(2)),
     r"mask must have shape \(2, 3\) \(one entry per candidate\), got \(2,\)"),
    (lambda: L.pairwise_margin_mse(_S, np.zeros(3)),
     r"teacher_scores must have the shape of student_scores \(2, 3\), got \(3,\)"),
    (lambda: L.cross_entropy(_S, np.zeros(2), label_smoothing=0.0),
     r"labels must be integer class ids, got dtype float"),
    (lambda: L.cross_entropy(_S, np.zeros(3, np.int32)),
     r"labels must have the logits' leading dims \(2,\), got \(3,\)"),
    (lambda: L.cross_entropy(_S, np.zeros(2, np.int32), label_smoothing=1.0),
     r"label_smoothing must be a number in \[0, 1\), got 1.0"),
    (lambda: L.hidden_mse(_S, np.zeros((2, 4))),
     r"hidden_mse: student width 3 != teacher width 4; pass projection_DsxDt of shape "
     r"\(3, 4\)"),
    (lambda: L.hidden_cosine(_S, np.zeros((2, 4)), projection_DsxDt=np.zeros((4, 3))),
     r"projection_DsxDt must have shape \(student width 3, teacher width 4\), got \(4, 3\)"),
    (lambda: L.hidden_mse(_S, np.zeros((5, 3))),
     r"teacher_hidden must have the leading dims of student_hidden \(2,\), got \(5,\)"),
])
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_token_kl_validation_errors():
    case = _token_case(vocab_student=64, vocab_teacher=80)
    args = (case["student_hidden"], case["student_unembed"], case["teacher_hidden"],
            case["teacher_unembed"])
    with pytest.raises(ValueError, match=r"student vocabulary 64 != teacher vocabulary 80"):
        L.chunked_token_kl(*args)
    with pytest.raises(ValueError, match=r"vocab_size 72 exceeds an unembedding width "
                                         r"\(student 64, teacher 80\)"):
        L.chunked_token_kl(*args, vocab_size=72)
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1, got 0"):
        L.chunked_token_kl(*args, chunk_size=0, vocab_size=64)
    with pytest.raises(ValueError, match=r"kind must be one of \['forward', 'reverse', 'jsd'\], "
                                         r"got 'sideways'"):
        L.chunked_token_kl(*args, kind="sideways", vocab_size=64)
    with pytest.raises(ValueError, match=r"student_unembed must be \[16, V\] to match "
                                         r"student_hidden's width 16, got shape \(24, 64\)"):
        L.chunked_token_kl(args[0], args[3][:, :64], *args[2:], vocab_size=64)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 20\)"):
        L.chunked_token_kl(*args, jnp.ones((2, 19)), vocab_size=64)


def test_check_hparams():
    L.check_hparams("jsd", {"beta": 0.0, "temperature": 2})
    L.check_hparams("token_kl", {"chunk_size": 64, "kind": "reverse", "vocab_size": 1000})
    L.check_hparams("logit_mse", {})
    with pytest.raises(ValueError, match=r"unknown loss 'kl'; expected one of \["):
        L.check_hparams("kl", {})
    with pytest.raises(ValueError, match=r"loss 'forward_kl': unknown hyper-parameter\(s\) "
                                         r"\['temp'\]; allowed: \['temperature'\]"):
        L.check_hparams("forward_kl", {"temp": 2.0})
    # A projection is a model parameter passed at call time, not a config value.
    with pytest.raises(ValueError, match=r"allowed: \[\]"):
        L.check_hparams("hidden_mse", {"projection_DsxDt": 1.0})
    for name, hparams, match in [
        ("forward_kl", {"temperature": 0}, r"temperature must be a number > 0"),
        ("soft_bce", {"temperature": "1.0"}, r"temperature must be a number > 0, got '1.0'"),
        ("jsd", {"beta": -0.1}, r"beta must be a number in \[0, 1\], got -0.1"),
        ("cross_entropy", {"label_smoothing": 1}, r"label_smoothing must be .* got 1"),
        ("token_kl", {"chunk_size": 0}, r"chunk_size must be an int >= 1, got 0"),
        ("token_kl", {"chunk_size": 8.0}, r"chunk_size must be an int >= 1, got 8.0"),
        ("token_kl", {"kind": "both"}, r"kind must be one of"),
        ("token_kl", {"vocab_size": 0}, r"vocab_size must be None or an int >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            L.check_hparams(name, hparams)
