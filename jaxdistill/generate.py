"""Batched generation with a KV cache for our decoders: prefill, then a jitted decode loop.

`generate` compiles one program per (model, shapes, sampling settings): a prefill over the
padded prompts writes every layer's keys/values into a `KVCache` of T + max_new_tokens
slots, then a `lax.while_loop` emits one token per step (greedy, or sampled with temperature
/ top-k / top-p from a PRNG key) until every row has produced EOS or max_new_tokens are out.

Prompts may be right- or left-padded (any padding: a slot with mask 0). Each row's RoPE
positions count its real tokens only, and generated tokens go to the slots after the prompt
buffer, so padding is never attended to and a row decodes exactly as it would unpadded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxdistill.models.layers import KVCache
from jaxdistill.models.model import Functional, Params


def _check_sampling(temperature, top_k, top_p) -> None:
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1] (1 = off), got {top_p!r}")


def sample_logits(logits_BxV: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Next token ids [B] from logits: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens (0 = all) and then to the
    smallest set of most likely tokens whose probability reaches top_p (nucleus sampling;
    the most likely token is always kept)."""
    _check_sampling(temperature, top_k, top_p)
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep a token while the mass of the more likely ones is still below top_p.
        kept_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p
        cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _program(model: Functional, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
             temperature: float, top_k: int, top_p: float):
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def run(params, prompt_ids_BxT, prompt_mask_BxT, rng):
        backbone = model.bind(params).backbone
        cfg = backbone.cfg
        unembed_DxV = backbone.unembedding()
        batch, prompt_len = prompt_ids_BxT.shape
        prompt_mask_BxT = prompt_mask_BxT.astype(bool)
        cache = KVCache.zeros(cfg.layers, batch, prompt_len + max_new_tokens, cfg.kv_heads,
                              cfg.head_dim, jnp.dtype(cfg.dtype))
        kv_mask_BxS = jnp.pad(prompt_mask_BxT, ((0, 0), (0, max_new_tokens)))
        positions_BxT = jnp.maximum(jnp.cumsum(prompt_mask_BxT, axis=-1) - 1, 0)
        hidden_BxTxD, cache = backbone(
            prompt_ids_BxT, prompt_mask_BxT, positions_BxT=positions_BxT.astype(jnp.int32),
            cache=cache, cache_index=0, kv_mask_BxS=kv_mask_BxS)
        slots_T = jnp.arange(prompt_len)
        last_B = jnp.max(jnp.where(prompt_mask_BxT, slots_T, 0), axis=-1)
        hidden_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]

        def logits_of(hidden_BxD):
            return backbone.softcap(
                jnp.dot(hidden_BxD, unembed_DxV, preferred_element_type=jnp.float32))

        eos_E = jnp.asarray(eos_ids, jnp.int32)
        state = dict(
            step=jnp.zeros((), jnp.int32),
            logits_BxV=logits_of(hidden_BxD),
            tokens_BxN=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
            emitted_BxN=jnp.zeros((batch, max_new_tokens), bool),
            done_B=jnp.zeros((batch,), bool),
            next_position_B=jnp.sum(prompt_mask_BxT, axis=-1).astype(jnp.int32),
            kv_mask_BxS=kv_mask_BxS,
            cache=cache,
            rng=rng,
        )

        def cond(state):
            return (state["step"] < max_new_tokens) & ~jnp.all(state["done_B"])

        def body(state):
            step, done_B = state["step"], state["done_B"]
            rng, key = jax.random.split(state["rng"])
            token_B = jnp.where(done_B, pad_id, sample(state["logits_BxV"], key))
            slot = prompt_len + step
            kv_mask_BxS = state["kv_mask_BxS"].at[:, slot].set(~done_B)
            hidden_Bx1xD, cache = backbone(
                token_B[:, None], jnp.ones((batch, 1), bool),
                positions_BxT=state["next_position_B"][:, None], cache=state["cache"],
                cache_index=slot, kv_mask_BxS=kv_mask_BxS)
            return dict(
                step=step + 1,
                logits_BxV=logits_of(hidden_Bx1xD[:, 0]),
                tokens_BxN=state["tokens_BxN"].at[:, step].set(token_B),
                emitted_BxN=state["emitted_BxN"].at[:, step].set(~done_B),
                done_B=done_B | jnp.isin(token_B, eos_E),
                next_position_B=state["next_position_B"] + 1,
                kv_mask_BxS=kv_mask_BxS,
                cache=cache,
                rng=rng,
            )

        state = jax.lax.while_loop(cond, body, state)
        return state["tokens_BxN"], state["emitted_BxN"].astype(jnp.int32)

    return jax.jit(run)


