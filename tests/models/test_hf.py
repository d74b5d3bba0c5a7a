"""HF import/export: parity with transformers' PyTorch models on tiny random checkpoints."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from safetensors.torch import load_file

from jaxdistill import parallel
from jaxdistill.data.tokenizer import build_tokenizer
from jaxdistill.models import hf
from jaxdistill.models.model import functional

VOCAB, T = 128, 10
LENGTHS = (10, 7, 4)  # right-padded rows of different lengths


def _hf_config(family, **kw):
    dims = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)
    if family == "bert":
        return transformers.BertConfig(**dims, max_position_embeddings=32, **kw)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}}
    return cls(**dims, num_key_value_heads=2, head_dim=8, **rope, **kw)


def _save_random(family, path, *, max_shard_size=None, **kw):
    """A random transformers model (every weight perturbed, biases and norms included), saved."""
    torch.manual_seed(0)
    config = _hf_config(family, **kw)
    cls = transformers.BertModel if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **extra)
    return model


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(len(LENGTHS), T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return ids * mask, mask


def _token_types():
    """A BERT pair: segment B from position 3 on (for encoders only)."""
    _, mask = _batch()
    return ((np.arange(T)[None] >= 3) * mask).astype(np.int32)


def _torch_outputs(path, family):
    ids, mask = _batch()
    kw = dict(attn_implementation="eager", dtype=torch.float32)
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    if family == "bert":
        inputs["token_type_ids"] = torch.tensor(_token_types(), dtype=torch.long)
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(path, **kw)(**inputs).last_hidden_state
        logits = None
        if family != "bert":
            lm = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
            logits = lm(**inputs).logits.numpy()
    return hidden.numpy(), logits


def _our_outputs(cfg, params):
    ids, mask = _batch()
    backbone = functional(cfg).bind(params).backbone
    types = _token_types() if cfg.backbone.type == "encoder" else None
    hidden = backbone(jax.numpy.asarray(ids), jax.numpy.asarray(mask), token_type_ids_BxT=types)
    logits = hidden @ backbone.unembedding() if cfg.backbone.type == "decoder" else None
    return np.asarray(hidden), None if logits is None else np.asarray(logits)


def _assert_close_at_real(ours, theirs, rtol=1e-4, mask=None, what="parity"):
    """Max |ours - theirs| over real positions, relative to max |theirs|; printed (pytest -s)."""
    mask = _batch()[1] if mask is None else mask
    real = mask.astype(bool)
    diff = np.max(np.abs(ours[real] - theirs[real]))
    err = diff / np.max(np.abs(theirs[real]))
    print(f"{what}: max abs {diff:.2e}, relative {err:.2e}")
    assert err < rtol, f"{what}: relative error {err:.2e}"


def _leaves_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family,kw", [
    ("llama", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"tie_word_embeddings": True}),
    ("qwen3", {"tie_word_embeddings": False}),
    ("bert", {}),
])
def test_parity_with_transformers(tmp_path, family, kw):
    _save_random(family, tmp_path, **kw)
    cfg, params = hf.load_hf(tmp_path, dtype="float32")
    assert cfg.backbone.family == family
    hidden, logits = _our_outputs(cfg, params)
    torch_hidden, torch_logits = _torch_outputs(tmp_path, family)
    name = f"{family} {kw}"
    _assert_close_at_real(hidden, torch_hidden, what=f"{name} hidden")
    if family != "bert":
        assert cfg.backbone.tie_embeddings == kw["tie_word_embeddings"]
        _assert_close_at_real(logits, torch_logits, what=f"{name} logits")


def _left_padded(ids, mask):
    """The same rows with their padding moved to the left."""
    shift = mask.shape[1] - mask.sum(1)
    roll = lambda x: np.stack([np.roll(row, k) for row, k in zip(x, shift)])  # noqa: E731
    return roll(ids), roll(mask)


def test_left_padding_matches_right_padding_and_transformers(tmp_path):
    _save_random("llama", tmp_path, tie_word_embeddings=False)
    cfg, params = hf.load_hf(tmp_path, dtype="float32",
                             heads={"pair": {"type": "token_score", "token_ids": (5, 9)}})
    model = functional(cfg)
    bound = model.bind(params)
    ids, mask = _batch()
    left_ids, left_mask = _left_padded(ids, mask)
    assert left_mask[2, 0] == 0 and left_mask[2, -1] == 1

    def ours(ids, mask):
        hidden = bound.backbone(jax.numpy.asarray(ids), jax.numpy.asarray(mask))
        return np.asarray(hidden), np.asarray(hidden @ bound.backbone.unembedding())

    right_hidden, right_logits = ours(ids, mask)
    left_hidden, left_logits = ours(left_ids, left_mask)
    real, left_real = mask.astype(bool), left_mask.astype(bool)
    np.testing.assert_allclose(left_hidden[left_real], right_hidden[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(left_logits[left_real], right_logits[real], rtol=1e-5, atol=1e-5)
    # The pooled (last real) token and the head read from it agree too.
    right_out = model.apply(params, {"input_ids": ids, "attention_mask": mask})
    left_out = model.apply(params, {"input_ids": left_ids, "attention_mask": left_mask})
    for key in ("pooled", "pair"):
        np.testing.assert_allclose(left_out[key], right_out[key], rtol=1e-5, atol=1e-5)

    # transformers with the left-padded mask and generate()'s positions (cumsum of the mask).
    positions = np.maximum(np.cumsum(left_mask, 1) - 1, 0)
    inputs = dict(input_ids=torch.tensor(left_ids, dtype=torch.long),
                  attention_mask=torch.tensor(left_mask), position_ids=torch.tensor(positions))
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager")
    with torch.no_grad():
        out = lm(**inputs, output_hidden_states=True)
    _assert_close_at_real(left_hidden, out.hidden_states[-1].numpy(), mask=left_mask,
                          what="llama left-padded hidden")
    _assert_close_at_real(left_logits, out.logits.numpy(), mask=left_mask,
                          what="llama left-padded logits")


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
        rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    cfg, params = hf.load_hf(tmp_path / "hf", dtype="float32")
    assert cfg.backbone.rope_scaling.model_dump() == {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_positions": 16}
    ids, mask = _batch()
    positions = np.broadcast_to(np.arange(40, 40 + T), ids.shape)  # past the original 16
    backbone = functional(cfg).bind(params).backbone

    def ours(backbone):
        hidden = backbone(jax.numpy.asarray(ids), jax.numpy.asarray(mask),
                          positions_BxT=jax.numpy.asarray(positions))
        return np.asarray(hidden), np.asarray(hidden @ backbone.unembedding())

    hidden, logits = ours(backbone)
    with torch.no_grad():
        out = model.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(positions), output_hidden_states=True)
    _assert_close_at_real(hidden, out.hidden_states[-1].numpy(), what="llama3 rope hidden")
    _assert_close_at_real(logits, out.logits.numpy(), what="llama3 rope logits")
    # The scaling matters here: plain RoPE is far off.
    plain = cfg.backbone.model_copy(update={"rope_scaling": None})
    plain_hidden, _ = ours(functional(cfg.model_copy(update={"backbone": plain})).bind(params)
                           .backbone)
    assert np.max(np.abs(plain_hidden - hidden)[mask.astype(bool)]) > 0.1

    out_dir = hf.export_hf(cfg, params, tmp_path / "export")
    exported = transformers.AutoConfig.from_pretrained(out_dir).rope_parameters
    assert exported == LLAMA3_ROPE
    assert hf.load_hf(out_dir, dtype="float32")[0] == cfg
    legacy = {**config.to_dict(), "rope_scaling": dict(LLAMA3_ROPE), "rope_parameters": None}
    assert hf.config_from_hf(legacy).rope_scaling == cfg.backbone.rope_scaling


GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}


def test_gemma3_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        rope_parameters=GEMMA3_ROPE, final_logit_softcapping=3.0, tie_word_embeddings=True)
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    cfg, params = hf.load_hf(tmp_path / "hf", dtype="float32")
    b = cfg.backbone
    assert (b.family, b.layer_types, b.sliding_window, b.rope_local_theta, b.rope_theta) == (
        "gemma3", ("sliding_attention", "full_attention"), 4, 10_000.0, 1e6)
    assert b.rope_scaling.type == "linear" and b.final_softcap == 3.0
    ids, mask = _batch()  # rows of 10, 7 and 4 tokens: longer than the window of 4
    left_ids, left_mask = _left_padded(ids, mask)

    def ours(cfg, ids, mask):
        backbone = functional(cfg).bind(params).backbone
        hidden = backbone(jax.numpy.asarray(ids), jax.numpy.asarray(mask))
        return np.asarray(hidden), np.asarray(backbone.logits(hidden))

    def theirs(ids, mask):
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
        inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
        eager = transformers.Gemma3ForCausalLM.from_pretrained(
            tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            return eager.model(**inputs).last_hidden_state.numpy(), eager(**inputs).logits.numpy()

    hidden, logits = ours(cfg, ids, mask)
    torch_hidden, torch_logits = theirs(ids, mask)
    _assert_close_at_real(hidden, torch_hidden, what="gemma3 hidden")
    _assert_close_at_real(logits, torch_logits, what="gemma3 logits")
    assert np.abs(torch_logits).max() <= 3.0 and np.abs(torch_logits).max() > 2.0  # capped
    left_hidden, left_logits = ours(cfg, left_ids, left_mask)
    torch_hidden, torch_logits = theirs(left_ids, left_mask)
    _assert_close_at_real(left_hidden, torch_hidden, mask=left_mask, what="gemma3 left hidden")
    _assert_close_at_real(left_logits, torch_logits, mask=left_mask, what="gemma3 left logits")
    # The window matters: an unlimited one gives other states past the window only.
    no_window = b.model_copy(update={"sliding_window": 64})
    other, _ = ours(cfg.model_copy(update={"backbone": no_window}), ids, mask)
    assert np.abs(other[0, 4:] - hidden[0, 4:]).max() > 1e-2
    np.testing.assert_allclose(other[0, :4], hidden[0, :4], rtol=1e-5, atol=1e-5)

    out = hf.export_hf(cfg, params, tmp_path / "export", source_dir=tmp_path / "hf")
    assert (json.loads((out / "config.json").read_text())
            == json.loads((tmp_path / "hf" / "config.json").read_text()))
    out = hf.export_hf(cfg, params, tmp_path / "export")  # from our config alone
    exported, info = transformers.Gemma3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    source_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    export_config = exported.config.to_dict()
    for key in ("layer_types", "rope_parameters", "sliding_window", "query_pre_attn_scalar",
                "final_logit_softcapping", "head_dim", "tie_word_embeddings"):
        assert export_config[key] == source_config[key], key
    cfg2, params2 = hf.load_hf(out, dtype="float32")
    assert cfg2 == cfg
    _leaves_equal(params, params2)


def test_sharded_index_and_mesh_loading(tmp_path):
    _save_random("qwen3", tmp_path / "one", tie_word_embeddings=False)
    _save_random("qwen3", tmp_path / "sharded", tie_word_embeddings=False, max_shard_size="8KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    cfg, single = hf.load_hf(tmp_path / "one", dtype="float32")
    mesh = parallel.make_mesh((2, 2, 2))
    rules = parallel.DEFAULT_RULES
    _, sharded = hf.load_hf(tmp_path / "sharded", dtype="float32", mesh=mesh, rules=rules)
    _leaves_equal(single, sharded)
    want = functional(cfg).shardings(mesh, rules)
    for array, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(want)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.sharding, sharding)
    # The rules really shard something: the embedding over vocab (tensor) x embed (fsdp).
    assert sharded["backbone"]["embed"]["embedding"].sharding.spec == jax.P("tensor", "fsdp")


HEADS = {
    "relevance": {"type": "token_score", "token_ids": (5, 9)},
    "engagement": {"type": "actions", "names": ("click", "apply", "dismiss"), "features": 3},
}


def _torch_heads(export_dir, ids, mask, member_features):
    """The README's PyTorch snippet: transformers model + jaxdistill side-file heads."""
    from safetensors.torch import load_file

    meta = json.load(open(export_dir / "jaxdistill_heads.json"))
    weights = load_file(export_dir / "jaxdistill_heads.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = mask.sum(-1) - 1  # last real position (right padding)
        pooled = out.hidden_states[-1][torch.arange(len(ids)), last]
        logits = out.logits[torch.arange(len(ids)), last]
        result = {}
        for name, head in meta["heads"].items():
            config = head["config"]
            if config["type"] == "token_score":
                two = logits[:, config["token_ids"]]
                result[name] = torch.softmax(two, -1)[:, -1]  # p_yes: last id is positive
            elif config["type"] == "actions":
                x = pooled.float()
                if config["features"]:
                    x = torch.cat([x, torch.as_tensor(member_features).float()], -1)
                if config["hidden"]:
                    x = torch.nn.functional.gelu(
                        x @ weights[f"{name}/inner/kernel"] + weights[f"{name}/inner/bias"],
                        approximate="tanh")
                logit = x @ weights[f"{name}/out/kernel"] + weights[f"{name}/out/bias"]
                result[name] = dict(zip(config["names"], torch.sigmoid(logit).T))
    return result


def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path):
    _save_random("qwen3", tmp_path / "hf", tie_word_embeddings=True)
    tokenizer_dir = tmp_path / "tok"
    build_tokenizer(["job search query document relevance"] * 4, 60, tokenizer_dir)
    cfg, params = hf.load_hf(tmp_path / "hf", heads=HEADS, dtype="float32", seed=3,
                             init_missing_heads=True)
    assert set(params["heads"]) == {"engagement"}  # token_score has no weights of its own
    out = hf.export_hf(cfg, params, tmp_path / "export", tokenizer_dir=tokenizer_dir)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".export.tmp-*"))
    cfg2, params2 = hf.load_hf(out, dtype="float32")
    assert cfg2 == cfg
    _leaves_equal(params, params2)
    # Exporting again over the same directory replaces it; the result still round-trips.
    hf.export_hf(cfg2, params2, out)
    _leaves_equal(params, hf.load_hf(out, dtype="float32")[1])

    torch_hidden, torch_logits = _torch_outputs(out, "qwen3")
    hidden, logits = _our_outputs(cfg, params)
    _assert_close_at_real(hidden, torch_hidden)
    _assert_close_at_real(logits, torch_logits)

    ids, mask = _batch()
    features = np.random.default_rng(1).normal(size=(len(ids), 3)).astype(np.float32)
    ours = functional(cfg).apply(params, {"input_ids": ids, "attention_mask": mask,
                                          "member_features": features})
    theirs = _torch_heads(out, ids, mask, features)
    p_yes = jax.nn.softmax(ours["relevance"], -1)[:, -1]
    np.testing.assert_allclose(theirs["relevance"].numpy(), p_yes, rtol=1e-4, atol=1e-6)
    probs = jax.nn.sigmoid(ours["engagement"])
    for k, name in enumerate(HEADS["engagement"]["names"]):
        np.testing.assert_allclose(theirs["engagement"][name].numpy(), probs[:, k],
                                   rtol=1e-4, atol=1e-6)


