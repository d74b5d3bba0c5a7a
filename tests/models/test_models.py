"""Models: full-size shapes and parameter counts (free, by eval_shape), numerics on tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from pydantic import ValidationError

from jaxdistill import parallel
from jaxdistill.models import decoder, encoder
from jaxdistill.models.model import ModelConfig, count_params, functional
from weights import random_params as _random_params

# ------------------------------------------------------------------ full-size configs (abstract)


def _decoder_count(cfg, *, embeddings=True):
    d, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    per_layer = (
        d * q + 2 * d * kv + q * d  # q, k, v, o projections (no bias)
        + 3 * d * cfg.mlp  # gate, up, down
        + 2 * d + 2 * cfg.head_dim  # input/post-attention norms, q/k norms
    )
    table = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return per_layer * cfg.layers + d + (table if embeddings else 0)


def _bert_count(cfg, *, embeddings=True):
    d, f = cfg.hidden, cfg.mlp
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    tables = (cfg.vocab_size if embeddings else 0) * d + cfg.max_positions * d
    return per_layer * cfg.layers + tables + cfg.type_vocab_size * d + 2 * d


@pytest.mark.parametrize(
    "make, known_total",
    [(decoder.qwen3_0_6b, 596_049_920), (decoder.qwen3_1_7b, 1_720_574_976)],
)
def test_qwen3_shaped_parameter_counts(make, known_total):
    cfg = make()
    model = functional(ModelConfig(backbone=cfg))  # abstract: no weight is allocated
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(model.shapes))
    assert count_params(model.shapes) == _decoder_count(cfg) == known_total
    assert count_params(model.shapes, exclude_embeddings=True) == _decoder_count(
        cfg, embeddings=False)
    layers = model.shapes["backbone"]["layers"]["layer"]
    assert layers["q_proj"]["kernel"].shape == (28, cfg.hidden, 16 * 128)
    assert layers["k_proj"]["kernel"].shape == (28, cfg.hidden, 8 * 128)
    assert model.axes["backbone"]["layers"]["layer"]["q_proj"]["kernel"] == (
        "layers", "embed", "heads")
    assert "lm_head" not in model.shapes["backbone"]  # tied
    assert model.shapes["backbone"]["embed"]["embedding"].dtype == jnp.float32
    # Untied output projection: one more vocab x hidden table.
    untied = functional(ModelConfig(backbone=make(tie_embeddings=False)))
    assert count_params(untied.shapes) == known_total + cfg.vocab_size * cfg.hidden
    # Full-size shardings are computable without weights: q_proj over fsdp x tensor.
    mesh = parallel.make_mesh((2, 2, 2))
    shardings = model.shardings(mesh, parallel.DEFAULT_RULES)
    assert shardings["backbone"]["layers"]["layer"]["q_proj"]["kernel"].spec == P(
        None, "fsdp", "tensor")


def test_bert_base_shaped_parameter_count():
    cfg = encoder.bert_base()
    model = functional(ModelConfig(backbone=cfg))
    # bert-base-uncased is 109,482,240 with its pooler (768 * 768 + 768), kept only on request.
    assert count_params(model.shapes) == _bert_count(cfg) == 109_482_240 - (768 * 768 + 768)
    assert count_params(model.shapes, exclude_embeddings=True) == _bert_count(
        cfg, embeddings=False)
    with_pooler = functional(ModelConfig(backbone=encoder.bert_base(pooler=True)))
    assert count_params(with_pooler.shapes) == 109_482_240


def test_gemma3_1b_shaped_parameter_count():
    """google/gemma-3-1b-pt has 999,885,952 weights (tied; 4 norms per layer + q/k norms)."""
    cfg = decoder.DecoderConfig(
        family="gemma3", vocab_size=262_144, hidden=1152, layers=26, heads=4, kv_heads=1,
        head_dim=256, mlp=6912, layer_types=(("sliding_attention",) * 5 + ("full_attention",)) * 4
        + ("sliding_attention",) * 2, sliding_window=512, rope_local_theta=10_000.0,
        query_pre_attn_scalar=256)
    model = functional(ModelConfig(backbone=cfg))
    assert count_params(model.shapes) == 999_885_952
    layer = model.shapes["backbone"]["layers"]["layer"]
    assert layer["mlp_out_norm"]["scale"].shape == (26, 1152)


def test_heads_add_their_parameters():
    base = ModelConfig(backbone=decoder.qwen3_0_6b())
    heads = {
        "relevance": {"type": "token_score", "token_ids": [2753, 9454]},  # parameter-free
        "actions": {"type": "actions", "names": ["click", "apply", "dismiss"], "features": 16},
        "grade": {"type": "classifier", "classes": 5},
        "project": {"type": "projection", "out_dim": 2048},
        "lm": {"type": "lm"},  # parameter-free
    }
    with_heads = functional(ModelConfig(backbone=decoder.qwen3_0_6b(), heads=heads))
    extra = (1024 + 16) * 3 + 3 + 1024 * 5 + 5 + 1024 * 2048 + 2048
    assert count_params(with_heads.shapes) == count_params(functional(base).shapes) + extra
    assert set(with_heads.shapes["heads"]) == {"actions", "grade", "project"}


# ------------------------------------------------------------------ tiny numerics

TINY_DECODER = dict(type="decoder", vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2,
                    head_dim=8, mlp=64, dtype="float32", remat="none")
TINY_ENCODER = dict(type="encoder", vocab_size=64, hidden=32, layers=2, heads=4, mlp=64,
                    max_positions=32, dtype="float32", remat="none")
HEADS = {
    "relevance": {"type": "token_score", "token_ids": [7, 9]},
    "actions": {"type": "actions", "names": ["click", "apply"], "features": 3, "hidden": 8},
}
ENCODER_HEADS = {
    "relevance": {"type": "classifier", "classes": 2},
    "actions": {"type": "actions", "names": ["click", "apply"]},
}


def _forward(model):
    """Jitted (hidden states, outputs) of a bound model."""

    def run(params, batch):
        bound = model.bind(params)
        hidden = bound.backbone(batch["input_ids"], batch["attention_mask"])
        return hidden, bound(batch)

    return jax.jit(run)


def _batch(lengths, t, seed=0, features=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, size=(len(lengths), t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    feats = rng.normal(size=(len(lengths), features)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "member_features": feats}


def _padded(batch, extra, seed=1):
    """The same right-padded batch with `extra` more padding positions of random (non-0) ids."""
    b = batch["input_ids"].shape[0]
    junk = np.random.default_rng(seed).integers(1, 64, size=(b, extra)).astype(np.int32)
    return {
        **batch,
        "input_ids": np.concatenate([batch["input_ids"], junk], 1),
        "attention_mask": np.concatenate([batch["attention_mask"], np.zeros_like(junk)], 1),
    }


@pytest.fixture(scope="module")
def tiny_decoder():
    model = functional(ModelConfig(backbone=TINY_DECODER, heads=HEADS))
    return model, _random_params(model, 0), _forward(model)


@pytest.fixture(scope="module")
def tiny_encoder():
    model = functional(ModelConfig(backbone=TINY_ENCODER, heads=ENCODER_HEADS))
    return model, _random_params(model, 1), _forward(model)


def test_init_matches_the_abstract_shapes(tiny_decoder):
    model = tiny_decoder[0]
    params = model.init(0)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), model.shapes)
    layer = params["backbone"]["layers"]["layer"]
    np.testing.assert_array_equal(layer["input_norm"]["scale"], 1.0)
    # Each stacked layer has its own weights.
    assert float(jnp.abs(layer["q_proj"]["kernel"][0] - layer["q_proj"]["kernel"][1]).max()) > 0
    np.testing.assert_allclose(np.std(params["backbone"]["embed"]["embedding"]), 0.02, rtol=0.1)


def _assert_padding_invariant(forward, params, lengths):
    batch = _batch(lengths, 8)
    # Also scramble the ids already in padding positions: they must not leak either.
    scrambled = {**batch, "input_ids": np.where(batch["attention_mask"] == 1, batch["input_ids"],
                                                 (batch["input_ids"] * 7) % 63 + 1)}
    hidden, outputs = forward(params, batch)
    hidden_p, outputs_p = forward(params, _padded(scrambled, 5))
    assert hidden_p.shape[1] == 13
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(hidden_p[row, :n], hidden[row, :n], rtol=1e-5, atol=1e-5)
    assert set(outputs) == set(outputs_p)
    for key in outputs:
        np.testing.assert_allclose(outputs_p[key], outputs[key], rtol=1e-5, atol=1e-5, err_msg=key)
    return hidden, outputs


def test_decoder_padding_invariance(tiny_decoder):
    _, params, forward = tiny_decoder
    _, outputs = _assert_padding_invariant(forward, params, [5, 8, 1, 3])
    assert outputs["relevance"].shape == (4, 2) and outputs["actions"].shape == (4, 2)
    assert outputs["pooled"].shape == (4, 32)


def test_encoder_padding_invariance(tiny_encoder):
    _, params, forward = tiny_encoder
    _assert_padding_invariant(forward, params, [5, 8, 1, 3])


def test_encoder_mean_pooling_padding_invariance(tiny_encoder):
    model = functional(ModelConfig(backbone={**TINY_ENCODER, "pooling": "mean"},
                                   heads=ENCODER_HEADS))
    params = tiny_encoder[1]  # same weights, other pooling
    _, outputs = _assert_padding_invariant(_forward(model), params, [5, 8, 1, 3])
    hidden, _ = _forward(model)(params, _batch([5, 8, 1, 3], 8))
    np.testing.assert_allclose(outputs["pooled"][0], hidden[0, :5].mean(0), rtol=1e-5, atol=1e-6)


def test_decoder_is_causal(tiny_decoder):
    _, params, forward = tiny_decoder
    batch = _batch([8, 8, 8, 8], 8)
    changed = {**batch, "input_ids": batch["input_ids"].copy()}
    changed["input_ids"][:, 5] = (changed["input_ids"][:, 5] % 63) + 1
    hidden, _ = forward(params, batch)
    hidden_c, _ = forward(params, changed)
    np.testing.assert_allclose(hidden_c[:, :5], hidden[:, :5], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(hidden_c[:, 5:] - hidden[:, 5:]).min(axis=-1).max()) > 0
    assert float(jnp.abs(hidden_c[:, 5] - hidden[:, 5]).max()) > 1e-3


def test_encoder_is_bidirectional(tiny_encoder):
    _, params, forward = tiny_encoder
    batch = _batch([8, 8, 8, 8], 8)
    changed = {**batch, "input_ids": batch["input_ids"].copy()}
    changed["input_ids"][:, 5] = (changed["input_ids"][:, 5] % 63) + 1
    hidden, _ = forward(params, batch)
    hidden_c, _ = forward(params, changed)
    assert float(jnp.abs(hidden_c[:, 0] - hidden[:, 0]).max()) > 1e-4  # earlier positions see it


def test_listwise_leading_dims_equal_flattening(tiny_decoder):
    model, params, _ = tiny_decoder
    b, n, t = 2, 3, 8
    flat = _batch([5, 8, 1, 3, 7, 2], t, seed=3)
    member_BxF = flat["member_features"][:b]
    listwise = {
        "input_ids": flat["input_ids"].reshape(b, n, t),
        "attention_mask": flat["attention_mask"].reshape(b, n, t),
        "member_features": member_BxF,  # one member per list, broadcast over candidates
    }
    flat["member_features"] = np.repeat(member_BxF, n, axis=0)
    apply = jax.jit(model.apply)
    out_list, out_flat = apply(params, listwise), apply(params, flat)
    for key in ("relevance", "actions", "pooled"):
        assert out_list[key].shape[:2] == (b, n)
        np.testing.assert_allclose(out_list[key].reshape(out_flat[key].shape), out_flat[key],
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    # The member features matter (so the broadcast above is really exercised).
    other = apply(params, {**listwise, "member_features": member_BxF[::-1]})
    assert float(jnp.abs(other["actions"] - out_list["actions"]).max()) > 1e-4


def test_action_features_errors(tiny_decoder):
    model, params, _ = tiny_decoder
    batch = _batch([3], 4)
    with pytest.raises(ValueError, match="needs 'member_features' in the batch"):
        jax.eval_shape(model.apply, params,
                       {k: v for k, v in batch.items() if k != "member_features"})
    with pytest.raises(ValueError, match="member_features has width 2, the action head expects 3"):
        jax.eval_shape(model.apply, params,
                       {**batch, "member_features": np.zeros((1, 2), np.float32)})


@pytest.mark.parametrize("tie", [True, False])
def test_token_score_equals_full_vocab_logits_at_last_real_position(tiny_decoder, tie):
    model = functional(ModelConfig(backbone={**TINY_DECODER, "tie_embeddings": tie},
                                   heads=HEADS))
    params = tiny_decoder[1]
    if not tie:  # the tied weights plus an output projection of their own
        lm_head = np.random.default_rng(5).normal(size=(32, 64)).astype(np.float32)
        params = {**params, "backbone": {**params["backbone"], "lm_head": {"kernel": lm_head}}}
    lengths = [5, 8, 1]
    batch = _batch(lengths, 8)

    @jax.jit
    def both(params, batch):
        bound = model.bind(params)
        hidden_BxTxD = bound.backbone(batch["input_ids"], batch["attention_mask"])
        logits_BxTxV = hidden_BxTxD @ bound.backbone.unembedding()
        return logits_BxTxV, bound(batch)["relevance"]

    logits_BxTxV, scores_Bx2 = both(params, batch)
    assert logits_BxTxV.shape == (3, 8, 64)
    expected = np.stack([logits_BxTxV[i, n - 1, [7, 9]] for i, n in enumerate(lengths)])
    np.testing.assert_allclose(scores_Bx2, expected, rtol=1e-5, atol=1e-6)
    # Not the logits of the last (padding) position, nor of other tokens.
    assert float(jnp.abs(scores_Bx2[0] - logits_BxTxV[0, -1, [7, 9]]).max()) > 1e-5
    assert ("lm_head" in params["backbone"]) != tie


def _hlo_size(backbone, layers):
    model = functional(ModelConfig(backbone={**backbone, "layers": layers}, heads={}))
    batch = {"input_ids": jax.ShapeDtypeStruct((2, 8), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((2, 8), jnp.int32)}

    def loss(params, batch):
        return jnp.sum(model.apply(params, batch)["pooled"])

    forward = jax.jit(model.apply).lower(model.shapes, batch).as_text()
    backward = jax.jit(jax.grad(loss)).lower(model.shapes, batch).as_text()
    return len(forward), len(backward)


@pytest.mark.parametrize("backbone", [{**TINY_DECODER, "remat": "full"}, TINY_ENCODER],
                         ids=["decoder", "encoder"])
def test_layer_stack_program_does_not_grow_with_depth(backbone):
    fwd_2, bwd_2 = _hlo_size(backbone, 2)
    fwd_8, bwd_8 = _hlo_size(backbone, 8)
    fwd_1, _ = _hlo_size({**backbone, "layers": 1}, 1)
    # Only shape literals differ (2 -> 8); an unrolled stack would be ~4x the text.
    assert abs(fwd_8 - fwd_2) / fwd_2 < 0.02, (fwd_2, fwd_8)
    assert abs(bwd_8 - bwd_2) / bwd_2 < 0.02, (bwd_2, bwd_8)
    assert abs(fwd_1 - fwd_2) / fwd_2 < 0.02, (fwd_1, fwd_2)


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients(tiny_decoder):
    cfg = ModelConfig(backbone=TINY_DECODER, heads=HEADS)
    params = tiny_decoder[1]
    batch = _batch([5, 8, 2], 8, seed=4)
    policies = ("none", "full", "dots")

    def loss(params, model):
        out = model.apply(params, batch)
        return jnp.sum(out["relevance"] ** 2) + jnp.sum(jnp.sin(out["actions"]))

    models = [functional(cfg.with_numerics(remat=policy)) for policy in policies]
    # One program for the three policies: one compile instead of three.
    grads = jax.jit(lambda p: [jax.grad(loss)(p, m) for m in models])(params)
    reference = grads[0]
    for policy, policy_grads in zip(policies[1:], grads[1:]):
        for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(policy_grads),
                                  jax.tree.leaves(reference)):
            scale = float(jnp.abs(ref).max())
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path)}")
    q_grad = reference["backbone"]["layers"]["layer"]["q_proj"]["kernel"]
    assert float(jnp.abs(q_grad).max()) > 1e-4
    # The policies really differ in the program: remat re-runs layer matmuls in the backward.
    hlo = {policy: jax.jit(jax.grad(loss), static_argnums=1).lower(params, m).as_text()
           for policy, m in zip(policies, models)}
    assert hlo["none"].count("dot_general") < hlo["full"].count("dot_general")


def test_encoder_input_errors(tiny_encoder):
    model, params, _ = tiny_encoder
    batch = _batch([3], 4)
    with pytest.raises(ValueError, match="does not support packed sequences"):
        jax.eval_shape(model.apply, params, {**batch, "segment_ids": np.ones((1, 4), np.int32)})
    long = _batch([3], 33)
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_positions 32"):
        jax.eval_shape(model.apply, params, long)


def test_bind_checks_the_number_of_arrays(tiny_decoder):
    model, params, _ = tiny_decoder
    broken = {**params, "heads": {}}
    with pytest.raises(ValueError, match=r"params have \d+ arrays, the model expects \d+"):
        model.bind(broken)


# ------------------------------------------------------------------ config validation


def test_model_config_validation_errors():
    with pytest.raises(ValidationError, match="needs a decoder backbone"):
        ModelConfig(backbone=TINY_ENCODER, heads={"relevance": HEADS["relevance"]})
    with pytest.raises(ValidationError, match="needs a decoder backbone"):
        ModelConfig(backbone=TINY_ENCODER, heads={"lm": {"type": "lm"}})
    with pytest.raises(ValidationError, match=r"token ids \[64, -1\] outside vocabulary of size 64"):
        ModelConfig(backbone=TINY_DECODER,
                    heads={"relevance": {"type": "token_score", "token_ids": [7, 64, -1]}})
    with pytest.raises(ValidationError, match=r"heads \(6\) must be a multiple of kv_heads \(4\)"):
        ModelConfig(backbone={**TINY_DECODER, "heads": 6, "kv_heads": 4})
    with pytest.raises(ValidationError, match="head_dim must be even"):
        ModelConfig(backbone={**TINY_DECODER, "head_dim": 7})
    with pytest.raises(ValidationError, match=r"hidden \(32\) must be a multiple of heads \(5\)"):
        ModelConfig(backbone={**TINY_ENCODER, "heads": 5})
    with pytest.raises(ValidationError, match="'pooled' is reserved"):
        ModelConfig(backbone=TINY_DECODER, heads={"pooled": {"type": "classifier", "classes": 2}})
    with pytest.raises(ValidationError, match="hiden"):  # unknown keys refused
        ModelConfig(backbone={**TINY_DECODER, "hiden": 32})
    with pytest.raises(ValidationError, match="regression"):
        ModelConfig(backbone=TINY_DECODER, heads={"x": {"type": "regression"}})
    with pytest.raises(ValidationError, match="classes"):
        ModelConfig(backbone=TINY_DECODER, heads={"x": {"type": "classifier", "classes": 0}})


def test_action_head_reads_the_logged_position_one_hot():
    import jax.numpy as jnp

    cfg = ModelConfig(
        backbone={"type": "decoder", "vocab_size": 64, "hidden": 16, "layers": 1, "heads": 2,
                  "kv_heads": 1, "head_dim": 8, "mlp": 32, "dtype": "float32"},
        heads={"actions": {"type": "actions", "names": ["click"], "position_buckets": 3}})
    model = functional(cfg)
    params = model.init(0)
    ids = jnp.full((1, 4, 6), 5, jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
             "position": jnp.array([[0, 1, 2, 9]])}
    logits = np.asarray(model.apply(params, batch)["actions"][0, :, 0])
    # Same text, so the logits differ by the position bucket's weight only; 9 -> last bucket.
    kernel = np.asarray(params["heads"]["actions"]["out"]["kernel"])
    pooled_part = logits[0] - kernel[16 + 0, 0]
    np.testing.assert_allclose(logits - pooled_part, kernel[16 + np.array([0, 1, 2, 2]), 0],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the logged 'position'"):
        model.apply(params, {k: v for k, v in batch.items() if k != "position"})


def test_action_priors_set_the_initial_rates():
    """`prior` starts each action at its base rate; `position_prior` starts a linear head as
    the position-only model exactly: p(action | position) = the logged rate (the pooled
    state's and the features' rows start at zero; `prior` alone leaves them random)."""
    rates = ((0.01, 0.2, 0.05), (0.3, 0.1, 0.6))
    heads = {"actions": {"type": "actions", "names": ["click", "apply"], "features": 3,
                         "position_buckets": 3, "position_prior": rates},
             "base": {"type": "actions", "names": ["click", "apply"], "prior": [0.02, 0.5]}}
    model = functional(ModelConfig(backbone=TINY_DECODER, heads=heads))
    batch = {**_batch([5, 5, 5, 5], 6), "position": np.array([0, 1, 2, 7], np.int32)}
    out = model.apply(model.init(0), batch)
    log_odds = lambda p: np.log(np.asarray(p) / (1 - np.asarray(p)))  # noqa: E731
    want = log_odds(np.array(rates).T[[0, 1, 2, 2]])  # position 7 reads the last bucket
    np.testing.assert_allclose(out["actions"], want, rtol=1e-5, atol=1e-5)
    # `prior` sets the bias only: 0.02-scale random weights over unit-RMS inputs remain.
    np.testing.assert_allclose(out["base"], log_odds([[0.02, 0.5]] * 4), atol=0.5)
    # feature_prior: the member features' rows start at the given weights.
    weights = ((0.5, -1.0, 2.0), (0.0, 1.5, -0.5))
    personal = {"actions": {**heads["actions"], "feature_prior": weights}}
    model = functional(ModelConfig(backbone=TINY_DECODER, heads=personal))
    features = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.2, 0.2, 0.2], [1.0, 1.0, 0.0]],
                        np.float32)
    out = model.apply(model.init(0), {**batch, "member_features": features})
    np.testing.assert_allclose(out["actions"], want + features @ np.array(weights).T,
                               rtol=1e-5, atol=1e-5)
    # pooled_prior: the pooled state's rows too (a linear probe's weights).
    pooled_weights = np.random.default_rng(0).normal(size=(2, 32))
    probed = {"actions": {**personal["actions"], "pooled_prior": pooled_weights.tolist()}}
    model = functional(ModelConfig(backbone=TINY_DECODER, heads=probed))
    out = model.apply(model.init(0), {**batch, "member_features": features})
    np.testing.assert_allclose(out["actions"], want + features @ np.array(weights).T
                               + np.asarray(out["pooled"]) @ pooled_weights.T,
                               rtol=1e-5, atol=1e-5)
    narrow = {"actions": {**probed["actions"], "pooled_prior": pooled_weights[:, :8].tolist()}}
    with pytest.raises(ValueError, match="rows of 8 weights; the backbone.s pooled state is 32"):
        functional(ModelConfig(backbone=TINY_DECODER, heads=narrow)).init(0)
    bad = {"type": "actions", "names": ["click"], "position_buckets": 3}
    with pytest.raises(ValidationError, match="pooled_prior .* needs position_prior"):
        ModelConfig(backbone=TINY_DECODER, heads={"a": {**bad, "pooled_prior": [[1.0, 2.0]]}})
    with pytest.raises(ValidationError, match="pooled_prior must hold 1 rows"):
        ModelConfig(backbone=TINY_DECODER, heads={"a": {
            **bad, "position_prior": [[0.1, 0.2, 0.3]], "pooled_prior": [[1.0], [2.0]]}})
    with pytest.raises(ValidationError, match="1 rows .* of 2 weights"):
        ModelConfig(backbone=TINY_DECODER, heads={"a": {
            **bad, "features": 2, "position_prior": [[0.1, 0.2, 0.3]], "feature_prior": [[1.0]]}})
    with pytest.raises(ValidationError, match="needs position_prior"):
        ModelConfig(backbone=TINY_DECODER,
                    heads={"a": {**bad, "features": 1, "feature_prior": [[1.0]]}})
    with pytest.raises(ValidationError, match="1 rows .* of 3 rates"):
        ModelConfig(backbone=TINY_DECODER, heads={"a": {**bad, "position_prior": [[0.1, 0.2]]}})
    with pytest.raises(ValidationError, match="needs hidden: 0"):
        ModelConfig(backbone=TINY_DECODER,
                    heads={"a": {**bad, "hidden": 4, "position_prior": [[0.1, 0.2, 0.3]]}})
    with pytest.raises(ValidationError, match="strictly between 0 and 1"):
        ModelConfig(backbone=TINY_DECODER, heads={"a": {**bad, "prior": [0.0]}})
