"""Memory and time of token-level distillation losses: chunked vs dense (full [B, T, V] logits).

Each variant is the value and gradient (w.r.t. the student's hidden states and unembedding) of
a forward token KL between a student and a teacher given as (hidden, unembedding) pairs:

    dense    forward_kl on full logits: student and teacher [B, T, V] in float32
    chunked  losses.chunked_token_kl: lax.scan over T/C chunks, one [B, C, V] block at a time
    sparse   losses.sparse_token_kl from a cached top-k teacher (k ids + log-probs + tail)

Peak memory is XLA's compiled memory_analysis (temporaries + arguments + outputs), so it needs
no allocator statistics and works on CPU; time is the median of `--steps` timed calls.

    python scripts/bench_token_kl.py                    # cpu: B=2, T=512, D=256, V=128k
    python scripts/bench_token_kl.py --preset gpu       # B=16, T=512, D=1024/2048, V=151936, bf16
    python scripts/bench_token_kl.py --seq 2048 --dry-run   # memory only, no timing
    python scripts/bench_token_kl.py --sparse-error     # top-k cache: bytes/token, KL error

--sparse-error measures what a cached top-k teacher loses, for k = 8, 32, 128, on a peaked
distribution: vocabulary 32k, rank-256 logits (hidden @ unembedding, like an LM's) scaled to
about 2.5 nats of teacher entropy; the student is the teacher perturbed (hidden and
unembedding noise), as mid-way through distillation. It reports the dense token KL, the
tail-bucket sparse KL, their relative error and the cosine between their gradients w.r.t.
the student's hidden states.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.distill import losses

PRESETS = {
    "cpu": dict(batch=2, seq=512, student_dim=256, teacher_dim=256, vocab=128_000, chunk=128,
                k=32, dtype="float32", steps=3),
    "gpu": dict(batch=16, seq=512, student_dim=1024, teacher_dim=2048, vocab=151_936, chunk=64,
                k=32, dtype="bfloat16", steps=10),
}
VARIANTS = ("dense", "chunked", "sparse")


def inputs(args):
    """Seeded random operands; with --dry-run, their shapes only (nothing allocated)."""
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)

    def normal(*shape, scale=1.0):
        if args.dry_run:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32), dtype)

    b, t, d, e, v = args.batch, args.seq, args.student_dim, args.teacher_dim, args.vocab
    mask_BxT = (jax.ShapeDtypeStruct((b, t), jnp.float32) if args.dry_run
                else jnp.asarray(rng.random((b, t)) < 0.8, jnp.float32))
    return dict(student_hidden=normal(b, t, d), student_unembed=normal(d, v, scale=d**-0.5),
                teacher_hidden=normal(b, t, e), teacher_unembed=normal(e, v, scale=e**-0.5),
                mask=mask_BxT)


def loss_fn(variant: str, args):
    def dense(sh, su, th, tu, mask, *_):
        student = jnp.einsum("btd,dv->btv", sh, su, preferred_element_type=jnp.float32)
        teacher = jnp.einsum("bte,ev->btv", th, tu, preferred_element_type=jnp.float32)
        return losses.forward_kl(student, jax.lax.stop_gradient(teacher), mask)

    def chunked(sh, su, th, tu, mask, *_):
        return losses.chunked_token_kl(sh, su, th, tu, mask, chunk_size=args.chunk)

    def sparse(sh, su, th, tu, mask, topk):
        return losses.sparse_token_kl(sh, su, topk, mask, chunk_size=args.chunk)

    fn = {"dense": dense, "chunked": chunked, "sparse": sparse}[variant]
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def measure(variant: str, args, arrays, topk) -> dict:
    fn = loss_fn(variant, args)
    operands = (arrays["student_hidden"], arrays["student_unembed"], arrays["teacher_hidden"],
                arrays["teacher_unembed"], arrays["mask"], topk)
    start = time.perf_counter()
    compiled = fn.lower(*operands).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    out = dict(variant=variant, compile_s=compile_s, temp=memory.temp_size_in_bytes,
               peak=memory.temp_size_in_bytes + memory.argument_size_in_bytes
               + memory.output_size_in_bytes)
    if args.dry_run:
        return out
    value, _ = jax.block_until_ready(compiled(*operands))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*operands))
        times.append(time.perf_counter() - start)
    out.update(loss=float(value), ms=1e3 * statistics.median(times))
    return out


def sparse_error(ks=(8, 32, 128), vocab=32_000, tokens=1024, dim=256, logit_scale=5.5,
                 chunk=128, seed=0, noises=(0.5, 0.15)) -> list[dict]:
    rows = []
    for noise in noises:
        rows += _sparse_error(ks, vocab, tokens, dim, logit_scale, chunk, seed, noise)
    return rows


def _sparse_error(ks, vocab, tokens, dim, logit_scale, chunk, seed, noise) -> list[dict]:
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    teacher_hidden = normal(1, tokens, dim)
    teacher_unembed = normal(dim, vocab, scale=logit_scale / dim**0.5)
    student_hidden = teacher_hidden + normal(1, tokens, dim, scale=noise)
    student_unembed = teacher_unembed + normal(dim, vocab, scale=noise * logit_scale / dim**0.5)

    @jax.jit
    def teacher_stats(h, u):
        log_p = jax.nn.log_softmax(h @ u, axis=-1)
        return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, -1)), jnp.mean(jnp.exp(log_p.max(-1)))

    entropy, top1 = teacher_stats(teacher_hidden, teacher_unembed)
    dense_fn = jax.jit(jax.value_and_grad(lambda h: losses.chunked_token_kl(
        h, student_unembed, teacher_hidden, teacher_unembed, chunk_size=chunk)))
    dense, dense_grad = dense_fn(student_hidden)
    print(f"vocab {vocab}, {tokens} tokens, teacher entropy {float(entropy):.2f} nats, mean "
          f"top-1 p {float(top1):.2f}; student noise {noise}: dense KL {float(dense):.4f}")
    print(f"{'k':>4} {'logprobs':>8} {'bytes/token':>11} {'top-k mass':>10} {'sparse KL':>9} "
          f"{'rel. error':>10} {'grad cos':>8}")
    rows = []
    for k in ks:
        for dtype in (jnp.float32, jnp.bfloat16):
            topk = jax.jit(lambda h, u, k=k, dtype=dtype: losses.topk_teacher(
                h, u, k, None, chunk, logprob_dtype=dtype))(teacher_hidden, teacher_unembed)
            sparse, grad = jax.jit(jax.value_and_grad(lambda h, topk: losses.sparse_token_kl(
                h, student_unembed, topk, chunk_size=chunk)))(student_hidden, topk)
            per_token = sum(topk[key].nbytes for key in losses.TOPK_KEYS) / tokens
            mass = float(jnp.mean(1.0 - jnp.exp(topk["tail_logprob"])))
            cos = float(jnp.vdot(grad, dense_grad) / (jnp.linalg.norm(grad)
                                                      * jnp.linalg.norm(dense_grad)))
            row = dict(noise=noise, k=k, dtype=jnp.dtype(dtype).name, bytes_per_token=per_token,
                       topk_mass=mass, sparse_kl=float(sparse), dense_kl=float(dense),
                       rel_error=abs(float(sparse) - float(dense)) / float(dense), grad_cos=cos)
            rows.append(row)
            print(f"{k:4d} {row['dtype']:>8} {per_token:11.0f} {mass:10.3f} {float(sparse):9.4f} "
                  f"{row['rel_error']:10.3f} {cos:8.3f}")
    print(f"bytes/token = k * (4 id + 4 or 2 log-prob) + 4 tail; dense logits would be "
          f"{4 * vocab} (f32) per token")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for key, value in PRESETS["cpu"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dry-run", action="store_true", help="compile and report memory only")
    parser.add_argument("--sparse-error", action="store_true",
                        help="the top-k teacher's bytes per token and KL error instead")
    args = parser.parse_args(argv)
    if args.sparse_error:
        return sparse_error()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    arrays = inputs(args)
    make_topk = jax.jit(lambda h, u, m: losses.topk_teacher(h, u, args.k, m, args.chunk))
    topk = (jax.eval_shape if args.dry_run else lambda f, *a: f(*a))(
        make_topk, arrays["teacher_hidden"], arrays["teacher_unembed"], arrays["mask"])
    b, t, v, c = args.batch, args.seq, args.vocab, args.chunk
    print(f"device {jax.devices()[0].device_kind}; B={b} T={t} D={args.student_dim} "
          f"E={args.teacher_dim} V={v} chunk={c} k={args.k} {args.dtype}")
    print(f"one f32 [B, T, V] logits array = 4*B*T*V = {4 * b * t * v / 2**20:.0f} MiB; "
          f"one [B, C, V] chunk = 4*B*C*V = {4 * b * c * v / 2**20:.0f} MiB "
          f"(T/C = {t / c:.0f})")
    results = [measure(variant, args, arrays, topk) for variant in args.variants.split(",")]
    dense = next((r for r in results if r["variant"] == "dense"), None)
    print(f"{'variant':8} {'temp MiB':>9} {'peak MiB':>9} {'vs dense':>8} {'ms':>9} "
          f"{'compile s':>9} {'loss':>9}")
    for r in results:
        ratio = f"{dense['peak'] / r['peak']:.1f}x" if dense else "-"
        ms = f"{r['ms']:.1f}" if "ms" in r else "-"
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        print(f"{r['variant']:8} {r['temp'] / 2**20:9.1f} {r['peak'] / 2**20:9.1f} {ratio:>8} "
              f"{ms:>9} {r['compile_s']:9.1f} {loss:>9}")
    return results


if __name__ == "__main__":
    main()
