"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 family (RMSNorm, RoPE, GQA, SwiGLU)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import BaseModel, ConfigDict, model_validator

from jaxdistill.models.layers import (
    Embed,
    KVCache,
    Linear,
    RematPolicy,
    RMSNorm,
    Stack,
    attention,
    cached_attention,
    rope,
)
from jaxdistill.parallel import constrain


class DecoderConfig(BaseModel):
    """Shape and numerics of a decoder backbone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["decoder"] = "decoder"
    family: Literal["llama", "qwen2", "qwen3"] = "qwen3"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True
    attention_bias: bool = False
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: RematPolicy = "full"
    attention_impl: Literal["xla", "cudnn"] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        return self


def qwen3_0_6b(**overrides) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=151936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, mlp=3072,
        **overrides,
    )


def qwen3_1_7b(**overrides) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=151936, hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, mlp=6144,
        **overrides,
    )


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        self.cfg = cfg
        self.input_norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.q_proj = Linear(cfg.hidden, cfg.heads * cfg.head_dim, ("embed", "heads"),
                             use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, ("embed", "kv"),
                             use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, ("embed", "kv"),
                             use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(cfg.heads * cfg.head_dim, cfg.hidden, ("heads", "embed"), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs,
                                  axis=None)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs,
                                  axis=None)
        self.post_attention_norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=pdt,
                                           rngs=rngs)
        self.gate_proj = Linear(cfg.hidden, cfg.mlp, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden, cfg.mlp, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.mlp, cfg.hidden, ("mlp", "embed"), **kw)

    def __call__(self, x_BxTxD, positions_BxT, lengths_B, segment_ids_BxT, *,
                 cache: KVCache | None = None, cache_index=None, kv_mask_BxS=None):
        """x after the layer; with `cache` ([B, S, K, H] slices), (x, updated cache): the T
        new keys/values are written at slots cache_index.. and attention reads the cache."""
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        h_BxTxD = self.input_norm(x_BxTxD)
        q_BxTxNxH = self.q_proj(h_BxTxD).reshape(b, t, cfg.heads, cfg.head_dim)
        k_BxTxKxH = self.k_proj(h_BxTxD).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        v_BxTxKxH = self.v_proj(h_BxTxD).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
        q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
        k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, cfg.rope_theta)
        if cache is None:
            attended_BxTxNxH = attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, lengths_B=lengths_B, causal=True,
                segment_ids_BxT=segment_ids_BxT, implementation=cfg.attention_impl,
            )
        else:
            cache = KVCache(*(
                jax.lax.dynamic_update_slice_in_dim(slots, new.astype(slots.dtype), cache_index,
                                                    axis=1)
                for slots, new in ((cache.k, k_BxTxKxH), (cache.v, v_BxTxKxH))))
            # XLA's attention: a one-query decode step with an arbitrary slot mask is outside
            # what the cuDNN kernel takes, and it is not where generation spends its time.
            attended_BxTxNxH = cached_attention(
                q_BxTxNxH, cache.k.astype(q_BxTxNxH.dtype), cache.v.astype(q_BxTxNxH.dtype),
                kv_mask_BxS=kv_mask_BxS, first_slot=cache_index,
            )
        x_BxTxD = x_BxTxD + self.o_proj(attended_BxTxNxH.reshape(b, t, -1))
        h_BxTxD = self.post_attention_norm(x_BxTxD)
        mlp_BxTxF = jax.nn.silu(self.gate_proj(h_BxTxD)) * self.up_proj(h_BxTxD)
        mlp_BxTxF = constrain(mlp_BxTxF, ("batch", "seq", "mlp"))
        out_BxTxD = x_BxTxD + self.down_proj(mlp_BxTxF)
        return out_BxTxD if cache is None else (out_BxTxD, cache)


class Decoder(nnx.Module):
    """Embeddings -> scanned layers -> final norm. Output projection only where asked for."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.layers = Stack(lambda r: DecoderLayer(cfg, r), cfg.layers, rngs)
        self.final_norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.hidden, cfg.vocab_size, ("embed", "vocab"), dtype=dt,
                        param_dtype=pdt, rngs=rngs)
        )

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array,
        *,
        segment_ids_BxT: jax.Array | None = None,
        positions_BxT: jax.Array | None = None,
        token_type_ids_BxT: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        kv_mask_BxS: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Final-norm hidden states [B, T, D] of right-padded (or packed) sequences.

        Incremental decoding (`jaxdistill.generate`): with a `cache`, the T tokens fill slots
        cache_index..cache_index+T of every layer's keys/values; kv_mask_BxS marks the filled
        (non-padding) slots, positions_BxT gives each token's RoPE position, and
        attention_mask is not read. Returns (hidden, updated cache).
        """
        del token_type_ids_BxT  # decoders have no segment embedding
        b, t = input_ids_BxT.shape
        # An all-padding row (a padded list slot) still attends to its first token: no NaNs.
        lengths_B = jnp.maximum(jnp.sum(attention_mask_BxT, axis=-1), 1).astype(jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x_BxTxD = constrain(self.embed(input_ids_BxT), ("batch", "seq", "embed"))
        if cache is not None:
            x_BxTxD, cache = self.layers(x_BxTxD, positions_BxT, lengths_B, segment_ids_BxT,
                                         cache=cache, cache_index=cache_index,
                                         kv_mask_BxS=kv_mask_BxS)
            return self.final_norm(x_BxTxD), cache
        x_BxTxD = self.layers(
            x_BxTxD, positions_BxT, lengths_B, segment_ids_BxT, remat=self.cfg.remat
        )
        return self.final_norm(x_BxTxD)

    def unembedding(self) -> jax.Array:
        """Output projection [D, V] in the compute dtype (tied: the embedding transposed)."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.lm_head is None:
            return self.embed.embedding[...].T.astype(dt)
        return self.lm_head.kernel[...].astype(dt)

    def token_logits(self, hidden_BxD: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
        """Logits for a few fixed tokens only (e.g. "No", "Yes"): [B, len(token_ids)]."""
        dt = jnp.dtype(self.cfg.dtype)
        ids = jnp.asarray(token_ids, dtype=jnp.int32)
        if self.lm_head is None:
            rows_KxD = jnp.take(self.embed.embedding[...], ids, axis=0).astype(dt)
        else:
            rows_KxD = jnp.take(self.lm_head.kernel[...], ids, axis=1).T.astype(dt)
        return jnp.dot(hidden_BxD.astype(dt), rows_KxD.T)
