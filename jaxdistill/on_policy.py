"""On-policy distillation: the student's own responses to a batch's prompts, as the step's batch.

Generalised KD (Agarwal et al. 2024, "On-policy distillation of language models"): a student
trained only on the teachers' or the data's responses never sees the prefixes its own mistakes
lead to; trained on its own samples, scored token by token by the teachers, it learns to
recover from them. `on_policy.fraction` mixes the two as the paper's λ (and TRL's GKD
`lmbda`): each step is on-policy with that probability, the whole batch at once. A per-step
choice rather than a share of every batch's rows keeps one batch shape for the step and costs
no sampling on off-policy steps; the choice is a function of (seed, step) alone, so a resumed
run makes the same choices as an uninterrupted one.

On an on-policy step the `Sampler` (one jitted program, compiled ahead of the loop like the
step, batch sharded over the batch axes) takes each row's prompt (its tokens before the first
`loss_mask` token), lets the current student continue it (`generate.sample_responses`, KV
cache, PRNG key folded from the seed and the state's step) and returns a batch of the step's
own shape: the row is cut back to data.max_len, `loss_mask` marks exactly the sampled tokens
and the other chat masks follow from it (`data.pipeline.chat_masks`). Where the student's
reply states the answer is unknown: with `answer_span: none` (the default) a sampled reply has
no answer tokens, so a term on `next_answer_mask` sits the step out and `next_style_mask` is
the whole reply; with `response` the whole reply is the answer span. Every other field
(`record_index`) is the batch's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill import parallel
from jaxdistill.data.pipeline import chat_masks
from jaxdistill.distill.step import batch_shardings
from jaxdistill.generate import sample_responses
from jaxdistill.models.model import Functional, Params

# Mixed into the seed so the on-policy draws are not the stream of anything else seeded by it.
_STREAM = 0x6F6E706F


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether step `step` (0-based) trains on the student's samples: a draw from (seed, step)
    alone, True with probability `fraction`."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return bool(np.random.default_rng([seed, _STREAM, step]).random() < fraction)


def on_policy_steps(seed: int, steps: int, fraction: float) -> int:
    """How many of the steps 0..steps-1 are on-policy (a resumed run's count so far)."""
    return sum(is_on_policy(seed, step, fraction) for step in range(steps))


def prompt_mask(batch: Mapping[str, Any]) -> jax.Array:
    """1 on each row's prompt: its real tokens before the first `loss_mask` token."""
    loss_BxT = jnp.asarray(batch["loss_mask"], jnp.int32)
    return (jnp.asarray(batch["attention_mask"], jnp.int32)
            * (jnp.cumsum(loss_BxT, axis=-1) == 0)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """`(params, batch, step) -> (batch, sampled_tokens)`: the student's responses to the
    batch's prompts as a batch of the same keys and shapes, and the mean sampled tokens per
    row."""

    student: Functional
    seed: int
    max_new_tokens: int
    eos_id: int
    pad_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    answer_span: str = "none"  # "none" | "response" (see the module docstring)

    def __call__(self, params: Params, batch: Mapping[str, Any], step: jax.Array):
        ids_BxT = batch["input_ids"]
        length = ids_BxT.shape[-1]
        rng = jax.random.fold_in(jax.random.key(self.seed), step)
        sampled = sample_responses(
            self.student, params, ids_BxT, prompt_mask(batch), max_new_tokens=self.max_new_tokens,
            eos_id=self.eos_id, pad_id=self.pad_id, rng=rng, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p)
        # Right-padded [B, T + max_new]: cut to the step's T (a response running past it is cut
        # like a prepared record longer than data.max_len).
        sampled = {k: v[:, :length] for k, v in sampled.items()}
        loss_BxT = sampled["loss_mask"]
        replaced = {"input_ids": sampled["input_ids"],
                    "attention_mask": sampled["attention_mask"],
                    **chat_masks(loss_BxT, loss_BxT if self.answer_span == "response"
                                 else jnp.zeros_like(loss_BxT))}
        # The batch's own keys and dtypes: the step was compiled for them.
        out = {k: replaced[k].astype(v.dtype) if k in replaced else v for k, v in batch.items()}
        return out, jnp.mean(jnp.sum(loss_BxT, axis=-1).astype(jnp.float32))

    def compile(self, mesh, rules: parallel.Rules, params: Params, batch: Mapping[str, Any]):
        """The program compiled for `batch`'s shapes, reading the student's params in their
        declared shardings and the batch over the batch axes (as the step does)."""
        batch_sh = batch_shardings(batch, mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())

        def run(params, batch, step):
            with parallel.activation_rules(mesh, rules):
                return self(params, batch, step)

        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        return jax.jit(
            run, in_shardings=(self.student.shardings(mesh, rules), batch_sh, replicated),
            out_shardings=(batch_sh, replicated),
        ).lower(params, batch, step).compile()
