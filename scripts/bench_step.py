"""Step-time benchmark of multi-teacher distillation: JAX fused/unfused against PyTorch eager/compiled.

The workload (DESIGN.md, "Reference shapes for performance"): a relevance teacher (decoder,
token_score head on the ("No", "Yes") ids), an engagement teacher (decoder, actions head) and
one student with both heads; loss = forward_kl on the relevance logits + soft_bce on the
actions, AdamW with global-norm clipping. Every variant sees the same shapes and the same
seeded random batch (right-padded, lengths in [S/2, S]).

    fused          jaxdistill's compile_step(fused=True): teachers + student + update, one program
    unfused        compile_step(fused=False): teachers in their own jit
    fused+int8     fused, the teachers' projections in int8 (jaxdistill.quantize, qwix PTQ); the
                   teachers' output error against the unquantized teachers is measured and shown
    fused+fp8      the same in fp8 e4m3 (skipped on CPU, where XLA emulates fp8 dots in f32)
    fused+remat-dots, fused+remat-full
                   fused, the student's layers rematerialised (`remat: dots` saves the matmul
                   outputs, `full` only each layer's input): the preset's remat policy is the
                   fastest variant that fits, read from one run of these against plain fused
    torch-eager    the same workload with transformers' PyTorch Qwen3Model
    torch-compile  the same under torch.compile (teachers' forward and student forward+loss)

Each variant runs in its own subprocess, so peak memory is per variant and a JAX process's
GPU memory pool never starves a torch one (use --in-process to debug).

    python scripts/bench_step.py --preset cpu-tiny
    python scripts/bench_step.py --preset linkedin --json bench.json   # on a GPU
    python scripts/bench_step.py --preset linkedin --dry-run           # abstract, anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

VARIANTS = ("fused", "unfused", "fused+int8", "fused+fp8", "fused+remat-dots", "fused+remat-full",
            "torch-eager", "torch-compile")
QUANTIZED = {"fused+int8": "int8", "fused+fp8": "fp8"}
REMAT = {"fused+remat-dots": "dots", "fused+remat-full": "full"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The linkedin preset's shapes are the experiment config `jaxdistill plan` reads too.
LINKEDIN_CONFIG = os.path.join(REPO, "configs", "bench", "linkedin.yaml")
ACTIONS = ("click", "apply", "dismiss")

# Dense bf16 peak FLOP/s by device kind (lower-case substring; first match wins).
PEAK_BF16_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("h800", 989e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 197e12),  # v5e reports "TPU v5 lite"
    ("tpu v4", 275e12),
)

PRESETS = {
    # shapes; numerics (dtype, attention kernel) follow the backend, see `numerics`.
    # child_timeout: a cold inductor cache costs torch.compile minutes of C++ builds on 2 CPU
    # cores; the run then reports it skipped and a later run reuses the cache.
    "cpu-tiny": dict(batch=8, seq=64, steps=10, warmup=2, token_ids=(10, 11), child_timeout=150),
    # ("No", "Yes") are 2753 and 9454 in the Qwen2/3 tokenizer; weights are random anyway.
    "linkedin": dict(batch=16, seq=512, steps=25, warmup=3, token_ids=(2753, 9454),
                     child_timeout=600),
}


def backbones(preset: str):
    """(teacher, student) DecoderConfigs of a preset, before numerics."""
    from jaxdistill.models import decoder

    if preset == "linkedin":
        from jaxdistill.config import load_config
        from jaxdistill.models import hf

        cfg = load_config(LINKEDIN_CONFIG)
        source = cfg.teachers["relevance_teacher"].source.path
        return hf.config_from_hf(os.path.join(REPO, source)), cfg.model.backbone
    teacher = decoder.DecoderConfig(vocab_size=1024, hidden=128, layers=4, heads=4, kv_heads=2,
                                    head_dim=32, mlp=384)
    student = decoder.DecoderConfig(vocab_size=1024, hidden=64, layers=2, heads=4, kv_heads=2,
                                    head_dim=16, mlp=192)
    return teacher, student


def numerics(args, accelerator: bool) -> dict:
    """Compute dtype (bf16 on an accelerator, fp32 on CPU where bf16 matmuls are emulated)."""
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if accelerator else "float32")
    return {"dtype": dtype, "attention_impl": "cudnn" if args.cudnn else None}


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded random token ids; pad id 0; every variant builds the identical arrays."""
    rng = np.random.default_rng(seed)
    lengths_B = rng.integers(seq // 2, seq + 1, size=batch)
    mask_BxS = (np.arange(seq)[None, :] < lengths_B[:, None]).astype(np.int32)
    ids_BxS = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32) * mask_BxS
    return {"input_ids": ids_BxS, "attention_mask": mask_BxS}


