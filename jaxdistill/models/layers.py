"""Building blocks shared by the backbones: dense, embedding, norms, RoPE, attention, layer stacking.

Every weight is an `nnx.Param` carrying `logical_axes` metadata; `jaxdistill.parallel` maps those
names to mesh axes. Weights live in `param_dtype` (fp32 master weights for a student, bf16 for
a frozen teacher) and are cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.parallel import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

RematPolicy = Literal["none", "full", "dots"]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match weight shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def normal(stddev: float) -> Initializer:
    return lambda key, shape, dtype: stddev * jax.random.normal(key, shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (HF stores [out, in])."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        use_bias: bool = False,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        stddev: float = 0.02,
    ):
        self.dtype = dtype
        self.kernel = param(rngs, normal(stddev), (in_features, out_features), axes, param_dtype)
        self.bias = (
            param(rngs, zeros, (out_features,), (axes[1],), param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding [vocab, embed]; `attend` reuses it as the output projection."""

    def __init__(self, vocab_size: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(
            rngs, normal(0.02), (vocab_size, features), ("vocab", "embed"), param_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Llama/Qwen RMSNorm: normalise in fp32, scale in the input dtype.

    `offset` (Gemma): the weight is stored as w with scale (1 + w), applied in fp32.
    """

    def __init__(self, features: int, *, eps: float, param_dtype, rngs: nnx.Rngs, axis="embed",
                 offset: bool = False):
        self.eps = eps
        self.offset = offset
        self.scale = param(rngs, zeros if offset else ones, (features,), (axis,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """BERT LayerNorm with bias, statistics in fp32."""

    def __init__(self, features: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (features,), ("embed",), param_dtype)
        self.bias = param(rngs, zeros, (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.scale[...] + self.bias[...]).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """RoPE inverse frequencies [head_dim / 2] (fp32), with HF's `linear` or `llama3` scaling.

    `scaling` is a `decoder.RopeScaling` (or None: plain RoPE). Computed on the host: static.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3 (transformers' `_compute_llama3_parameters`): long wavelengths are slowed by
    # `factor`, short ones kept, and the band between interpolated smoothly.
    low_wavelen = scaling.original_max_positions / scaling.low_freq_factor
    high_wavelen = scaling.original_max_positions / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_positions / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_H2: jax.Array) -> jax.Array:
    """Rotary embedding, half-split layout (HF `rotate_half`), angles in fp32."""
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H2
    cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
    sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


def attention(
    q_BxTxNxH: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    *,
    segment_ids_BxT: jax.Array,
    causal: bool,
    window: jax.Array | int | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Grouped-query attention within segments; segment 0 (padding) is never attended.

    Unpacked rows pass their attention mask as `segment_ids_BxT`, so padded keys are excluded
    wherever they sit (left, right or between). `window`: keys at least that many positions
    before the query are excluded (sliding-window layers; may be traced). `scale`: the
    softmax scale (default head_dim ** -0.5).
    """
    t = q_BxTxNxH.shape[1]
    allowed_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    allowed_BxTxT &= (segment_ids_BxT > 0)[:, None, :]
    query_T1, key_1T = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    if causal:
        allowed_BxTxT &= (key_1T <= query_T1)[None]
    if window is not None:
        allowed_BxTxT &= (query_T1 - key_1T < window)[None]
    # Padding query rows would otherwise attend to nothing; let them see themselves.
    allowed_BxTxT |= jnp.eye(t, dtype=bool)[None]
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=allowed_BxTxT[:, None], scale=scale,
        is_causal=causal, implementation=implementation,
    )


class KVCache(NamedTuple):
    """Keys and values of every decoder layer for incremental decoding.

    k and v are [L, B, S, K, H] (layers, batch, cache slots, kv heads, head dim): stacked on
    the leading layers axis like `Stack`'s weights, so its scan hands each layer its
    [B, S, K, H] slice and stacks the updated slices back.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int,
              dtype) -> KVCache:
        shape = (layers, batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cached_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    *,
    kv_mask_BxS: jax.Array,
    first_slot: jax.Array,
    window: jax.Array | int | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Causal grouped-query attention of T new queries (in slots first_slot..+T) over a cache.

    A query sees the filled slots (kv_mask) up to its own; padding in any place (left- or
    right-padded prompts) is just a slot whose mask is 0. Each query also sees itself, so a
    padding query never attends to nothing (no NaN; its output is unused). `window` and
    `scale` as in `attention` (a row's real tokens fill consecutive slots, so slot distance is
    position distance).
    """
    t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    query_slot_T = first_slot + jnp.arange(t)
    key_slot_S = jnp.arange(s)
    causal_TxS = key_slot_S[None, :] <= query_slot_T[:, None]
    if window is not None:
        causal_TxS &= query_slot_T[:, None] - key_slot_S[None, :] < window
    visible_BxTxS = (kv_mask_BxS.astype(bool)[:, None, :] & causal_TxS[None])
    visible_BxTxS |= (key_slot_S[None, :] == query_slot_T[:, None])[None]
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=visible_BxTxS[:, None], scale=scale,
        implementation=implementation)


def remat_policy(name: RematPolicy):
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


class Stack(nnx.Module):
    """`depth` copies of a layer whose weights are stacked on a leading `layers` axis.

    Applied with `jax.lax.scan`, so compile time does not grow with depth; each layer is
    rematerialised by `remat` in the backward pass.
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs):
        keys = jax.random.split(rngs.params(), depth)

        def init_one(key):
            return nnx.split(make_layer(nnx.Rngs(params=key)))[1]

        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(nnx.Rngs(params=0))))
        stacked = jax.vmap(init_one)(keys)
        stacked = jax.tree.map(
            lambda v: v.replace(logical_axes=("layers",) + v.get_metadata()["logical_axes"]),
            stacked,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        self.depth = depth
        self.layer = nnx.merge(graphdef, stacked)

    def __call__(self, x, *args, remat: RematPolicy = "none", per_layer=None,
                 cache: KVCache | None = None, **kwargs):
        """x after every layer. `per_layer`: keyword inputs with a leading [depth] axis, scanned
        with the weights (e.g. which layers use sliding-window attention). With a `cache`,
        (x, updated cache): each layer is called with its [B, S, K, H] slice as `cache=` and
        returns (x, its updated slice)."""
        graphdef, stacked = nnx.split(self.layer)

        if cache is not None:
            def cached_body(carry, xs):
                layer_state, layer_cache, layer_inputs = xs
                layer = nnx.merge(graphdef, layer_state)
                out, layer_cache = layer(carry, *args, cache=layer_cache, **kwargs,
                                         **(layer_inputs or {}))
                return constrain(out, ("batch", "seq", "embed")), layer_cache

            return jax.lax.scan(cached_body, x, (stacked, cache, per_layer))

        def body(carry, xs):
            layer_state, layer_inputs = xs
            layer = nnx.merge(graphdef, layer_state)
            out = layer(carry, *args, **kwargs, **(layer_inputs or {}))
            return constrain(out, ("batch", "seq", "embed")), None

        if remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (stacked, per_layer))
        return x
