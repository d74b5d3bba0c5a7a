"""Bidirectional encoder of the BERT family (MiniLM included): post-LayerNorm, GELU MLP."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import BaseModel, ConfigDict, model_validator

from jaxdistill.models.layers import Embed, LayerNorm, Linear, RematPolicy, Stack, attention, param
from jaxdistill.models.layers import normal
from jaxdistill.parallel import constrain


class EncoderConfig(BaseModel):
    """Shape and numerics of an encoder backbone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["encoder"] = "encoder"
    family: Literal["bert"] = "bert"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pooling: Literal["cls", "mean"] = "cls"
    # BERT's pre-training pooler (tanh dense over [CLS]), carried so an export keeps the
    # checkpoint's; heads read `pooling`, never it.
    pooler: bool = False
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: RematPolicy = "full"
    attention_impl: Literal["xla", "cudnn"] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def bert_base(**overrides) -> EncoderConfig:
    return EncoderConfig(vocab_size=30522, hidden=768, layers=12, heads=12, mlp=3072, **overrides)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.cfg = cfg
        self.q_proj = Linear(cfg.hidden, cfg.hidden, ("embed", "heads"), **kw)
        self.k_proj = Linear(cfg.hidden, cfg.hidden, ("embed", "heads"), **kw)
        self.v_proj = Linear(cfg.hidden, cfg.hidden, ("embed", "heads"), **kw)
        self.o_proj = Linear(cfg.hidden, cfg.hidden, ("heads", "embed"), **kw)
        self.attention_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.up_proj = Linear(cfg.hidden, cfg.mlp, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.mlp, cfg.hidden, ("mlp", "embed"), **kw)
        self.mlp_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)

    def __call__(self, x_BxTxD, mask_BxT):
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        split = lambda y: y.reshape(b, t, cfg.heads, cfg.head_dim)  # noqa: E731
        attended_BxTxNxH = attention(
            split(self.q_proj(x_BxTxD)), split(self.k_proj(x_BxTxD)), split(self.v_proj(x_BxTxD)),
            segment_ids_BxT=mask_BxT, causal=False, implementation=cfg.attention_impl,
        )
        x_BxTxD = self.attention_norm(x_BxTxD + self.o_proj(attended_BxTxNxH.reshape(b, t, -1)))
        # BERT's "gelu" is the exact erf form.
        mlp_BxTxF = jax.nn.gelu(self.up_proj(x_BxTxD), approximate=False)
        mlp_BxTxF = constrain(mlp_BxTxF, ("batch", "seq", "mlp"))
        return self.mlp_norm(x_BxTxD + self.down_proj(mlp_BxTxF))


class Encoder(nnx.Module):
    """Word + position + token-type embeddings -> LayerNorm -> scanned layers."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.position_embedding = param(
            rngs, normal(0.02), (cfg.max_positions, cfg.hidden), (None, "embed"), pdt
        )
        self.token_type_embedding = param(
            rngs, normal(0.02), (cfg.type_vocab_size, cfg.hidden), (None, "embed"), pdt
        )
        self.embed_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.layers = Stack(lambda r: EncoderLayer(cfg, r), cfg.layers, rngs)
        self.pooler = (
            Linear(cfg.hidden, cfg.hidden, ("embed", None), use_bias=True, dtype=dt,
                   param_dtype=pdt, rngs=rngs)
            if cfg.pooler else None
        )

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array,
        *,
        token_type_ids_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
        positions_BxT: jax.Array | None = None,
    ) -> jax.Array:
        """Hidden states [B, T, D] of padded sequences (either side; positions count from 0 at
        the first column, as BERT does)."""
        if segment_ids_BxT is not None:
            raise ValueError("the encoder does not support packed sequences (segment_ids)")
        b, t = input_ids_BxT.shape
        if t > self.cfg.max_positions:
            raise ValueError(f"sequence length {t} exceeds max_positions {self.cfg.max_positions}")
        dt = jnp.dtype(self.cfg.dtype)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_type_ids_BxT is None:
            token_type_ids_BxT = jnp.zeros_like(input_ids_BxT)
        x_BxTxD = (
            self.embed(input_ids_BxT)
            + jnp.take(self.position_embedding[...], positions_BxT, axis=0).astype(dt)
            + jnp.take(self.token_type_embedding[...], token_type_ids_BxT, axis=0).astype(dt)
        )
        x_BxTxD = constrain(self.embed_norm(x_BxTxD), ("batch", "seq", "embed"))
        mask_BxT = attention_mask_BxT.astype(jnp.int32)
        return self.layers(x_BxTxD, mask_BxT, remat=self.cfg.remat)
