"""Top-k teacher cache figures: bytes per token, and the sparse KL's error against the dense KL.

    python scripts/bench_topk_cache.py [--vocab 2048] [--steps 200]

A tiny decoder teacher (2 layers, d=64) is *trained* here for `--steps` steps of next-token
cross-entropy on a synthetic language (each token has 4 likely successors, Zipf-weighted, and
5% uniform noise), so its distributions are peaked with a long flat tail, like a trained LM's;
an untrained (random-init) teacher is measured too, the flat worst case. The student is a
random-init decoder of the same shape trained 10 steps (a student early in distillation).
Over the response tokens of held-out batches, for k = 8, 32, 128:

  bytes/token     = 4 (position) + k * (4 (int32 id) + itemsize(log-prob)) + 4 (f32 tail)
                    against 4 * V for the dense f32 row
  tail mass       = mean over tokens of 1 - sum(top-k teacher probabilities)
  dense KL        = mean_t KL(p_t || q_t) over the full vocabulary (chunked_token_kl)
  sparse KL       = mean_t KL over k+1 buckets (the k ids + the tail; sparse_token_kl), from a
                    cache stored as float32 or float16 log-probs
  relative error  = (dense - sparse) / dense (>= 0 up to rounding: bucketing only merges)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxdistill.data import topk_store  # noqa: E402
from jaxdistill.distill import losses  # noqa: E402
from jaxdistill.models.model import ModelConfig, functional  # noqa: E402

B, T, KS = 16, 64, (8, 32, 128)


def decoder(vocab: int):
    return functional(ModelConfig(
        backbone={"type": "decoder", "vocab_size": vocab, "hidden": 64, "layers": 2, "heads": 4,
                  "kv_heads": 2, "head_dim": 16, "mlp": 128, "dtype": "float32",
                  "param_dtype": "float32", "remat": "none"},
        heads={"lm": {"type": "lm"}}))


def language(vocab: int, seed: int = 0):
    """A Markov chain: 4 Zipf-weighted successors per token, 5% uniform noise."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab, (vocab, 4))
    weights = np.array([8.0, 4.0, 2.0, 1.0]) / 15.0

    def batch(rng):
        ids = np.zeros((B, T), np.int32)
        ids[:, 0] = rng.integers(1, vocab, B)
        for t in range(1, T):
            pick = successors[ids[:, t - 1], rng.choice(4, B, p=weights)]
            noise = rng.random(B) < 0.05
            ids[:, t] = np.where(noise, rng.integers(1, vocab, B), pick)
        # A prompt of 16 tokens, then the response: terms read positions predicting it.
        response = (np.arange(T)[None] >= 16).astype(np.int32).repeat(B, 0)
        return {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32),
                "next_loss_mask": np.asarray(losses.next_token_mask(response))}

    return batch


def train(model, params, batches, steps: int, lr: float = 1e-2):
    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p):
            hidden, unembed = model.apply(p, batch)["lm"]
            return losses.token_cross_entropy(hidden, unembed, batch["input_ids"],
                                              batch["next_loss_mask"])
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optimizer.init(params)
    value = None
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, next(batches))
    return params, float(value) if value is not None else float("nan")


def measure(model, teacher_params, student_params, batch, k: int):
    @jax.jit
    def run(t_params, s_params, batch):
        t_hidden, t_unembed = model.apply(t_params, batch)["lm"]
        s_hidden, s_unembed = model.apply(s_params, batch)["lm"]
        mask = batch["next_loss_mask"]
        dense = losses.chunked_token_kl(s_hidden, s_unembed, t_hidden, t_unembed, mask)
        out = {"dense": dense}
        for name, dtype in (("f32", jnp.float32), ("f16", jnp.float16)):
            cache = losses.topk_teacher(t_hidden, t_unembed, k, mask, logprob_dtype=dtype)
            out[name] = losses.sparse_token_kl(s_hidden, s_unembed, cache, mask)
        tail = jnp.exp(cache["tail_logprob"])
        out["tail"] = jnp.sum(tail * mask) / jnp.sum(mask)
        return out

    return {key: float(v) for key, v in run(teacher_params, student_params, batch).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-batches", type=int, default=2)
    args = parser.parse_args()
    print(__doc__.split("\n\n", 2)[2].strip() + "\n")
    model = decoder(args.vocab)
    rng = np.random.default_rng(1)
    make_batch = language(args.vocab)
    batches = iter(lambda: make_batch(rng), None)
    start = time.perf_counter()
    trained, teacher_ce = train(model, model.init(1), batches, args.steps)
    student, _ = train(model, model.init(2), batches, 10)
    print(f"teacher: trained {args.steps} steps in {time.perf_counter() - start:.0f} s, final "
          f"next-token CE {teacher_ce:.3f} nats (the language's entropy rate is about "
          f"{_entropy_rate(args.vocab):.3f}); vocabulary {args.vocab}, {B}x{T} tokens/batch\n")
    held_out = [make_batch(np.random.default_rng(100 + i)) for i in range(args.eval_batches)]
    dense_row = 4 * args.vocab
    print(f"{'teacher':<9} {'k':>4} {'B/tok f16':>9} {'B/tok f32':>9} {'vs dense':>8} "
          f"{'tail mass':>9} {'dense KL':>9} {'sparse f32':>10} {'rel err':>8} "
          f"{'sparse f16':>10} {'rel err':>8}")
    for name, params in (("trained", trained), ("random", model.init(1))):
        for k in KS:
            rows = [measure(model, params, student, batch, k) for batch in held_out]
            m = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
            f16 = topk_store.bytes_per_token(k, "float16")
            f32 = topk_store.bytes_per_token(k, "float32")
            err32, err16 = ((m["dense"] - m[key]) / m["dense"] for key in ("f32", "f16"))
            print(f"{name:<9} {k:>4} {f16:>9} {f32:>9} {f16 / dense_row:>8.3f} {m['tail']:>9.4f} "
                  f"{m['dense']:>9.4f} {m['f32']:>10.4f} {err32:>8.4f} {m['f16']:>10.4f} "
                  f"{err16:>8.4f}")


def _entropy_rate(vocab: int) -> float:
    """Entropy (nats) of one step of the synthetic chain (successors assumed distinct)."""
    weights = np.array([8.0, 4.0, 2.0, 1.0]) / 15.0
    p = 0.95 * weights + 0.05 / (vocab - 1)
    rest = (vocab - 1 - 4) * (0.05 / (vocab - 1))
    return float(-(np.sum(p * np.log(p)) + rest * np.log(0.05 / (vocab - 1))))


if __name__ == "__main__":
    main()