# ------------------------------------------------------------------------------ JAX side


def jax_models(teacher_cfg, student_cfg, token_ids, *, dtype="float32", attention_impl=None,
               student_remat="none"):
    """Functionals of the two teachers and the student, and the two distillation terms."""
    from jaxdistill.distill.objectives import Term
    from jaxdistill.models.heads import ActionHead, TokenScoreHead
    from jaxdistill.models.model import ModelConfig, functional

    relevance = TokenScoreHead(token_ids=tuple(token_ids))
    actions = ActionHead(names=ACTIONS)
    # Frozen teachers: params in the compute dtype (bf16 on GPU), no remat (forward only).
    teacher_backbone = teacher_cfg.model_copy(update=dict(
        dtype=dtype, param_dtype=dtype, remat="none", attention_impl=attention_impl))
    student_backbone = student_cfg.model_copy(update=dict(
        dtype=dtype, param_dtype="float32", remat=student_remat, attention_impl=attention_impl))
    teachers = {
        "relevance_teacher": functional(
            ModelConfig(backbone=teacher_backbone, heads={"relevance": relevance})),
        "engagement_teacher": functional(
            ModelConfig(backbone=teacher_backbone, heads={"actions": actions})),
    }
    student = functional(
        ModelConfig(backbone=student_backbone, heads={"relevance": relevance, "actions": actions}))
    terms = (
        Term(name="relevance", loss="forward_kl", student="relevance",
             teacher="relevance_teacher"),
        Term(name="engagement", loss="soft_bce", student="actions",
             teacher="engagement_teacher"),
    )
    return teachers, student, terms


