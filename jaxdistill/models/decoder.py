"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 / Gemma 3 family (RMSNorm, RoPE, GQA,
gated MLP).

Gemma 3 (`family="gemma3"`) differs in a few config-driven places: embeddings scaled by
sqrt(hidden), RMSNorm weights as (1 + w), extra norms on the attention and MLP outputs, a
tanh-GELU gate, the softmax scale `query_pre_attn_scalar ** -0.5`, sliding-window attention
with its own RoPE base on the local layers (`layer_types`, a per-layer input of the layer scan)
and optional final-logit soft-capping.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    rope_frequencies,
)
from jaxdistill.parallel import constrain

_NO_WINDOW = 2**30  # the window of a global layer: never binds


class RopeScaling(BaseModel):
    """RoPE frequency scaling as transformers defines it: `linear` divides every frequency by
    `factor`; `llama3` (Llama 3.1+) slows only the long wavelengths, smoothly between
    original_max_positions / low_freq_factor and / high_freq_factor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_positions: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self):
        llama3 = (self.low_freq_factor, self.high_freq_factor, self.original_max_positions)
        if self.type == "llama3":
            if None in llama3:
                raise ValueError("llama3 RoPE scaling needs low_freq_factor, high_freq_factor "
                                 "and original_max_positions")
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ValueError(f"llama3 RoPE scaling needs 0 < low_freq_factor "
                                 f"({self.low_freq_factor}) < high_freq_factor "
                                 f"({self.high_freq_factor})")
        elif any(v is not None for v in llama3):
            raise ValueError("linear RoPE scaling takes only a factor")
        return self


class DecoderConfig(BaseModel):
    """Shape and numerics of a decoder backbone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["decoder"] = "decoder"
    family: Literal["llama", "qwen2", "qwen3", "gemma3"] = "qwen3"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    norm_eps: float = 1e-6
    qk_norm: bool = True
    attention_bias: bool = False
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: RematPolicy = "full"
    attention_impl: Literal["xla", "cudnn"] | None = None
    # Gemma 3 (None elsewhere). Local ("sliding_attention") layers attend to the last
    # `sliding_window` positions and use RoPE base `rope_local_theta`, unscaled.
    layer_types: tuple[Literal["full_attention", "sliding_attention"], ...] | None = None
    sliding_window: int | None = Field(default=None, gt=0)
    rope_local_theta: float | None = None
    query_pre_attn_scalar: int | None = Field(default=None, gt=0)  # softmax scale x ** -0.5
    final_softcap: float | None = Field(default=None, gt=0)  # logits: c * tanh(logits / c)

    @model_validator(mode="after")
    def _check(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.layers} layers")
            if "sliding_attention" in self.layer_types and (
                    self.sliding_window is None or self.rope_local_theta is None):
                raise ValueError("sliding_attention layers need sliding_window and "
                                 "rope_local_theta")
        return self

    @property
    def gemma(self) -> bool:
        return self.family == "gemma3"


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
        norm = dict(eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs, offset=cfg.gemma)
        self.input_norm = RMSNorm(cfg.hidden, **norm)
        self.q_proj = Linear(cfg.hidden, cfg.heads * cfg.head_dim, ("embed", "heads"),
                             use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, ("embed", "kv"),
                             use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, ("embed", "kv"),
                             use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(cfg.heads * cfg.head_dim, cfg.hidden, ("heads", "embed"), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, axis=None, **norm)
            self.k_norm = RMSNorm(cfg.head_dim, axis=None, **norm)
        # Gemma also normalises what the attention and the MLP add to the residual stream.
        self.attention_out_norm = RMSNorm(cfg.hidden, **norm) if cfg.gemma else None
        self.post_attention_norm = RMSNorm(cfg.hidden, **norm)  # the MLP's input norm
        self.mlp_out_norm = RMSNorm(cfg.hidden, **norm) if cfg.gemma else None
        self.gate_proj = Linear(cfg.hidden, cfg.mlp, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden, cfg.mlp, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.mlp, cfg.hidden, ("mlp", "embed"), **kw)

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, sliding=None, *,
                 cache: KVCache | None = None, cache_index=None, kv_mask_BxS=None):
        """x after the layer. `sliding`: whether this layer is a local (sliding-window) one, a
        traced bool from the layer scan (None: every layer is global). With `cache` ([B, S, K,
        H] slices), (x, updated cache): the T new keys/values are written at slots
        cache_index.. and attention reads the cache."""
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        h_BxTxD = self.input_norm(x_BxTxD)
        q_BxTxNxH = self.q_proj(h_BxTxD).reshape(b, t, cfg.heads, cfg.head_dim)
        k_BxTxKxH = self.k_proj(h_BxTxD).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        v_BxTxKxH = self.v_proj(h_BxTxD).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
        inv_freq_H2 = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        window = None
        if sliding is not None:
            local_H2 = rope_frequencies(cfg.head_dim, cfg.rope_local_theta)
            inv_freq_H2 = jnp.where(sliding, local_H2, inv_freq_H2)
            window = jnp.where(sliding, cfg.sliding_window, _NO_WINDOW)
        q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, inv_freq_H2)
        k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, inv_freq_H2)
        scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        if cache is None:
            attended_BxTxNxH = attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=segment_ids_BxT, causal=True,
                window=window, scale=scale, implementation=cfg.attention_impl,
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
                kv_mask_BxS=kv_mask_BxS, first_slot=cache_index, window=window, scale=scale,
            )
        attended_BxTxD = self.o_proj(attended_BxTxNxH.reshape(b, t, -1))
        if self.attention_out_norm is not None:
            attended_BxTxD = self.attention_out_norm(attended_BxTxD)
        x_BxTxD = x_BxTxD + attended_BxTxD
        h_BxTxD = self.post_attention_norm(x_BxTxD)
        gate_BxTxF = self.gate_proj(h_BxTxD)
        # Gemma's gelu_pytorch_tanh is the tanh approximation.
        gate_BxTxF = jax.nn.gelu(gate_BxTxF, approximate=True) if cfg.gemma else jax.nn.silu(
            gate_BxTxF)
        mlp_BxTxF = constrain(gate_BxTxF * self.up_proj(h_BxTxD), ("batch", "seq", "mlp"))
        mlp_BxTxD = self.down_proj(mlp_BxTxF)
        if self.mlp_out_norm is not None:
            mlp_BxTxD = self.mlp_out_norm(mlp_BxTxD)
        out_BxTxD = x_BxTxD + mlp_BxTxD
        return out_BxTxD if cache is None else (out_BxTxD, cache)


