"""FLOP accounting: 2·N·tokens per teacher forward, 6·N·tokens for the student, attention with
causal halving, split by model; N counted by hand from the shapes."""

import pytest

from jaxdistill import flops
from jaxdistill.models.model import ModelConfig, functional

D, L, H, KV, HD, F, V = 64, 2, 4, 2, 16, 128, 256
DECODER = {"type": "decoder", "vocab_size": V, "hidden": D, "layers": L, "heads": H,
           "kv_heads": KV, "head_dim": HD, "mlp": F}
HEADS = {"relevance": {"type": "token_score", "token_ids": [5, 6]},
         "actions": {"type": "actions", "names": ["click", "apply", "dismiss"]}}


def hand_non_embedding(d=D, layers=L, heads=H, kv=KV, hd=HD, f=F):
    attention = d * heads * hd * 2 + d * kv * hd * 2  # q, o; k, v
    mlp = 3 * d * f
    norms = 2 * d + 2 * hd  # input / post-attention norms, q / k norms (Qwen3)
    actions = d * 3 + 3  # the actions head's kernel and bias
    return layers * (attention + mlp + norms) + d + actions  # + final norm


def test_step_flops_split_by_model():
    teacher = functional(ModelConfig(backbone=DECODER, heads=HEADS))
    student = functional(ModelConfig(backbone={**DECODER, "hidden": 32, "mlp": 64, "layers": 1},
                                     heads=HEADS))
    b, s = 4, 32
    out = flops.step_flops(student, {"rel": teacher, "eng": teacher}, b, s)
    n_t, n_s = hand_non_embedding(), hand_non_embedding(d=32, layers=1, f=64)
    assert out["models"]["rel"]["non_embedding"] == n_t
    assert out["models"]["student"]["non_embedding"] == n_s
    assert out["models"]["rel"]["params"] == n_t + V * D  # tied embedding
    causal = lambda layers: 4 * b * s * s * layers * H * HD / 2  # noqa: E731
    assert out["models"]["rel"]["flops"] == 2 * n_t * b * s + causal(L)
    assert out["models"]["student"]["flops"] == 3 * (2 * n_s * b * s + causal(1))
    assert out["models"]["rel"]["role"] == "teacher"
    assert out["models"]["student"]["role"] == "student"
    assert out["total"] == pytest.approx(sum(m["flops"] for m in out["models"].values()))
    assert out["tokens"] == b * s and "causal halving COUNTED" in out["formula"]


def test_encoder_attention_is_not_halved():
    encoder = functional(ModelConfig(backbone={"type": "encoder", "vocab_size": V, "hidden": D,
                                               "layers": L, "heads": H, "mlp": F}))
    assert flops.attention_flops(encoder, 2, 16) == 4 * 2 * 16 * 16 * L * H * (D // H)


def test_mfu():
    assert flops.mfu(989e12 * 0.42 * 0.168, 0.168, 989e12) == pytest.approx(0.42)
