"""A task model (backbone + named heads) and its pure-function form over a params dict.

Every model in jaxdistill, teacher or student, is a `TaskModel`: one backbone and named heads,
called on a batch dict, returning `{head_name: output, "pooled": pooled_BxD}`. Inputs may carry
extra leading dims (a listwise batch is [B, N, T]); outputs keep them.

Outside the module, weights travel as a nested dict of arrays (`params`); `Functional` binds a
params dict back to the module inside traced code (graphdef static), which is what the jitted
step, checkpoints and HF import work with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Annotated, Any

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxdistill import parallel
from jaxdistill.models.decoder import Decoder, DecoderConfig
from jaxdistill.models.encoder import Encoder, EncoderConfig
from jaxdistill.models.heads import (
    ActionHead,
    HeadConfig,
    LMHead,
    ProjectionHead,
    TokenScoreHead,
    build_head,
)

BackboneConfig = Annotated[DecoderConfig | EncoderConfig, Field(discriminator="type")]

Params = dict[str, Any]


class ModelConfig(BaseModel):
    """A backbone and its named heads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: BackboneConfig
    heads: dict[str, HeadConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        for name, head in self.heads.items():
            if name == "pooled":
                raise ValueError("head name 'pooled' is reserved for the pooled hidden state")
            if isinstance(head, TokenScoreHead | LMHead) and self.backbone.type != "decoder":
                raise ValueError(
                    f"head {name!r} of type {head.type!r} reads the output embedding and needs a "
                    f"decoder backbone; an encoder uses a 'classifier' head instead"
                )
            if isinstance(head, LMHead) and getattr(self.backbone, "final_softcap", None):
                raise ValueError(
                    f"head {name!r}: an lm head hands (hidden, unembedding) to the token-level "
                    "losses, which do not apply the backbone's final_softcap "
                    f"({self.backbone.final_softcap}); use a model without final soft-capping"
                )
            if isinstance(head, TokenScoreHead):
                bad = [i for i in head.token_ids if not 0 <= i < self.backbone.vocab_size]
                if bad:
                    raise ValueError(
                        f"head {name!r}: token ids {bad} outside vocabulary of size "
                        f"{self.backbone.vocab_size}"
                    )
        return self

    def with_numerics(self, **numerics) -> ModelConfig:
        """The same model with other backbone numerics (dtype, param_dtype, remat, ...)."""
        backbone = type(self.backbone).model_validate({**self.backbone.model_dump(), **numerics})
        return self.model_copy(update={"backbone": backbone})


class TaskModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        backbone_cls = Decoder if cfg.backbone.type == "decoder" else Encoder
        self.backbone = backbone_cls(cfg.backbone, rngs=rngs)
        width = cfg.backbone.hidden
        pdt = jnp.dtype(cfg.backbone.param_dtype)
        self.heads = nnx.Dict({
            name: head
            for name, head_cfg in cfg.heads.items()
            if (head := build_head(head_cfg, width, param_dtype=pdt, rngs=rngs)) is not None
        })

    def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        input_ids = batch["input_ids"]
        lead = input_ids.shape[:-1]
        flat = lambda x: None if x is None else x.reshape((-1,) + x.shape[len(lead):])  # noqa
        ids_MxT = flat(input_ids)
        mask_MxT = flat(batch["attention_mask"])
        hidden_MxTxD = self.backbone(
            ids_MxT,
            mask_MxT,
            token_type_ids_BxT=flat(batch.get("token_type_ids")),
            segment_ids_BxT=flat(batch.get("segment_ids")),
            positions_BxT=flat(batch.get("positions")),
        )
        pooled_MxD = self._pool(hidden_MxTxD, mask_MxT)
        unflat = lambda x: x.reshape(lead + x.shape[1:])  # noqa: E731
        outputs: dict[str, Any] = {"pooled": unflat(pooled_MxD)}
        for name, head_cfg in self.cfg.heads.items():
            if isinstance(head_cfg, TokenScoreHead):
                outputs[name] = unflat(self.backbone.token_logits(pooled_MxD, head_cfg.token_ids))
            elif isinstance(head_cfg, LMHead):
                outputs[name] = (unflat(hidden_MxTxD), self.backbone.unembedding())
            else:
                x_MxD = pooled_MxD.astype(jnp.float32)
                if isinstance(head_cfg, ActionHead) and head_cfg.features:
                    x_MxD = jnp.concatenate([x_MxD, self._features(batch, lead, head_cfg)], -1)
                if isinstance(head_cfg, ActionHead) and head_cfg.position_buckets:
                    x_MxD = jnp.concatenate([x_MxD, self._positions(batch, lead, head_cfg)], -1)
                outputs[name] = unflat(self.heads[name](x_MxD).astype(jnp.float32))
        return outputs

    def _pool(self, hidden_MxTxD, mask_MxT):
        # The last (decoder) or first (cls) real token, wherever the padding is; an
        # all-padding row (a padded list slot) reads position 0.
        real_MxT = mask_MxT > 0
        if self.cfg.backbone.type == "decoder":
            t = real_MxT.shape[-1]
            last_M = jnp.where(real_MxT.any(-1), t - 1 - jnp.argmax(real_MxT[:, ::-1], -1), 0)
            return jnp.take_along_axis(hidden_MxTxD, last_M[:, None, None], axis=1)[:, 0]
        if self.cfg.backbone.pooling == "cls":
            first_M = jnp.argmax(real_MxT, -1)
            return jnp.take_along_axis(hidden_MxTxD, first_M[:, None, None], axis=1)[:, 0]
        weights_MxT = mask_MxT.astype(hidden_MxTxD.dtype)
        total_MxD = jnp.einsum("mtd,mt->md", hidden_MxTxD, weights_MxT)
        return total_MxD / jnp.maximum(weights_MxT.sum(-1, keepdims=True), 1)

    @staticmethod
    def _positions(batch, lead, head_cfg: ActionHead):
        if "position" not in batch:
            raise ValueError(f"action head with position_buckets={head_cfg.position_buckets} "
                             "needs the logged 'position' in the batch")
        position_M = batch["position"].reshape(-1)
        if position_M.shape[0] != math.prod(lead):
            raise ValueError(f"'position' has shape {batch['position'].shape}, expected {lead}")
        bucket_M = jnp.clip(position_M, 0, head_cfg.position_buckets - 1)
        return jax.nn.one_hot(bucket_M, head_cfg.position_buckets, dtype=jnp.float32)

    @staticmethod
    def _features(batch, lead, head_cfg: ActionHead):
        if "member_features" not in batch:
            raise ValueError(
                f"action head with features={head_cfg.features} needs 'member_features' in the batch"
            )
        feats = batch["member_features"].astype(jnp.float32)
        if feats.shape[-1] != head_cfg.features:
            raise ValueError(
                f"member_features has width {feats.shape[-1]}, the action head expects "
                f"{head_cfg.features}"
            )
        # A listwise batch has one member per list: broadcast over the candidate axis.
        while feats.ndim < len(lead) + 1:
            feats = feats[..., None, :]
        return jnp.broadcast_to(feats, lead + feats.shape[-1:]).reshape(-1, feats.shape[-1])


@dataclasses.dataclass(frozen=True, eq=False)
class Functional:
    """A built module as a pure function of its params dict."""

    cfg: ModelConfig
    graphdef: Any
    treedef: Any
    axes: Params  # same structure as params: logical axis names per weight
    shapes: Params  # same structure: jax.ShapeDtypeStruct per weight

    def bind(self, params: Params) -> TaskModel:
        leaves = jax.tree.leaves(params)
        if len(leaves) != self.treedef.num_leaves:
            raise ValueError(
                f"params have {len(leaves)} arrays, the model expects {self.treedef.num_leaves}"
            )
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))

    def apply(self, params: Params, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        return self.bind(params)(batch)

    @functools.cached_property
    def jit_apply(self):
        """`apply` jitted once per model (scoring many splits compiles once per input shape)."""
        return jax.jit(self.apply)

    def shardings(self, mesh, rules):
        return parallel.tree_shardings(self.axes, self.shapes, mesh, rules)

    def init(self, seed: int, mesh=None, rules=None) -> Params:
        """Fresh params; with a mesh, each weight is created directly in its sharding."""
        cfg = self.cfg

        def make(key):
            return nnx.split(TaskModel(cfg, rngs=nnx.Rngs(params=key)))[1].to_pure_dict()

        out_shardings = None if mesh is None else self.shardings(mesh, rules)
        return jax.jit(make, out_shardings=out_shardings)(jax.random.key(seed))


def functional(cfg: ModelConfig) -> Functional:
    """The static half of a model (graphdef, axes, shapes) without allocating any weight."""
    abstract = nnx.eval_shape(lambda: TaskModel(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(abstract)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=is_var)
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state, is_leaf=is_var)
    return Functional(
        cfg=cfg,
        graphdef=graphdef,
        treedef=jax.tree.structure(state),
        axes=axes.to_pure_dict(),
        shapes=shapes.to_pure_dict(),
    )


def count_params(params_or_shapes: Params, *, exclude_embeddings: bool = False) -> int:
    """Number of weights; `exclude_embeddings` drops token-embedding and untied output tables."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_or_shapes):
        keys = [getattr(k, "key", None) for k in path]
        if exclude_embeddings and ("embed" in keys or "lm_head" in keys):
            continue
        total += math.prod(leaf.shape)
    return total
