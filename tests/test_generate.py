"""KV-cache generation: greedy == transformers' generate, cached == full re-forward, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxdistill.generate import generate, sample_logits
from jaxdistill.models import hf
from jaxdistill.models.model import functional

VOCAB, PAD, NEW = 96, 0, 8
PROMPTS = ([5, 17, 42, 8, 9, 60], [33, 2, 71, 12], [88, 4])  # different lengths: padding


def _save_tiny(family, path):
    torch.manual_seed(0)
    if family == "gemma3":  # a sliding window shorter than prompt + answer, soft-capped logits
        config = transformers.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=64, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
            final_logit_softcapping=3.0, tie_word_embeddings=True,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                             "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family]
        config = cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, intermediate_size=64,
                     tie_word_embeddings=family == "qwen3",
                     rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # sharper logits than the init: no near-ties in argmax
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = {}
    for family in ("llama", "qwen3", "gemma3"):
        path = tmp_path_factory.mktemp(family)
        _save_tiny(family, path)
        cfg, params = hf.load_hf(path, dtype="float32")
        out[family] = (path, functional(cfg), params)
    return out


def _padded(side):
    width = max(map(len, PROMPTS))
    ids = np.full((len(PROMPTS), width), PAD, np.int32)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        start = width - len(prompt) if side == "left" else 0
        ids[row, start:start + len(prompt)] = prompt
        mask[row, start:start + len(prompt)] = 1
    return ids, mask


def _transformers_greedy(path, eos_id):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, mask = _padded("left")
    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                             do_sample=False, eos_token_id=eos_id, pad_token_id=PAD)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


def _emitted_mask(tokens, eos_id):
    """1 up to and including each row's first EOS."""
    is_eos = tokens == eos_id
    after_eos = np.cumsum(is_eos, axis=1) - is_eos > 0
    return (~after_eos).astype(np.int32)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_greedy_matches_transformers_generate(tiny_models, family):
    path, model, params = tiny_models[family]
    # An EOS the model really emits: row 0's third greedy token when nothing stops it.
    eos_id = int(_transformers_greedy(path, eos_id=VOCAB + 1)[0, 2])
    expected = _transformers_greedy(path, eos_id)
    assert (expected == eos_id).any(axis=1).sum() >= 1
    for side in ("left", "right"):
        ids, mask = _padded(side)
        tokens, emitted = generate(model, params, ids, mask, max_new_tokens=NEW,
                                   eos_id=eos_id, pad_id=PAD)
        np.testing.assert_array_equal(np.asarray(tokens), expected, err_msg=side)
        np.testing.assert_array_equal(np.asarray(emitted), _emitted_mask(expected, eos_id))


def _greedy_without_cache(model, params, eos_id):
    """Our decoder re-run over the whole sequence at every step (right-padded buffer)."""
    width = max(map(len, PROMPTS)) + NEW
    buffer = np.full((len(PROMPTS), width), PAD, np.int32)
    lengths = np.array([len(p) for p in PROMPTS])
    for row, prompt in enumerate(PROMPTS):
        buffer[row, :len(prompt)] = prompt

    @jax.jit
    def next_tokens(params, buffer, lengths):
        backbone = model.bind(params).backbone
        mask = jnp.arange(width)[None] < lengths[:, None]
        hidden = backbone(buffer, mask)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last @ backbone.unembedding(), axis=-1)

    out = np.full((len(PROMPTS), NEW), PAD, np.int32)
    done = np.zeros(len(PROMPTS), bool)
    for step in range(NEW):
        tokens = np.asarray(next_tokens(params, buffer, lengths))
        for row in np.flatnonzero(~done):
            out[row, step] = buffer[row, lengths[row]] = tokens[row]
            lengths[row] += 1
            done[row] = tokens[row] == eos_id
    return out


def test_cached_decoding_equals_full_reforward(tiny_models):
    _, model, params = tiny_models["qwen3"]
    reference = _greedy_without_cache(model, params, eos_id=VOCAB + 1)
    eos_id = int(reference[1, 3])  # stop one row mid-way, let the others run on
    reference = _greedy_without_cache(model, params, eos_id)
    for side in ("left", "right"):
        tokens, _ = generate(model, params, *_padded(side), max_new_tokens=NEW, eos_id=eos_id,
                             pad_id=PAD)
        np.testing.assert_array_equal(np.asarray(tokens), reference, err_msg=side)


def test_top_k_one_sampling_is_greedy(tiny_models):
    _, model, params = tiny_models["llama"]
    ids, mask = _padded("left")
    greedy, _ = generate(model, params, ids, mask, max_new_tokens=NEW, eos_id=VOCAB + 1,
                         pad_id=PAD)
    sampled, emitted = generate(model, params, ids, mask, max_new_tokens=NEW, eos_id=VOCAB + 1,
                                pad_id=PAD, temperature=1.3, top_k=1, rng=jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))
    assert np.all(np.asarray(emitted) == 1)
    # And plain sampling at a high temperature does differ from greedy.
    hot, _ = generate(model, params, ids, mask, max_new_tokens=NEW, eos_id=VOCAB + 1,
                      pad_id=PAD, temperature=5.0, rng=jax.random.key(7))
    assert not np.array_equal(np.asarray(hot), np.asarray(greedy))


