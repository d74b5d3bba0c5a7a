"""Quantized teachers: a frozen teacher's forward in int8 or fp8 (qwix post-training quantization).

Teachers never train, so their forward may run in reduced precision when its output error is
measured (`output_error`). `quantize_teacher` intercepts the backbone's projections (attention
q/k/v/o and the MLP: where a teacher's FLOPs are) with qwix's `PtqProvider`: each weight is
quantized per output channel (absmax) and each activation per token (dynamic range), and the
matmul runs on the quantized operands (int8 x int8 -> int32 accumulate; fp8 e4m3 likewise).
Attention's score/value products, norms, embeddings and the heads stay in the compute dtype.

The result is a `Functional` with the same params, shapes and shardings as the teacher; only
its graph differs. Weights are stored as given (bf16 on an accelerator) and quantized inside
the program on every call: one extra pass over the teacher's weights per step, no memory saved.
(qwix can only swap weights for pre-quantized arrays on modules it sees outside a scan, and
the layer stack is a `jax.lax.scan` over stacked weights.)

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
# the layer itself (whose own ops are attention's einsums) is not matched.
QUANTIZED_MODULES = r"backbone/layers/layer/.+"


def quantize_teacher(
    model: Functional, params: Params, mode: Mode, example_batch: Mapping[str, Any]
) -> tuple[Functional, Params]:
    """(qmodel, qparams): the teacher with int8/fp8 projections; `example_batch` may be abstract."""
    if mode not in QTYPES:
        raise ValueError(f"quantize mode must be one of {sorted(QTYPES)}, got {mode!r}")
    qtype = QTYPES[mode]
    provider = qwix.PtqProvider([
        qwix.QuantizationRule(module_path=QUANTIZED_MODULES, weight_qtype=qtype, act_qtype=qtype)
    ])

    def build(batch):
        # qwix needs one call to wire its interception; abstract, so no weight is allocated.
        return qwix.quantize_model(TaskModel(model.cfg, rngs=nnx.Rngs(params=0)), provider, batch)

    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                  dict(example_batch))
    graphdef, state = nnx.split(nnx.eval_shape(build, abstract_batch))
    if jax.tree.structure(state) != model.treedef:
        raise ValueError(
            "qwix changed the teacher's parameter structure; quantize_teacher expects weights "
            "quantized on the fly (the quantized modules run inside the layer scan)"
        )
    return dataclasses.replace(model, graphdef=graphdef), params


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
