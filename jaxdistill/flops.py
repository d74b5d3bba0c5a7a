"""Model FLOPs of a distillation step, split by model (DESIGN.md's MFU convention).

A teacher's forward costs 2·N·tokens, the student's forward + backward 6·N·tokens (N =
non-embedding params), each plus its attention FLOPs; `FORMULA` says exactly what is counted.
One function serves the benchmark, the trainer's throughput metrics and any report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxdistill.models.model import Functional, count_params

FORMULA = """\
FLOPs/step = sum over teachers [2*N_t*tokens + A_t] + 3*[2*N_s*tokens + A_s]
  N       = non-embedding params (count_params(exclude_embeddings=True); heads included; a
            token_score head reads only 2 embedding rows: 2*2*D per example, not counted)
  tokens  = sequences * S, padding included (every position is computed)
  A       = attention forward = 4*sequences*S^2*layers*heads*head_dim, halved for a causal
            decoder (causal halving COUNTED: only the lower triangle of QK^T and AV is useful
            work); an encoder's bidirectional attention is not halved
  x3      = the student's forward + backward (2x the forward); teachers run forward only"""


def attention_flops(model: Functional, sequences: int, seq_len: int) -> float:
    """QK^T and AV of one forward: 2 matmuls x 2 FLOPs per multiply-add, causal halving."""
    backbone = model.cfg.backbone
    head_dim = getattr(backbone, "head_dim", None) or backbone.hidden // backbone.heads
    full = 4 * sequences * seq_len**2 * backbone.layers * backbone.heads * head_dim
    return full / 2 if backbone.type == "decoder" else full


def model_flops(model: Functional, sequences: int, seq_len: int, *, train: bool) -> dict[str, Any]:
    """One model's FLOPs per step: its forward, times 3 when it also runs backward."""
    non_embedding = count_params(model.shapes, exclude_embeddings=True)
    forward = 2 * non_embedding * sequences * seq_len + attention_flops(model, sequences, seq_len)
    return {"params": count_params(model.shapes), "non_embedding": non_embedding,
            "flops": (3 if train else 1) * forward, "role": "student" if train else "teacher"}


def step_flops(student: Functional, teachers: Mapping[str, Functional], sequences: int,
               seq_len: int) -> dict[str, Any]:
    """FLOPs of one fused step split by model (`models[name]`), their `total` and `FORMULA`.

    `sequences` is every sequence a model reads per step (batch x list size for listwise).
    """
    models = {name: model_flops(model, sequences, seq_len, train=False)
              for name, model in teachers.items()}
    models["student"] = model_flops(student, sequences, seq_len, train=True)
    return {"models": models, "total": sum(m["flops"] for m in models.values()),
            "tokens": sequences * seq_len, "formula": FORMULA}


def mfu(flops: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: useful FLOPs per second over the device's peak."""
    return flops / step_seconds / peak_flops