def run_jax(variant: str, args, setup: dict) -> dict:
    import jax

    from jaxdistill import parallel
    from jaxdistill.distill import step as step_lib

    accelerator = jax.default_backend() != "cpu"
    nums = numerics(args, accelerator)
    teacher_cfg, student_cfg = backbones(args.preset)
    teachers, student, terms = jax_models(
        teacher_cfg, student_cfg, setup["token_ids"], dtype=nums["dtype"],
        attention_impl=nums["attention_impl"],
        student_remat=REMAT.get(variant, args.student_remat))
    optimizer, schedule = step_lib.make_optimizer(step_lib.OptimizerConfig())
    mesh = parallel.make_mesh((-1, 1, 1))
    rules = parallel.DEFAULT_RULES
    if args.batch % mesh.size:
        raise ValueError(f"--batch {args.batch} is not divisible by the {mesh.size} devices")
    mode = QUANTIZED.get(variant)
    if mode == "fp8" and not accelerator:
        return {"skipped": "fp8 dots are emulated in f32 on CPU: no speed figure to measure"}

    start = time.perf_counter()
    teacher_params = {name: model.init(seed, mesh, rules)
                      for seed, (name, model) in enumerate(teachers.items(), start=1)}
    host_batch = make_batch(args.batch, setup["seq"], student_cfg.vocab_size)
    reference_teachers = teachers
    if mode is not None:
        from jaxdistill import quantize

        quantized = {name: quantize.quantize_teacher(model, teacher_params[name], mode, host_batch)
                     for name, model in teachers.items()}
        # The unquantized weights wait on the host for the error measurement, so the timed
        # step's device holds the quantized ones only (the peak still sees both at load).
        reference_params = jax.device_get(teacher_params)
        jax.tree.map(lambda x: x.delete(), teacher_params)
        teachers = {name: qmodel for name, (qmodel, _) in quantized.items()}
        teacher_params = {name: jax.device_put(qparams, qmodel.shardings(mesh, rules))
                          for name, (qmodel, qparams) in quantized.items()}
    distiller = step_lib.Distiller(student=student, teachers=teachers, terms=terms,
                                   optimizer=optimizer, schedule=schedule)
    state = step_lib.init_sharded_state(distiller, 0, mesh, rules)
    batch = jax.device_put(host_batch, step_lib.batch_shardings(host_batch, mesh, rules))
    jax.block_until_ready((teacher_params, state, batch))
    init_s = time.perf_counter() - start

    step = step_lib.compile_step(distiller, mesh, rules, state, teacher_params, batch,
                                 fused=variant != "unfused")

    def run_one(state):
        state, metrics = step(state, teacher_params, batch)
        return jax.block_until_ready((state, metrics))

    def first_losses(metrics):
        return {k.removeprefix("loss/"): float(v) for k, v in metrics.items()
                if k.startswith("loss/")}

    device = jax.local_devices()[0]
    result = timed_loop(
        run_one, state, first_losses, args, init_s,
        device_kind=device.device_kind, devices=mesh.size, dtype=nums["dtype"],
        student_remat=student.cfg.backbone.remat,
        peak_memory=lambda: (device.memory_stats() or {}).get("peak_bytes_in_use"),
    )
    if mode is not None:  # after timing: the reference forwards would move the peak memory
        from jaxdistill import quantize

        result["teacher_error"] = {
            name: quantize.output_error(
                reference_teachers[name],
                jax.device_put(reference_params[name], reference_teachers[name].shardings(
                    mesh, rules)),
                teachers[name], teacher_params[name], batch)
            for name in teachers}
    return result


def timed_loop(run_one, state, first_losses, args, init_s, *, peak_memory, **info) -> dict:
    """First step (compile + run), warm-up, then per-step wall times; the median is reported."""
    start = time.perf_counter()
    state, metrics = run_one(state)
    first_s = time.perf_counter() - start
    losses = first_losses(metrics)
    start = time.perf_counter()
    for _ in range(args.warmup):
        state, _ = run_one(state)
    warmup_s = time.perf_counter() - start
    step_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, _ = run_one(state)
        step_times.append(time.perf_counter() - start)
    peak = peak_memory()
    return dict(
        info, init_s=init_s, first_step_s=first_s, warmup_s=warmup_s, step_times_s=step_times,
        step_s=statistics.median(step_times), first_losses=losses,
        finite=all(np.isfinite(v) for v in losses.values()),
        peak_bytes=peak if peak is not None else rss_bytes(),
        peak_kind="device" if peak is not None else "rss",
    )


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------- torch side