def generate(model: Functional, params: Params, prompt_ids_BxT, prompt_mask_BxT, *,
             max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Continues each prompt by up to max_new_tokens tokens with the model's decoder.

    prompt_ids_BxT / prompt_mask_BxT: prompts padded on the right or the left (mask 1 on real
    tokens; every row needs at least one). eos_id: one id or several (Llama 3 has two); a row
    stops after emitting one, and its later tokens are pad_id. temperature 0 is greedy
    (rng unused); otherwise rng is required. Returns tokens_BxN (N = max_new_tokens) and
    mask_BxN, 1 on the tokens a row emitted, its EOS included.
    """
    if model.cfg.backbone.type != "decoder":
        raise ValueError(f"generate needs a decoder backbone, got {model.cfg.backbone.type!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
            max_new_tokens < 1):
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    prompt_ids_BxT, prompt_mask_BxT = jnp.asarray(prompt_ids_BxT), jnp.asarray(prompt_mask_BxT)
    if prompt_ids_BxT.ndim != 2 or prompt_mask_BxT.shape != prompt_ids_BxT.shape:
        raise ValueError(f"generate: prompt ids and mask must both be [B, T], got "
                         f"{tuple(prompt_ids_BxT.shape)} and {tuple(prompt_mask_BxT.shape)}")
    if not isinstance(prompt_mask_BxT, jax.core.Tracer):
        empty = [int(row) for row in jnp.flatnonzero(jnp.sum(prompt_mask_BxT, axis=-1) == 0)]
        if empty:
            raise ValueError(f"generate: prompt rows {empty} have no real token (mask all 0)")
    if temperature > 0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs an rng key")
    eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id)
    program = _program(model, max_new_tokens, eos_ids, int(pad_id), float(temperature),
                       int(top_k), float(top_p))
    rng = jax.random.key(0) if rng is None else rng
    return program(params, prompt_ids_BxT.astype(jnp.int32), prompt_mask_BxT, rng)


@jax.jit
def _chat_batch(prompt_ids_BxT, prompt_mask_BxT, tokens_BxN, emitted_BxN):
    ids_BxL = jnp.concatenate([prompt_ids_BxT.astype(jnp.int32), tokens_BxN], axis=1)
    real_BxL = jnp.concatenate([prompt_mask_BxT, emitted_BxN], axis=1).astype(bool)
    response_BxL = jnp.concatenate([jnp.zeros_like(prompt_mask_BxT), emitted_BxN], axis=1)
    # A stable sort of "padding" moves each row's real tokens to the front, in order: the
    # right-padded layout the training forward expects.
    order_BxL = jnp.argsort(~real_BxL, axis=-1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order_BxL, axis=1)  # noqa: E731
    real_BxL = take(real_BxL)
    return {
        "input_ids": jnp.where(real_BxL, take(ids_BxL), 0),
        "attention_mask": real_BxL.astype(jnp.int32),
        "loss_mask": take(response_BxL).astype(jnp.int32),
    }


def sample_responses(model: Functional, params: Params, prompt_ids_BxT, prompt_mask_BxT, *,
                     max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
                     rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> dict[str, jax.Array]:
    """On-policy data: the model's own responses to the prompts as a chat batch.

    Returns {"input_ids", "attention_mask", "loss_mask"}, each [B, T + max_new_tokens] int32,
    right-padded (prompt, then response, then padding with id 0 and masks 0) whatever the
    prompts' padding; loss_mask is 1 on exactly the sampled tokens, up to and including EOS
    (the `chat` record layout, so the fused step consumes it like prepared chat data).
    """
    tokens_BxN, emitted_BxN = generate(
        model, params, prompt_ids_BxT, prompt_mask_BxT, max_new_tokens=max_new_tokens,
        eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
        rng=rng)
    return _chat_batch(jnp.asarray(prompt_ids_BxT), jnp.asarray(prompt_mask_BxT), tokens_BxN,
                       emitted_BxN)
