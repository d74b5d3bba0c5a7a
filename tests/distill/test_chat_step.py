"""The fused step on a chat objective: a live tone teacher and a cached top-k accuracy teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import parallel
from jaxdistill.distill import losses
from jaxdistill.distill.objectives import Term, compute_objective
from jaxdistill.distill.step import (
    Distiller,
    OptimizerConfig,
    compile_step,
    init_sharded_state,
    make_optimizer,
)
from jaxdistill.models.model import ModelConfig, functional

B, T, VOCAB, K = 4, 8, 64, 8
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # as in test_step: same program, faster


def _random_params(model, seed, stddev=0.3):
    """Host-drawn weights (no init program to compile), large enough for peaked logits."""
    rng = np.random.default_rng(seed)

    def one(path, shape):
        if getattr(path[-1], "key", None) == "scale":
            return np.ones(shape.shape, np.float32)
        return (stddev * rng.normal(size=shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, model.shapes)


def _model(layers, hidden):
    return functional(ModelConfig(
        backbone={"type": "decoder", "vocab_size": VOCAB, "hidden": hidden, "layers": layers,
                  "heads": 2, "kv_heads": 1, "head_dim": 8, "mlp": 32, "dtype": "float32",
                  "param_dtype": "float32", "remat": "none"},
        heads={"lm": {"type": "lm"}}))


def _batch():
    rng = np.random.default_rng(0)
    lengths = np.array([8, 6, 5, 7])
    attention = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    response = (np.arange(T)[None] >= 3) * attention  # prompt: the first 3 tokens
    answer = response * (np.arange(T)[None] < 5)  # the answer: the response's first 2 tokens
    return {"input_ids": (rng.integers(1, VOCAB, (B, T)) * attention).astype(np.int32),
            "attention_mask": attention,
            "loss_mask": np.asarray(losses.next_token_mask(response)),
            "answer_mask": np.asarray(losses.next_token_mask(answer))}


# ~10 s on two cores: one compile of the sharded fused step, the chat wiring end to end.
@pytest.mark.slow
def test_fused_step_with_live_and_cached_token_teachers():
    student, tone, accuracy = _model(1, 16), _model(1, 24), _model(2, 16)
    student_params, tone_params, accuracy_params = (_random_params(m, seed) for seed, m in
                                                    enumerate((student, tone, accuracy)))
    batch = _batch()

    @jax.jit
    def cache_teacher(params, batch):  # what cache-teacher stores for the accuracy teacher
        hidden, unembed = accuracy.apply(params, batch)["lm"]
        return losses.topk_teacher(hidden, unembed, K, batch["answer_mask"])

    batch["offline"] = {"accuracy": {"lm": cache_teacher(accuracy_params, batch)}}
    terms = (
        Term(name="accuracy", loss="sparse_token_kl", student="lm", teacher="accuracy",
             mask="answer_mask"),
        Term(name="tone", loss="token_kl", student="lm", teacher="tone", mask="loss_mask",
             hparams={"kind": "jsd", "beta": 0.5, "chunk_size": 4}, weight=0.5),
    )
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                                         total_steps=10))
    distiller = Distiller(student=student, teachers={"tone": tone}, terms=terms,
                          optimizer=optimizer, schedule=schedule)
    # The objective's value before any update, computed outside the step.
    expected = jax.jit(lambda params, batch: compute_objective(
        terms, student.apply(params, batch), {"tone": tone.apply(tone_params, batch)}, batch,
        jnp.asarray(0))[1])(student_params, batch)
    mesh = parallel.make_mesh((2, 1, 4))  # batch over data, vocabulary over tensor
    rules = parallel.DEFAULT_RULES
    state = init_sharded_state(distiller, 0, mesh, rules, params=student_params)
    teacher_params = {"tone": jax.device_put(tone_params, tone.shardings(mesh, rules))}
    step = compile_step(distiller, mesh, rules, state, teacher_params, batch)
    step = step.lower(state, teacher_params, batch).compile(FAST_COMPILE)
    totals = []
    for i in range(4):
        state, metrics = step(state, teacher_params, batch)
        if i == 0:
            for key in ("loss/accuracy", "loss/tone", "loss/total"):
                np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-4, err_msg=key)
        totals.append(float(metrics["loss/total"]))
    assert np.all(np.isfinite(totals)) and totals[-1] < totals[0], totals