def hf_config(cfg):
    """transformers' Qwen3Config with a jaxdistill DecoderConfig's shape."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attention_bias,
        tie_word_embeddings=cfg.tie_embeddings, use_cache=False, max_position_embeddings=4096,
    )


def torch_task_model(cfg, token_ids, actions: int):
    """Qwen3Model with jaxdistill's heads: last-real-token pooling, token_score and actions."""
    import torch
    from torch import nn
    from transformers import Qwen3Model

    class TaskModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Qwen3Model._from_config(hf_config(cfg), attn_implementation="sdpa")
            self.token_ids = list(token_ids) if token_ids else None
            self.actions = nn.Linear(cfg.hidden, actions) if actions else None

        def forward(self, input_ids_BxS, attention_mask_BxS):
            hidden_BxSxD = self.backbone(
                input_ids=input_ids_BxS, attention_mask=attention_mask_BxS).last_hidden_state
            last_B = attention_mask_BxS.sum(-1) - 1
            rows_B = torch.arange(hidden_BxSxD.shape[0], device=hidden_BxSxD.device)
            pooled_BxD = hidden_BxSxD[rows_B, last_B]
            outputs = {}
            if self.token_ids is not None:  # two embedding rows, never [B, V] logits
                rows_KxD = self.backbone.embed_tokens.weight[self.token_ids]
                outputs["relevance"] = pooled_BxD @ rows_KxD.to(pooled_BxD.dtype).T
            if self.actions is not None:
                outputs["actions"] = self.actions(pooled_BxD)
            return outputs

    return TaskModel()


def run_torch(variant: str, args, setup: dict) -> dict:
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.cpu_threads)
    dtype_name = numerics(args, cuda)["dtype"]
    compute_dtype = getattr(torch, dtype_name)
    autocast = compute_dtype != torch.float32
    teacher_cfg, student_cfg = backbones(args.preset)
    token_ids = setup["token_ids"]

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        relevance_teacher = torch_task_model(teacher_cfg, token_ids, 0)
        engagement_teacher = torch_task_model(teacher_cfg, None, len(ACTIONS))
        student = torch_task_model(student_cfg, token_ids, len(ACTIONS))
    for teacher in (relevance_teacher, engagement_teacher):
        teacher.to(compute_dtype).eval().requires_grad_(False)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, betas=(0.9, 0.95),
                                  weight_decay=0.01, fused=cuda)
    host_batch = make_batch(args.batch, setup["seq"], student_cfg.vocab_size)
    ids_BxS = torch.from_numpy(host_batch["input_ids"]).long().to(device)
    mask_BxS = torch.from_numpy(host_batch["attention_mask"]).long().to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    init_s = time.perf_counter() - start

    def teachers_forward(ids_BxS, mask_BxS):
        return (relevance_teacher(ids_BxS, mask_BxS)["relevance"],
                engagement_teacher(ids_BxS, mask_BxS)["actions"])

    def student_loss(ids_BxS, mask_BxS, teacher_relevance_Bx2, teacher_actions_BxK):
        with torch.autocast(device.type, dtype=compute_dtype, enabled=autocast):
            outputs = student(ids_BxS, mask_BxS)
        relevance = F.kl_div(F.log_softmax(outputs["relevance"].float(), -1),
                             F.log_softmax(teacher_relevance_Bx2.float(), -1),
                             log_target=True, reduction="batchmean")
        engagement = F.binary_cross_entropy_with_logits(
            outputs["actions"].float(), torch.sigmoid(teacher_actions_BxK.float()))
        return relevance + engagement, relevance, engagement

    if variant == "torch-compile":
        teachers_forward = torch.compile(teachers_forward, mode=args.torch_compile_mode)
        student_loss = torch.compile(student_loss, mode=args.torch_compile_mode)

    def run_one(state):
        with torch.no_grad():
            teacher_relevance, teacher_actions = teachers_forward(ids_BxS, mask_BxS)
        losses = student_loss(ids_BxS, mask_BxS, teacher_relevance, teacher_actions)
        losses[0].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return state, losses

    def first_losses(losses):
        return {name: v.detach().item() for name, v in zip(("total", "relevance", "engagement"), losses)}

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return timed_loop(
        run_one, None, first_losses, args, init_s,
        device_kind=torch.cuda.get_device_name() if cuda else "cpu", devices=1, dtype=dtype_name,
        peak_memory=lambda: torch.cuda.max_memory_allocated() if cuda else None,
    )


# ------------------------------------------------------------------------------- FLOPs