def test_bert_export_loads_in_transformers(tmp_path):
    _save_random("bert", tmp_path / "hf")
    cfg, params = hf.load_hf(tmp_path / "hf", dtype="float32",
                             heads={"relevance": {"type": "classifier", "classes": 2}},
                             init_missing_heads=True, pooling="mean")
    out = hf.export_hf(cfg, params, tmp_path / "export")
    cfg2, params2 = hf.load_hf(out, dtype="float32")
    assert cfg2 == cfg and cfg2.backbone.pooling == "mean"
    _leaves_equal(params, params2)
    _assert_close_at_real(_our_outputs(cfg, params)[0], _torch_outputs(out, "bert")[0])


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_pooler_is_kept(tmp_path, pooler):
    torch.manual_seed(0)
    source = transformers.BertModel(_hf_config("bert"), add_pooling_layer=pooler)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    source.save_pretrained(tmp_path / "hf")
    cfg, params = hf.load_hf(tmp_path / "hf", dtype="float32")
    assert cfg.backbone.pooler is pooler and hf.config_from_hf(tmp_path / "hf").pooler is pooler
    assert ("pooler" in params["backbone"]) is pooler
    out = hf.export_hf(cfg, params, tmp_path / "export", source_dir=tmp_path / "hf")
    assert (json.loads((out / "config.json").read_text())
            == json.loads((tmp_path / "hf" / "config.json").read_text()))  # nothing changed
    exported, info = transformers.BertModel.from_pretrained(
        out, add_pooling_layer=pooler, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    if not pooler:
        return
    ids, mask = _batch()
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    with torch.no_grad():
        theirs = source.eval()(**inputs).pooler_output
        ours = exported.eval()(**inputs).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    _leaves_equal(params, hf.load_hf(out, dtype="float32")[1])


def _sentence_transformers_dir(path, **modes):
    """A tiny BERT laid out as sentence-transformers saves MiniLM (Transformer, Pooling,
    Normalize)."""
    _save_random("bert", path)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True, **modes}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def test_sentence_transformers_pooling(tmp_path):
    _sentence_transformers_dir(tmp_path / "mean", pooling_mode_mean_tokens=True)
    cfg, params = hf.load_hf(tmp_path / "mean", dtype="float32")
    assert cfg.backbone.pooling == "mean" and hf.config_from_hf(tmp_path / "mean").pooling == "mean"
    ids, mask = _batch()
    pooled = functional(cfg).apply(params, {"input_ids": ids, "attention_mask": mask})["pooled"]
    with torch.no_grad():  # sentence-transformers' mean pooling over transformers' states
        hidden = transformers.BertModel.from_pretrained(tmp_path / "mean")(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask)).last_hidden_state
    weights = torch.tensor(mask, dtype=torch.float32)[..., None]
    expected = ((hidden * weights).sum(1) / weights.sum(1)).numpy()
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)
    assert hf.load_hf(tmp_path / "mean", pooling="cls")[0].backbone.pooling == "cls"  # override

    _sentence_transformers_dir(tmp_path / "cls", pooling_mode_cls_token=True)
    assert hf.config_from_hf(tmp_path / "cls").pooling == "cls"
    _sentence_transformers_dir(tmp_path / "max", pooling_mode_max_tokens=True)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens") as err:
        hf.load_hf(tmp_path / "max")
    assert str(tmp_path / "max" / "1_Pooling" / "config.json") in str(err.value)
    assert hf.load_hf(tmp_path / "max", pooling="mean")[0].backbone.pooling == "mean"


