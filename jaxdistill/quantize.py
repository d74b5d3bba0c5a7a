"""Quantized teachers: a frozen teacher's forward in int8 or fp8 (qwix post-training quantization).

Teachers never train, so their forward may run in reduced precision when its output error is
measured (`output_error`). `quantize_teacher` quantizes the backbone's projection kernels
(attention q/k/v/o and the MLP: where a teacher's FLOPs are) once, per layer and output channel
(absmax), into `qwix.QArray`s (int8 or fp8 values + scales) that replace them in the params,
and intercepts the model's matmuls with qwix's `PtqProvider`: each activation is quantized per
token (dynamic range) and the matmul runs on the quantized operands (int8 x int8 -> int32
accumulate; fp8 e4m3 likewise). Attention's score/value products, norms, embeddings and the
heads stay in the compute dtype.

The result is a `Functional` whose params hold the quantized kernels (half a bf16 teacher's
bytes for them) with the teacher's logical axes, so `shardings` places values and scales by
the same rules.

On CPU, XLA runs fp8 dots by upcasting to f32 after rounding to e4m3, so fp8's numerics (the
error) are real there but its speed is not; int8 dots run as integer dots on every backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from jaxdistill.models.heads import ActionHead, ClassifierHead, ProjectionHead, TokenScoreHead
from jaxdistill.models.model import Functional, Params, TaskModel

Mode = Literal["int8", "fp8"]
QTYPES: dict[str, Any] = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
# qwix module paths (nnx attribute names joined by "/"): every module inside the layer stack;
# the layer itself (whose own ops are attention's einsums) is not matched. The same modules'
# kernels are the ones `quantize_params` stores quantized.
QUANTIZED_MODULES = r"backbone/layers/layer/.+"
_STACK = ("backbone", "layers", "layer")


class _StoredWeightsPtq(qwix.PtqProvider):
    """qwix PTQ whose weights arrive already quantized (a `QArray` in the params)."""

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None, *, out_sharding=None):
        if not isinstance(rhs, qwix.QArray):
            return super().dot_general(lhs, rhs, dimension_numbers, precision,
                                       preferred_element_type, out_sharding=out_sharding)
        rule, _ = self._get_current_rule_and_op_id("dot_general")
        (lhs_contracting, _), _ = dimension_numbers
        per_token = [axis for axis in range(lhs.ndim) if axis not in lhs_contracting]
        lhs = qwix.quantize(lhs, rule.act_qtype, channelwise_axes=per_token)
        return qwix.dot_general(lhs, rhs, dimension_numbers, out_sharding=out_sharding)


def quantize_params(params: Params, mode: Mode) -> Params:
    """The layer stack's kernels [layers, in, out] as QArrays, one scale per layer and output."""
    qtype = QTYPES[mode]

    def one(path, x):
        keys = tuple(getattr(k, "key", None) for k in path)
        if keys[:3] == _STACK and keys[-1] == "kernel":
            return qwix.quantize(x, qtype, channelwise_axes=(0, 2))
        return x

    return jax.tree_util.tree_map_with_path(one, params)


def quantize_teacher(
    model: Functional, params: Params | None, mode: Mode, example_batch: Mapping[str, Any]
) -> tuple[Functional, Params | None]:
    """(qmodel, qparams): the teacher with int8/fp8 projections and its quantized params.

    `params=None` gives the model alone (shapes and shardings for a plan); `example_batch` may
    be abstract. qparams come out where jit puts them: `jax.device_put(qparams,
    qmodel.shardings(mesh, rules))` places them by the rules.
    """
    if mode not in QTYPES:
        raise ValueError(f"quantize mode must be one of {sorted(QTYPES)}, got {mode!r}")
    qtype = QTYPES[mode]
    provider = _StoredWeightsPtq([
        qwix.QuantizationRule(module_path=QUANTIZED_MODULES, weight_qtype=qtype, act_qtype=qtype)
    ])
    qshapes = jax.eval_shape(lambda p: quantize_params(p, mode), model.shapes)

    def build(qparams, batch):
        # qwix wires its interception with one call; abstract: no weight is allocated.
        graphdef, state = nnx.split(TaskModel(model.cfg, rngs=nnx.Rngs(params=0)))
        state.replace_by_pure_dict(qparams)
        return qwix.quantize_model(nnx.merge(graphdef, state), provider, batch)

    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                  dict(example_batch))
    graphdef, state = nnx.split(nnx.eval_shape(build, qshapes, abstract_batch))
    qmodel = dataclasses.replace(model, graphdef=graphdef, treedef=jax.tree.structure(state),
                                 shapes=qshapes)
    if params is None:
        return qmodel, None
    return qmodel, jax.jit(quantize_params, static_argnums=1)(params, mode)


def output_error(
    model: Functional, params: Params, qmodel: Functional, qparams: Params,
    batch: Mapping[str, Any],
) -> dict[str, dict[str, float]]:
    """Per head, how far the quantized teacher's outputs are from the reference's on `batch`.

    token_score / classifier heads: KL(reference || quantized) of the softmax distribution in
    nats (`kl_mean`, `kl_max` over rows); actions: `max_abs_prob`, the largest absolute error
    of a sigmoid probability; projection heads and the pooled state: `rel_l2`, the relative L2
    error. lm heads (per-token hidden states) are reported as `pooled` only.
    """
    reference = jax.device_get(model.jit_apply(params, batch))
    quantized = jax.device_get(qmodel.jit_apply(qparams, batch))
    errors = {}
    for name, head in model.cfg.heads.items():
        ref, got = reference[name], quantized[name]
        if isinstance(head, TokenScoreHead | ClassifierHead):
            kl = _kl(np.asarray(ref, np.float64), np.asarray(got, np.float64))
            errors[name] = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max())}
        elif isinstance(head, ActionHead):
            diff = _sigmoid(np.asarray(ref, np.float64)) - _sigmoid(np.asarray(got, np.float64))
            errors[name] = {"max_abs_prob": float(np.abs(diff).max())}
        elif isinstance(head, ProjectionHead):
            errors[name] = {"rel_l2": _rel_l2(ref, got)}
    errors["pooled"] = {"rel_l2": _rel_l2(reference["pooled"], quantized["pooled"])}
    return errors


def _kl(logits_ref, logits_q):
    logp = logits_ref - _logsumexp(logits_ref)
    logq = logits_q - _logsumexp(logits_q)
    return np.sum(np.exp(logp) * (logp - logq), axis=-1)


def _logsumexp(x):
    top = x.max(-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(-1, keepdims=True))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _rel_l2(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