def flop_count(args, setup: dict) -> dict:
    """Model FLOPs per step split by model (jaxdistill.flops, DESIGN.md's convention)."""
    from jaxdistill import flops

    teacher_cfg, student_cfg = backbones(args.preset)
    teachers, student, _ = jax_models(teacher_cfg, student_cfg, setup["token_ids"])
    return flops.step_flops(student, teachers, args.batch, setup["seq"])


def peak_flops(device_kind: str, peak_tflops: float | None = None) -> float | None:
    """--peak-tflops if given, else the dense bf16 peak of a known accelerator (none on CPU)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


# ------------------------------------------------------------------------------ driver


def dry_run(args, setup: dict, flops: dict) -> None:
    """Everything abstract: param counts, FLOPs, and the fused step traced by jax.eval_shape."""
    import jax

    from jaxdistill.distill import step as step_lib

    teacher_cfg, student_cfg = backbones(args.preset)
    teachers, student, terms = jax_models(teacher_cfg, student_cfg, setup["token_ids"],
                                          dtype="bfloat16", student_remat=args.student_remat)
    optimizer, schedule = step_lib.make_optimizer(step_lib.OptimizerConfig())
    distiller = step_lib.Distiller(student=student, teachers=teachers, terms=terms,
                                   optimizer=optimizer, schedule=schedule)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         make_batch(args.batch, setup["seq"], student_cfg.vocab_size))
    state = jax.eval_shape(distiller.init_state, student.shapes)
    teacher_shapes = {name: fn.shapes for name, fn in teachers.items()}
    _, metrics = jax.eval_shape(distiller.step, state, teacher_shapes, batch)
    print(f"fused step traces abstractly: metrics {sorted(metrics)}")
    from jaxdistill import quantize

    for mode in QUANTIZED.values():
        quantized = {name: quantize.quantize_teacher(fn, None, mode, batch)[0]
                     for name, fn in teachers.items()}
        distiller = step_lib.Distiller(student=student, teachers=quantized, terms=terms,
                                       optimizer=optimizer, schedule=schedule)
        jax.eval_shape(distiller.step, state, {n: q.shapes for n, q in quantized.items()}, batch)
        print(f"fused step with {mode} teachers traces abstractly")
    try:
        torch_counts = torch_param_counts(teacher_cfg, student_cfg, setup["token_ids"])
    except ImportError as error:
        torch_counts = None
        print(f"torch param cross-check skipped: {error}")
    for name, c in flops["models"].items():
        line = (f"{name:20s} params {c['params'] / 1e9:7.4f} B   non-embedding "
                f"{c['non_embedding'] / 1e9:7.4f} B   {c['flops'] / 1e12:8.2f} TFLOP/step")
        if torch_counts:
            line += f"   (torch non-embedding {torch_counts[name] / 1e9:.4f} B)"
        print(line)


def torch_param_counts(teacher_cfg, student_cfg, token_ids) -> dict[str, int]:
    """Non-embedding params of the torch models, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        models = {
            "relevance_teacher": torch_task_model(teacher_cfg, token_ids, 0),
            "engagement_teacher": torch_task_model(teacher_cfg, None, len(ACTIONS)),
            "student": torch_task_model(student_cfg, token_ids, len(ACTIONS)),
        }
    return {name: sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)
            for name, m in models.items()}


def run_variant(variant: str, args, setup: dict) -> dict:
    if variant.startswith("torch"):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as error:
            return {"skipped": f"{error}"}
    try:
        return (run_torch if variant.startswith("torch") else run_jax)(variant, args, setup)
    except Exception as error:
        if variant not in ("torch-compile", "fused+fp8"):
            raise
        return {"skipped": f"{variant} failed: {type(error).__name__}: {error}"[:500]}