def test_top_p_keeps_the_nucleus_of_a_known_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(np.tile(probs, (20_000, 1))), jnp.float32)

    @jax.jit
    def frequencies(key):
        counts = []
        for top_p in (0.7, 0.85):
            draws = sample_logits(logits, key, temperature=1.0, top_p=top_p)
            counts.append(jnp.bincount(draws, length=4) / draws.shape[0])
        return counts

    nucleus_2, nucleus_3 = map(np.asarray, frequencies(jax.random.key(0)))
    # top_p 0.7: {0.5, 0.3} (0.5 < 0.7, 0.8 >= 0.7), renormalised to 5/8, 3/8.
    np.testing.assert_allclose(nucleus_2, [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(nucleus_3, np.r_[probs[:3] / 0.95, 0], atol=0.015)


def test_generate_validation(tiny_models):
    _, model, params = tiny_models["qwen3"]
    ids, mask = _padded("right")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sample_logits(jnp.zeros((1, 4)), jax.random.key(0), temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        sample_logits(jnp.zeros((1, 4)), None, temperature=-1.0)
    with pytest.raises(ValueError, match=r"sampling \(temperature > 0\) needs an rng key"):
        generate(model, params, ids, mask, max_new_tokens=2, eos_id=1, pad_id=0,
                 temperature=1.0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 1, got 0"):
        generate(model, params, ids, mask, max_new_tokens=0, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match=r"prompt ids and mask must both be \[B, T\], got "
                                         r"\(3, 6\) and \(3, 5\)"):
        generate(model, params, ids, mask[:, :5], max_new_tokens=2, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match=r"prompt rows \[1\] have no real token"):
        generate(model, params, ids, mask * np.array([[1], [0], [1]]), max_new_tokens=2,
                 eos_id=1, pad_id=0)


def test_sample_responses_loss_mask_covers_the_sampled_tokens_up_to_eos():
    from jaxdistill.generate import sample_responses
    from jaxdistill.models.decoder import DecoderConfig
    from jaxdistill.models.heads import LMHead
    from jaxdistill.models.model import ModelConfig

    vocab, eos_id, new = 6, 1, 6  # a small vocabulary: EOS is likely within a few steps
    cfg = ModelConfig(backbone=DecoderConfig(vocab_size=vocab, hidden=16, layers=1, heads=2,
                                             kv_heads=1, head_dim=8, mlp=32, dtype="float32"),
                      heads={"lm": LMHead()})
    model = functional(cfg)
    params = model.init(0)
    prompts = ([2, 3, 4], [5], [3, 2], [4, 4, 2])
    ids = np.zeros((len(prompts), 3), np.int32)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left-padded
        ids[row, 3 - len(prompt):], mask[row, 3 - len(prompt):] = prompt, 1
    key = jax.random.key(3)
    batch = sample_responses(model, params, ids, mask, max_new_tokens=new, eos_id=eos_id,
                             pad_id=0, rng=key)
    tokens, emitted = map(np.asarray, generate(
        model, params, ids, mask, max_new_tokens=new, eos_id=eos_id, pad_id=0, temperature=1.0,
        rng=key))
    stopped = (tokens == eos_id).any(axis=1)
    assert stopped.any() and not stopped.all()  # both kinds of row are exercised
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    for row, prompt in enumerate(prompts):
        response = list(tokens[row][emitted[row] == 1])
        if stopped[row]:  # the response ends at its first EOS
            assert response.index(eos_id) == len(response) - 1
        else:
            assert len(response) == new and eos_id not in response
        width = 3 + new
        pad = width - len(prompt) - len(response)
        np.testing.assert_array_equal(batch["input_ids"][row], prompt + response + [0] * pad)
        np.testing.assert_array_equal(batch["attention_mask"][row],
                                      [1] * (len(prompt) + len(response)) + [0] * pad)
        np.testing.assert_array_equal(batch["loss_mask"][row],
                                      [0] * len(prompt) + [1] * len(response) + [0] * pad)


def test_full_size_generation_traces_with_the_expected_shapes():
    # Qwen3-0.6B shapes, abstractly (jax.eval_shape: nothing allocated or compiled).
    from jaxdistill.models.decoder import qwen3_0_6b
    from jaxdistill.models.model import ModelConfig

    model = functional(ModelConfig(backbone=qwen3_0_6b(), heads={"lm": {"type": "lm"}}))
    prompt = jax.ShapeDtypeStruct((4, 128), jnp.int32)
    tokens, emitted = jax.eval_shape(
        lambda params, ids, mask: generate(model, params, ids, mask, max_new_tokens=64,
                                           eos_id=(1, 2), pad_id=0, temperature=0.7, top_p=0.9,
                                           rng=jax.random.key(0)),
        model.shapes, prompt, prompt)
    assert (tokens.shape, tokens.dtype) == ((4, 64), jnp.int32)
    assert (emitted.shape, emitted.dtype) == ((4, 64), jnp.int32)