def test_untied_llama_export_loads_in_transformers(tmp_path):
    _save_random("llama", tmp_path / "hf", tie_word_embeddings=False)
    cfg, params = hf.load_hf(tmp_path / "hf", dtype="float32")
    out = hf.export_hf(cfg, params, tmp_path / "export")
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    _leaves_equal(params, hf.load_hf(out, dtype="float32")[1])
    hidden, logits = _our_outputs(cfg, params)
    torch_hidden, torch_logits = _torch_outputs(out, "llama")
    _assert_close_at_real(hidden, torch_hidden)
    _assert_close_at_real(logits, torch_logits)


def test_export_keeps_the_source_config(tmp_path):
    _save_random("llama", tmp_path / "hf", max_position_embeddings=8192, pad_token_id=2,
                 bos_token_id=0, eos_token_id=[1, 3], tie_word_embeddings=False)
    generation = transformers.GenerationConfig(bos_token_id=0, eos_token_id=[1, 3], pad_token_id=2,
                                               temperature=0.6, do_sample=True, top_p=0.9)
    generation.save_pretrained(tmp_path / "hf")
    source_raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = transformers.AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    cfg, params = hf.load_hf(tmp_path / "hf", dtype="float32")
    for dtype in (None, "bfloat16"):
        out = hf.export_hf(cfg, params, tmp_path / "export", source_dir=tmp_path / "hf",
                           dtype=dtype)
        exported = transformers.AutoConfig.from_pretrained(out).to_dict()
        skip = {"transformers_version", "_name_or_path"} | ({"dtype"} if dtype else set())
        differ = {k: (source[k], exported.get(k)) for k in source_raw
                  if k not in skip and exported.get(k) != source[k]}
        assert not differ
        assert exported["dtype"] == (dtype or "float32")
        assert exported["max_position_embeddings"] == 8192 and exported["pad_token_id"] == 2
        assert (transformers.GenerationConfig.from_pretrained(out).to_dict()
                == transformers.GenerationConfig.from_pretrained(tmp_path / "hf").to_dict())
    # A model that changed (another vocabulary): only that key is rewritten.
    changed = cfg.model_copy(
        update={"backbone": cfg.backbone.model_copy(update={"vocab_size": 96})})
    backbone = params["backbone"]
    params96 = {"backbone": {**backbone,
                             "embed": {"embedding": backbone["embed"]["embedding"][:96]},
                             "lm_head": {"kernel": backbone["lm_head"]["kernel"][:, :96]}}}
    out = hf.export_hf(changed, params96, tmp_path / "changed", source_dir=tmp_path / "hf")
    raw = json.loads((out / "config.json").read_text())
    assert raw == {**source_raw, "vocab_size": 96, "dtype": "float32"}
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 96

    # Without the source: the keys our config knows, none invented.
    raw = json.loads((hf.export_hf(cfg, params, tmp_path / "plain") / "config.json").read_text())
    assert "max_position_embeddings" not in raw and "pad_token_id" not in raw
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["hidden_size"] == 32
    qwen = tmp_path / "qwen"
    _save_random("qwen3", qwen)
    with pytest.raises(ValueError, match="model_type 'qwen3'"):
        hf.export_hf(cfg, params, tmp_path / "wrong", source_dir=qwen)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_export_of_an_unchanged_model_keeps_config_json(tmp_path, family):
    _save_random(family, tmp_path / "hf")
    cfg, params = hf.load_hf(tmp_path / "hf", dtype="float32")
    out = hf.export_hf(cfg, params, tmp_path / "export", source_dir=tmp_path / "hf")
    assert (json.loads((out / "config.json").read_text())
            == json.loads((tmp_path / "hf" / "config.json").read_text()))