def run_isolated(variant: str, args, env: dict) -> dict:
    """One variant in a fresh process; its figures come back through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--preset", args.preset,
                   "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--dtype", args.dtype,
                   "--student-remat", args.student_remat, "--cpu-threads", str(args.cpu_threads),
                   "--torch-compile-mode", args.torch_compile_mode or "default",
                   "--variants", variant, "--child-json", out]
        command += [] if args.cudnn is None else ["--cudnn" if args.cudnn else "--no-cudnn"]
        if variant.startswith("torch"):  # jaxdistill's configs import jax: keep it off the GPU
            env = {**env, "JAX_PLATFORMS": "cpu"}
        elif args.cpu_threads == 1:  # a CPU backend's XLA matches torch's single thread
            flags = env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            env = {**env, "XLA_FLAGS": flags.strip()}
        try:
            proc = subprocess.run(command, env=env, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"timed out after {args.child_timeout} s (--child-timeout)"}
        if proc.returncode or not os.path.exists(out):
            return {"skipped": f"subprocess failed with exit code {proc.returncode}"}
        with open(out) as f:
            return json.load(f)


def describe(variant: str, r: dict) -> str:
    if "skipped" in r:
        return f"[{variant}] skipped: {r['skipped']}"
    losses = ", ".join(f"{k} {v:.4f}" for k, v in r["first_losses"].items())
    return (f"[{variant}] init {r['init_s']:.1f} s | first step (trace+compile+run) "
            f"{r['first_step_s']:.1f} s | warm-up {r['warmup_s']:.1f} s | first-step loss: "
            f"{losses} ({'finite' if r['finite'] else 'NOT FINITE'}) | {r['device_kind']} "
            f"x{r['devices']}, {r['dtype']}")


def table(results: dict, flops: dict, args, seq: int) -> str:
    from jaxdistill import flops as flops_lib

    timed = {v: r for v, r in results.items() if "skipped" not in r}
    baseline = next((v for v in ("torch-compile", "torch-eager") if v in timed), None)
    head = (f"{'variant':14s} {'compile s':>9s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} "
            f"{'peak mem':>14s} {'loss@1':>8s} {'vs ' + (baseline or 'torch'):>17s}")
    lines = [head, "-" * len(head)]
    for variant, r in results.items():
        if "skipped" in r:
            lines.append(f"{variant:14s} skipped: {r['skipped'][:90]}")
            continue
        step_s = r["step_s"]
        peak = peak_flops(r["device_kind"], args.peak_tflops)
        mfu = f"{flops_lib.mfu(flops['total'], step_s, peak):6.1%}" if peak else "   n/a"
        memory = f"{r['peak_bytes'] / 2**30:.2f} GiB" + (" rss" if r["peak_kind"] == "rss" else "")
        ratio = f"{timed[baseline]['step_s'] / step_s:.2f}x" if baseline else "n/a"
        lines.append(
            f"{variant:14s} {r['first_step_s']:9.1f} {step_s * 1e3:9.1f} "
            f"{args.batch * seq / step_s:10.0f} {mfu} {memory:>14s} "
            f"{r['first_losses']['total']:8.4f} {ratio:>17s}")
    if "fused" in timed and "unfused" in timed:
        lines.append(f"fused vs unfused: {timed['unfused']['step_s'] / timed['fused']['step_s']:.2f}x"
                     " (unfused ms / fused ms)")
    for variant, r in timed.items():
        peak = peak_flops(r["device_kind"], args.peak_tflops)
        if peak:
            shares = ", ".join(f"{name} {flops_lib.mfu(m['flops'], r['step_s'], peak):.1%}"
                               for name, m in flops["models"].items())
            lines.append(f"MFU by model, {variant}: {shares} (each model's FLOPs over the whole "
                         f"step's time at {peak / 1e12:.0f} TFLOP/s; they sum to the MFU column)")
    for variant, r in timed.items():
        for teacher, heads in r.get("teacher_error", {}).items():
            lines.append(f"{variant} {teacher} output error vs unquantized: "
                         + "; ".join(f"{head} " + ", ".join(f"{k} {v:.2e}" for k, v in e.items())
                                     for head, e in heads.items()))
    lines.append(f"ratios are speed-ups (baseline ms / variant ms); ms/step is the median of "
                 f"{args.steps} steps after {args.warmup} warm-up steps; 'compile s' is the first "
                 f"step's wall time (trace + compile + run); MFU counts against the bf16 peak "
                 f"(--peak-tflops), int8/fp8 teachers included")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--steps", type=int, help="timed steps (preset default)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first (preset default)")
    parser.add_argument("--batch", type=int, help="global batch size (preset default)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--dry-run", action="store_true",
                        help="abstract only: param counts, FLOP formula, the step traced by eval_shape")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--cudnn", action=argparse.BooleanOptionalAction, default=None,
                        help="JAX attention through cuDNN (default: on when the backend is GPU)")
    parser.add_argument("--student-remat", choices=("none", "full", "dots"), default="none",
                        help="JAX student remat (none matches the torch workload, which keeps "
                             "activations)")
    parser.add_argument("--torch-compile-mode", default="default",
                        help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="intra-op threads of torch (and XLA's CPU backend, when 1) on CPU: "
                             "one thread keeps a shared machine from wrecking the figures")
    parser.add_argument("--child-timeout", type=int, help="seconds per variant (preset default)")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak dense TFLOP/s of one device for MFU (default: the bf16 peak of "
                             "a known GPU/TPU, e.g. 989 for H100/H200; none on CPU)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every variant in this process (debugging; peak memory is then "
                             "a process-wide high-water mark)")
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("steps", "warmup", "batch", "child_timeout"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {','.join(VARIANTS)}")
    args.variants = variants
    if args.torch_compile_mode == "default":
        args.torch_compile_mode = None
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setup = PRESETS[args.preset]

    if args.child_json:  # one variant, inside its own process
        if args.cudnn is None:
            args.cudnn = _gpu_backend(args.variants[0])
        result = run_variant(args.variants[0], args, setup)
        print(describe(args.variants[0], result), flush=True)
        with open(args.child_json, "w") as f:
            json.dump(result, f)
        return

    child_env = dict(os.environ)
    if not args.in_process:
        # This process only counts FLOPs and params: keep its JAX off the accelerator so it
        # holds no device memory the variants need.
        os.environ["JAX_PLATFORMS"] = "cpu"
    print(f"preset {args.preset}: batch {args.batch}, seq {setup['seq']}, "
          f"variants {','.join(args.variants)}")
    if args.dry_run:
        flops = flop_count(args, setup)
        dry_run(args, setup, flops)
        print(flops["formula"])
        print(f"  = {flops['total'] / 1e12:.3f} TFLOP/step for {flops['tokens']} tokens")
        return

    results = {}
    for variant in args.variants:
        if args.in_process:
            if args.cudnn is None:
                args.cudnn = _gpu_backend(variant)
            results[variant] = run_variant(variant, args, setup)
            print(describe(variant, results[variant]), flush=True)
        else:
            results[variant] = run_isolated(variant, args, child_env)
            if "skipped" in results[variant]:
                print(describe(variant, results[variant]), flush=True)

    flops = flop_count(args, setup)
    print()
    print(flops["formula"])
    for name, c in flops["models"].items():
        print(f"  {name}: N = {c['non_embedding']:,} non-embedding ({c['params']:,} total), "
              f"{c['flops'] / 1e12:.4f} TFLOP/step")
    print(f"  = {flops['total'] / 1e12:.4f} TFLOP/step, {flops['tokens']} tokens")
    print()
    print(table(results, flops, args, setup["seq"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "seq": setup["seq"],
                       "steps": args.steps, "warmup": args.warmup, "flops": flops,
                       "results": results}, f, indent=1)


def _gpu_backend(variant: str) -> bool:
    """Whether this process's JAX backend is a GPU (torch variants never start JAX's backend)."""
    if variant.startswith("torch"):
        return False
    import jax

    return jax.default_backend() == "gpu"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