class Decoder(nnx.Module):
    """Embeddings -> scanned layers -> final norm. Output projection only where asked for."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.layers = Stack(lambda r: DecoderLayer(cfg, r), cfg.layers, rngs)
        self.final_norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs,
                                  offset=cfg.gemma)
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
        """Final-norm hidden states [B, T, D] of padded (either side) or packed sequences.

        Without `positions_BxT`, a token's position counts the real tokens before it (as
        transformers' `generate` does), so left and right padding give the same states.

        Incremental decoding (`jaxdistill.generate`): with a `cache`, the T tokens fill slots
        cache_index..cache_index+T of every layer's keys/values; kv_mask_BxS marks the filled
        (non-padding) slots, positions_BxT gives each token's RoPE position, and
        attention_mask is not read. Returns (hidden, updated cache).
        """
        del token_type_ids_BxT  # decoders have no segment embedding
        mask_BxT = attention_mask_BxT.astype(jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=-1) - 1, 0)
        if segment_ids_BxT is None:
            segment_ids_BxT = mask_BxT  # one segment of real tokens; padding is segment 0
        x_BxTxD = self.embed(input_ids_BxT)
        if self.cfg.gemma:  # scaled in the compute dtype, as transformers does
            x_BxTxD = x_BxTxD * jnp.asarray(self.cfg.hidden ** 0.5, x_BxTxD.dtype)
        x_BxTxD = constrain(x_BxTxD, ("batch", "seq", "embed"))
        per_layer = None
        if self.cfg.layer_types is not None:
            per_layer = {"sliding": jnp.asarray(
                [kind == "sliding_attention" for kind in self.cfg.layer_types])}
        if cache is not None:
            x_BxTxD, cache = self.layers(x_BxTxD, positions_BxT, segment_ids_BxT,
                                         per_layer=per_layer, cache=cache,
                                         cache_index=cache_index, kv_mask_BxS=kv_mask_BxS)
            return self.final_norm(x_BxTxD), cache
        x_BxTxD = self.layers(x_BxTxD, positions_BxT, segment_ids_BxT, remat=self.cfg.remat,
                              per_layer=per_layer)
        return self.final_norm(x_BxTxD)

    def unembedding(self) -> jax.Array:
        """Output projection [D, V] in the compute dtype (tied: the embedding transposed)."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.lm_head is None:
            return self.embed.embedding[...].T.astype(dt)
        return self.lm_head.kernel[...].astype(dt)

    def softcap(self, logits: jax.Array) -> jax.Array:
        """Final-logit soft-capping (Gemma), identity when the config has none."""
        cap = self.cfg.final_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Full-vocabulary logits [B, T, V] (soft-capped where the model is)."""
        return self.softcap(jnp.dot(hidden_BxTxD.astype(self.cfg.dtype), self.unembedding()))

    def token_logits(self, hidden_BxD: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
        """Logits for a few fixed tokens only (e.g. "No", "Yes"): [B, len(token_ids)]."""
        dt = jnp.dtype(self.cfg.dtype)
        ids = jnp.asarray(token_ids, dtype=jnp.int32)
        if self.lm_head is None:
            rows_KxD = jnp.take(self.embed.embedding[...], ids, axis=0).astype(dt)
        else:
            rows_KxD = jnp.take(self.lm_head.kernel[...], ids, axis=1).T.astype(dt)
        return self.softcap(jnp.dot(hidden_BxD.astype(dt), rows_KxD.T))