def test_fresh_heads_are_seeded_by_name(tmp_path):
    _save_random("qwen3", tmp_path)
    action = {"type": "actions", "names": ("click",)}
    _, a = hf.load_hf(tmp_path, heads={"x": action}, seed=1, init_missing_heads=True)
    _, b = hf.load_hf(tmp_path, heads={"x": action, "y": action}, seed=1,
                      init_missing_heads=True)
    _leaves_equal(a["heads"]["x"], b["heads"]["x"])  # adding a head leaves the others alone
    assert not np.array_equal(b["heads"]["x"]["out"]["kernel"], b["heads"]["y"]["out"]["kernel"])


def test_missing_heads_are_refused_unless_asked_for(tmp_path):
    _save_random("qwen3", tmp_path / "hf")
    action = {"type": "actions", "names": ("click",)}
    with pytest.raises(ValueError, match="'click_head'") as err:
        hf.load_hf(tmp_path / "hf", heads={"click_head": action})
    assert str(tmp_path / "hf") in str(err.value) and "no jaxdistill_heads.json" in str(err.value)
    assert "init_missing_heads=True" in str(err.value)
    # Weightless heads need nothing stored.
    weightless = {"lm": {"type": "lm"}, "yes": {"type": "token_score", "token_ids": (1,)}}
    cfg, _ = hf.load_hf(tmp_path / "hf", heads=weightless)
    assert set(cfg.heads) == {"lm", "yes"}

    cfg, params = hf.load_hf(tmp_path / "hf", heads={"click_head": action}, init_missing_heads=True)
    out = hf.export_hf(cfg, params, tmp_path / "export")
    _leaves_equal(params, hf.load_hf(out, heads={"click_head": action})[1])
    with pytest.raises(ValueError, match="'apply_head'") as err:
        hf.load_hf(out, heads={"click_head": action, "apply_head": action})
    assert "holds heads 'click_head'" in str(err.value) and str(out) in str(err.value)
    # A stored head asked for with another config is refused, even with init_missing_heads.
    with pytest.raises(ValueError, match="'click_head' is stored as"):
        hf.load_hf(out, heads={"click_head": {**action, "hidden": 4}}, init_missing_heads=True)


def test_bf16_params_and_export(tmp_path):
    _save_random("llama", tmp_path)
    cfg, params = hf.load_hf(tmp_path, param_dtype="bfloat16")
    out = hf.export_hf(cfg, params, tmp_path / "export")
    exported = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in exported.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _leaves_equal(params, hf.load_hf(out, param_dtype="bfloat16")[1])
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    reference = load_file(tmp_path / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_array_equal(
        np.asarray(params["backbone"]["layers"]["layer"]["up_proj"]["kernel"][1]),
        reference.bfloat16().float().numpy().T.astype(jax.numpy.bfloat16))


def test_pickle_refused_unless_allowed(tmp_path):
    model = _save_random("qwen2", tmp_path / "st")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="--allow-pickle") as err:
        hf.load_hf(pickled)
    assert "arbitrary code" in str(err.value) and "pytorch_model.bin" in str(err.value)
    _, from_pickle = hf.load_hf(pickled, allow_pickle=True, dtype="float32")
    _leaves_equal(from_pickle, hf.load_hf(tmp_path / "st", dtype="float32")[1])


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    _save_random("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    tensors["model.rotary_emb.inv_freq"] = torch.zeros(4)  # known-irrelevant: ignored
    save_file({k: v.numpy() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        hf.load_hf(tmp_path)
    message = str(err.value)
    for name in ("layers.1.self_attn.k_proj.weight", "norm.weight", "layers.0.mlp.extra.weight"):
        assert name in message
    assert "inv_freq" not in message.split("ignored")[0]


def test_config_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2") as err:
        hf.detect_family(tmp_path)
    assert "config.json" in str(err.value) and "qwen3" in str(err.value)
    yarn = _hf_config("llama").to_dict()
    yarn["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0,
                               "original_max_position_embeddings": 1024}
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        hf.config_from_hf(yarn)
    legacy = {"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": 50}  # transformers 4 layout
    assert hf.config_from_hf(legacy).rope_theta == 1e6
    with pytest.raises(ValueError, match="hidden_act"):
        hf.config_from_hf({**_hf_config("bert").to_dict(), "hidden_act": "relu"})
    # Gemma 3 as transformers 4 wrote it (google/gemma-3-1b's layout): the pattern and the
    # local base resolve as transformers resolves them.
    gemma = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32,
             "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 16, "intermediate_size": 64, "sliding_window": 8,
             "sliding_window_pattern": 2, "rope_local_base_freq": 10_000.0, "rope_theta": 1e6,
             "rope_scaling": {"rope_type": "linear", "factor": 8.0},
             "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh"}
    cfg = hf.config_from_hf(gemma)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert (cfg.rope_local_theta, cfg.rope_theta, cfg.rope_scaling.factor) == (1e4, 1e6, 8.0)
    with pytest.raises(ValueError, match="multimodal"):
        hf.config_from_hf({"model_type": "gemma3"})


def test_corrupt_files_are_named(tmp_path):
    _save_random("qwen3", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    data = weights.read_bytes()
    for size in (5, len(data) - 100):  # header cut / data cut
        bad = tmp_path / f"cut{size}"
        shutil.copytree(tmp_path / "hf", bad)
        (bad / "model.safetensors").write_bytes(data[:size])
        with pytest.raises(ValueError, match="corrupt or truncated") as err:
            hf.load_hf(bad)
        assert str(bad / "model.safetensors") in str(err.value)

    garbage = tmp_path / "garbage"
    shutil.copytree(tmp_path / "hf", garbage)
    (garbage / "config.json").write_bytes(b"\x00\x01 not json")
    for call in (hf.load_hf, hf.config_from_hf, hf.detect_family):
        with pytest.raises(ValueError, match="not valid JSON") as err:
            call(garbage)
        assert str(garbage / "config.json") in str(err.value)
    (garbage / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, found list"):
        hf.config_from_hf(garbage)

    build_tokenizer(["job search query document relevance"] * 4, 60, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ValueError, match="not valid JSON") as err:
        hf.load_hf_tokenizer(tmp_path / "tok")
    assert str(tmp_path / "tok" / "tokenizer.json") in str(err.value)
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0"}')  # JSON, no tokenizer
    with pytest.raises(ValueError, match="could not read the tokenizer from tokenizer.json") as err:
        hf.load_hf_tokenizer(tmp_path / "tok")
    assert str(tmp_path / "tok") in str(err.value)


def test_inspect(tmp_path):
    model = _save_random("qwen3", tmp_path)
    info = hf.inspect_hf(tmp_path)
    assert info["family"] == "qwen3" and info["layers"] == 2 and info["kv_heads"] == 2
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_tokenizer_alignment(tmp_path):
    texts = ["query document job engineer remote", "apply click dismiss"]
    teacher = build_tokenizer(texts, 50, tmp_path / "teacher")
    shutil.copytree(tmp_path / "teacher", tmp_path / "same")
    same = hf.load_hf_tokenizer(tmp_path / "same")
    other = build_tokenizer(["completely different words here"], 50, tmp_path / "other")
    size = hf.check_same_tokenizer("qwen-teacher", teacher, "tiny-student", tmp_path / "same",
                                   token_level=True, teacher_vocab_size=len(teacher) + 7)
    assert size == len(teacher) == hf.shared_vocab_size(tmp_path / "teacher", same)
    with pytest.raises(ValueError, match="qwen-teacher") as err:
        hf.check_same_tokenizer("qwen-teacher", teacher, "tiny-student", other, token_level=True)
    assert "tiny-student" in str(err.value) and "first at id" in str(err.value)
    assert hf.check_same_tokenizer("qwen-teacher", teacher, "tiny-student", other,
                                   token_level=False) is None
    with pytest.raises(ValueError, match="embedding rows"):
        hf.check_same_tokenizer("t", teacher, "s", same, token_level=True,
                                student_vocab_size=len(teacher) - 1)
    loaded = hf.load_hf_tokenizer(tmp_path / "teacher")
    text = hf.apply_chat_template(loaded, [{"role": "user", "content": "hello"}])
    assert "user: hello" in text
    loaded.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        hf.apply_chat_template(loaded, [{"role": "user", "content": "hello"}])
