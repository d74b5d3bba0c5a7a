"""The training loop: load teachers and student, run the fused step, evaluate, checkpoint, resume.

`run(cfg, run_dir)` is the whole of `jaxdistill train` / `distill`: a run with no teachers is
plain training on labels. The loop never waits on the devices except at its cadences: metrics
are fetched every `trainer.log_every` steps, eval runs every `trainer.eval_every`, checkpoints
every `checkpoint.every` and at the end. Inside the step call host<->device transfers are
errors (`jax.transfer_guard("disallow")`), so a stray numpy value in the batch or a Python
scalar in the step fails loudly instead of silently syncing.

Resume continues exactly: student state and the grain iterator's position come from the
latest complete checkpoint, and the run refuses to continue with teachers that differ from
the checkpoint's manifest (names, sources, content hashes) unless `force_teachers`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxdistill import config as config_lib
from jaxdistill import parallel
from jaxdistill.checkpoint import CHECKPOINT_SUBDIR, CONFIG_FILE, Checkpointer, load_params
from jaxdistill.data.pipeline import iterator_state, make_dataset, restore_iterator
from jaxdistill.data.sources import dataset_info, open_source
from jaxdistill.data.tokenizer import load_tokenizer
from jaxdistill.distill.losses import LOSSES
from jaxdistill.distill.objectives import Term, apply_transform, compute_objective, teacher_output
from jaxdistill.distill.step import Distiller, compile_step, init_sharded_state, make_optimizer
from jaxdistill.metrics import MetricWriter, progress_bar
from jaxdistill.models.model import Functional, ModelConfig, Params, functional

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
TOKEN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "segment_ids",
                          "positions"})
# Batch keys a model reads; everything else in a batch is a label or mask for the objective.
MODEL_INPUTS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "segment_ids", "positions",
     "member_features", "position"})


class TeacherMismatchError(RuntimeError):
    """Resuming with teachers other than the checkpoint's; the message lists the differences."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]  # the last logged train metrics
    eval_metrics: dict[str, float]  # the last eval
    checkpoint_dir: Path
    preempted: bool = False  # stopped early by SIGTERM / a preemption notice, state saved


# ------------------------------------------------------------------------------ models


def model_config(section: config_lib.ModelSection) -> ModelConfig:
    """The ModelConfig part of a config's `model:` section (without init / warm_start)."""
    return ModelConfig(backbone=section.backbone, heads=section.heads)


def load_model(source: str, *, heads: Mapping[str, Any] | None = None, dtype: str | None = None,
               param_dtype: str | None = None, mesh=None, rules=None
               ) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) from "run:DIR" (a finished run of ours) or "hf:DIR" (HF import).

    `heads`: for hf, the heads to build (None: those the directory records); for a run, a
    subset of the run's heads to keep. `dtype` / `param_dtype` set the model's numerics.
    """
    kind, _, path = source.partition(":")
    if kind not in ("run", "hf") or not path:
        raise ValueError(f"model source {source!r}: expected 'run:DIR' or 'hf:DIR'")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model source {source!r}: directory {path} not found")
    numerics = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
    if kind == "hf":
        from jaxdistill.models import hf

        return hf.load_hf(path, heads=heads, mesh=mesh, rules=rules, **numerics)
    cfg, params = load_params(path)
    if heads is not None:
        heads = {name: ModelConfig.model_validate(
            {"backbone": cfg.backbone.model_dump(), "heads": {name: head}}).heads[name]
            for name, head in heads.items()}
        wrong = sorted(n for n, h in heads.items() if cfg.heads.get(n) != h)
        if wrong:
            raise ValueError(f"model source {source!r}: heads {wrong} are not heads of that run "
                             f"(it has {sorted(cfg.heads)}: {cfg.heads})")
        cfg = cfg.model_copy(update={"heads": heads})
        kept = functional(cfg).shapes.get("heads", {})
        params = {**params, "heads": {n: v for n, v in params.get("heads", {}).items()
                                      if n in kept}}
        if not params["heads"]:
            params.pop("heads")
    if numerics:
        cfg = cfg.with_numerics(**numerics)
    return cfg, _cast(params, functional(cfg).shapes)


def _cast(params: Params, shapes: Params) -> Params:
    return jax.tree.map(lambda x, s: x if x.dtype == s.dtype else x.astype(s.dtype),
                        params, shapes)


def content_hash(params: Params) -> str:
    """sha256 over every weight's path, dtype, shape and bytes (host copy, once per load)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                             key=lambda item: jax.tree_util.keystr(item[0])):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _offline_hash(source: str) -> str | None:
    """Offline teachers are identified by the content hashes of their cached dataset."""
    try:
        info = dataset_info(source.partition(":")[2])
    except (FileNotFoundError, OSError, ValueError):
        return None
    return hashlib.sha256(json.dumps(info["content_sha256"], sort_keys=True).encode()).hexdigest()


def load_teachers(cfg: config_lib.Experiment, *, mesh=None, rules=None):
    """(online {name: (Functional, params)}, offline [names], manifest {name: {source, hash}}).

    Online teachers run in their `dtype` (params and compute, no remat: no backward pass ever
    runs through them), each weight in its sharding on `mesh`. They never meet the optimizer.
    Offline teachers' outputs come in the batch as `batch["offline"][name]`.
    """
    mesh = parallel.make_mesh(cfg.mesh.shape) if mesh is None else mesh
    rules = dict(cfg.mesh.rules) if rules is None else rules
    online, offline, manifest = {}, [], {}
    for name, teacher in cfg.teachers.items():
        if teacher.source.startswith("offline:"):
            offline.append(name)
            manifest[name] = {"source": teacher.source, "content_hash": _offline_hash(teacher.source)}
            continue
        loaded_cfg, params = load_model(teacher.source, heads=teacher.heads, dtype=teacher.dtype,
                                        param_dtype=teacher.dtype, mesh=mesh, rules=rules)
        manifest[name] = {"source": teacher.source, "content_hash": content_hash(params)}
        model = functional(loaded_cfg.with_numerics(
            dtype=teacher.dtype, param_dtype=teacher.dtype, remat="none"))
        shardings = model.shardings(mesh, rules)
        params = jax.device_put(params, shardings)
        params = jax.jit(lambda p, shapes=model.shapes: _cast(p, shapes),
                         in_shardings=(shardings,), out_shardings=shardings)(params)
        online[name] = (model, params)
        log.info("teacher %s: %s (%s, sha256 %s...)", name, teacher.source, teacher.dtype,
                 manifest[name]["content_hash"][:12])
    return online, offline, manifest


def manifest_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two teacher manifests (empty when equal)."""
    lines = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            lines.append(f"teacher {name!r} ({saved[name]['source']}) is in the checkpoint but "
                         "not in the config")
        elif name not in saved:
            lines.append(f"teacher {name!r} ({current[name]['source']}) is in the config but "
                         "not in the checkpoint")
        else:
            for key in ("source", "content_hash"):
                if saved[name].get(key) != current[name].get(key):
                    lines.append(f"teacher {name!r}: {key} was {saved[name].get(key)!r}, "
                                 f"now {current[name].get(key)!r}")
    return lines


# -------------------------------------------------------------------------- warm start


def warm_start(target_shapes: Params, source_params: Params, *,
               fallback: Params | None = None) -> Params:
    """Student params taking every source weight whose shape allows.

    Per weight (matched by path): identical shapes are copied; a stacked `layers` axis (the
    leading dim of weights under a `layers` key) with fewer target layers takes evenly spaced
    source layers (first and last included); a narrower dim takes the source's leading slice.
    A weight that is missing from the source or wider than it keeps `fallback`'s value (fresh
    init); without a fallback that is an error. Values are cast to the target dtype. What was
    copied, adapted and skipped is logged.
    """
    source_flat = {jax.tree_util.keystr(p): x
                   for p, x in jax.tree_util.tree_leaves_with_path(source_params)}
    fallback_flat = ({} if fallback is None else
                     {jax.tree_util.keystr(p): x
                      for p, x in jax.tree_util.tree_leaves_with_path(fallback)})
    report = {"copied": [], "adapted": [], "skipped": []}

    def one(path, target):
        key = jax.tree_util.keystr(path)
        source = source_flat.get(key)
        why = None
        if source is None:
            why = "not in source"
        elif source.ndim != len(target.shape):
            why = f"rank {source.ndim} vs {len(target.shape)}"
        elif any(t > s for t, s in zip(target.shape, source.shape)):
            why = f"source {tuple(source.shape)} narrower than {tuple(target.shape)}"
        if why is not None:
            report["skipped"].append(f"{key} ({why})")
            if key not in fallback_flat:
                raise ValueError(f"warm_start: {key} cannot be taken from the source ({why}) "
                                 "and no fallback params were given")
            return fallback_flat[key]
        value = source
        if tuple(source.shape) == tuple(target.shape):
            report["copied"].append(key)
        else:
            stacked = any(getattr(k, "key", None) == "layers" for k in path)
            for axis, (t, s) in enumerate(zip(target.shape, source.shape)):
                if t == s:
                    continue
                if axis == 0 and stacked:
                    index = np.round(np.linspace(0, s - 1, t)).astype(np.int32)
                    value = jnp.take(value, index, axis=0)
                else:
                    value = jax.lax.slice_in_dim(value, 0, t, axis=axis)
            report["adapted"].append(f"{key} {tuple(source.shape)}->{tuple(target.shape)}")
        return jnp.asarray(value).astype(target.dtype)

    params = jax.tree_util.tree_map_with_path(one, target_shapes)
    unused = sorted(set(source_flat) - {jax.tree_util.keystr(p) for p, _ in
                                        jax.tree_util.tree_leaves_with_path(target_shapes)})
    log.info("warm start: copied %d weights, adapted %d, skipped %d, source-only %d",
             len(report["copied"]), len(report["adapted"]), len(report["skipped"]), len(unused))
    for kind in ("adapted", "skipped"):
        for line in report[kind]:
            log.info("warm start %s: %s", kind, line)
    for key in unused:
        log.info("warm start unused source weight: %s", key)
    return params


def initial_params(cfg: config_lib.Experiment, student: Functional, mesh, rules) -> Params | None:
    """The student's starting weights (None: fresh init by `init_sharded_state`)."""
    section = cfg.model
    backbone = section.backbone
    params = None
    if section.init != "scratch":
        source_cfg, params = load_model(section.init, heads=section.heads, dtype=backbone.dtype,
                                        param_dtype=backbone.param_dtype, mesh=mesh, rules=rules)
        numerics = {"dtype", "param_dtype", "remat", "attention_impl"}
        differs = [f"{k}: config {getattr(backbone, k)!r}, {section.init} {v!r}"
                   for k, v in source_cfg.backbone.model_dump().items()
                   if k not in numerics and getattr(backbone, k, None) != v]
        if differs:
            raise ValueError(f"model.backbone does not describe the checkpoint model.init names "
                             f"(set these to the checkpoint's values): {'; '.join(differs)}")
        _check_same_shapes(params, student.shapes, section.init)
        params = _cast(params, student.shapes)
    if section.warm_start is not None:
        _, source = load_model(section.warm_start, mesh=mesh, rules=rules)
        base = params if params is not None else student.init(cfg.seed, mesh, rules)
        params = warm_start(student.shapes, source, fallback=base)
    return params


def _check_same_shapes(params: Params, shapes: Params, source: str) -> None:
    got = {jax.tree_util.keystr(p): tuple(x.shape)
           for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
    if got != want:
        diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))[:6]
        details = ", ".join(f"{k}: source {got.get(k)} vs model {want.get(k)}" for k in diff)
        raise ValueError(f"model.init {source!r} does not match model's config ({details}); "
                         "use model.warm_start to start a different shape from it")


# -------------------------------------------------------------------------------- data


def split_dataset(cfg: config_lib.Experiment, tokenizer, split: str, *, train: bool,
                  drop_remainder: bool = True):
    """Batches of a split; `drop_remainder=False` keeps a short last batch (for `predict`,
    which pads it; the sharded steps need full batches)."""
    data = cfg.data
    source = open_source(data.path, split)
    if source.kind != data.kind:
        raise ValueError(f"data.kind is {data.kind!r} but {source.name} holds {source.kind!r} "
                         "records")
    if data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size {data.batch_size} does not divide over "
                         f"{jax.process_count()} processes")
    return make_dataset(
        source, tokenizer=tokenizer, kind=data.kind, max_len=data.max_len,
        batch_size=data.batch_size // jax.process_count(), seed=cfg.seed,
        shuffle=data.shuffle and train, num_epochs=None if train else 1,
        list_size=data.list_size, action_names=data.action_names,
        member_features_dim=data.member_features_dim, pack=data.pack,
        worker_count=data.worker_count if train else 0, prefetch=data.prefetch,
        skip_malformed=data.skip_malformed, drop_remainder=drop_remainder)


def _to_device(batch: Mapping[str, Any], mesh, rules):
    """Host batch -> global arrays sharded over the batch axes (each process gives its rows)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            parallel.batch_sharding(mesh, rules, np.ndim(x)), np.asarray(x)), dict(batch))


def _split_host_counters(batch: dict[str, Any]) -> int:
    """Removes the pipeline's scalar malformed-record counter (it stays on the host)."""
    return int(batch.pop("batch_malformed", 0))


# -------------------------------------------------------------------------------- eval


def _agreement(term: Term, student_outputs, teacher_outputs, batch):
    """How often the student decides as the teacher (or the label) does, for this term's output.

    Ranking terms (listnet, margin_mse): same top candidate; binary terms (bce, soft_bce) and
    transformed scalar scores: same side of the decision threshold (0 for logits and log-odds,
    0.5 for probabilities and labels); cross_entropy: argmax equals the label; other logits:
    same argmax. None for hidden-state and token-level terms.
    """
    kind = LOSSES[term.loss].agreement
    student = student_outputs.get(term.student)
    if student is None or isinstance(student, tuple) or kind is None:
        return None
    distilled = term.teacher is not None
    target = teacher_output(teacher_outputs, batch, term) if distilled else batch[term.label]
    student = apply_transform(student, term.transform).astype(jnp.float32)
    target = jnp.asarray(apply_transform(target, term.transform) if distilled else target)
    mask = None if term.mask is None else batch[term.mask].astype(jnp.float32)
    if kind == "label":
        agree = jnp.argmax(student, -1) == target.astype(jnp.int32)
    elif kind == "top1":
        target = target.astype(jnp.float32)
        if mask is not None and mask.shape == student.shape:
            student = jnp.where(mask > 0, student, -jnp.inf)
            target = jnp.where(mask > 0, target, -jnp.inf)
            mask = jnp.any(mask > 0, -1).astype(jnp.float32)
        agree = jnp.argmax(student, -1) == jnp.argmax(target, -1)
    elif kind == "threshold" or term.transform is not None:
        probabilities = term.transform == "yes_prob"
        student_threshold = 0.5 if probabilities else 0.0
        target_threshold = student_threshold if distilled and term.loss != "bce" else 0.5
        agree = (student > student_threshold) == (target > target_threshold)
    else:
        agree = jnp.argmax(student, -1) == jnp.argmax(target, -1)
    agree = agree.astype(jnp.float32)
    if mask is not None and mask.shape == agree.shape:
        return jnp.sum(agree * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.mean(agree)


def make_eval_step(distiller: Distiller, mesh, rules):
    """jit of (params, teacher_params, batch, step) -> eval metrics (no update)."""

    def eval_step(params, teacher_params, batch, step):
        with parallel.activation_rules(mesh, rules):
            student_outputs = distiller.student.apply(params, batch)
            teacher_outputs = distiller.run_teachers(teacher_params, batch)
            _, metrics = compute_objective(distiller.terms, student_outputs, teacher_outputs,
                                           batch, step)
            for term in distiller.terms:
                agreement = _agreement(term, student_outputs, teacher_outputs, batch)
                if agreement is not None:
                    metrics[f"agreement/{term.name}"] = agreement
            by_teacher = collections.defaultdict(list)
            for term in distiller.terms:
                if term.teacher is not None:
                    by_teacher[term.teacher].append(metrics[f"loss/{term.name}"])
            for teacher, values in by_teacher.items():
                metrics[f"teacher/{teacher}"] = sum(values)
        return metrics

    return jax.jit(eval_step)


def evaluate(eval_step, params, teacher_params, dataset, step_array, mesh, rules, *,
             max_batches: int) -> dict[str, float]:
    """Mean of each eval metric over up to `max_batches` batches, prefixed `eval/`."""
    collected = []
    for i, batch in enumerate(dataset):
        if i >= max_batches:
            break
        batch = dict(batch)
        _split_host_counters(batch)
        collected.append(eval_step(params, teacher_params, _to_device(batch, mesh, rules),
                                   step_array))
    if not collected:
        return {}
    host = jax.device_get(collected)
    return {f"eval/{key}": float(np.mean([m[key] for m in host])) for key in host[0]}


# ----------------------------------------------------------------------------- predict


def predict(model: Functional, params: Params, dataset_iter: Iterable[Mapping[str, Any]], *,
            max_batches: int | None = None) -> dict[str, np.ndarray]:
    """Head outputs (and `pooled`) over batches, concatenated on the first axis, plus every
    non-input batch field (grades, masks, actions, ...) under `batch/<key>`.

    Jitted once: a short last batch is padded to the first batch's size and trimmed back.
    Token-level (`lm`) head outputs are not collected.
    """
    apply = model.jit_apply
    outputs: dict[str, list] = collections.defaultdict(list)
    size = None
    for i, batch in enumerate(dataset_iter):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v for k, v in batch.items() if k not in ("offline", "batch_malformed")}
        rows = len(batch["input_ids"])
        size = size or rows
        inputs = {k: _pad_rows(np.asarray(v), size) for k, v in batch.items() if k in MODEL_INPUTS}
        for name, value in apply(params, inputs).items():
            if not isinstance(value, tuple):
                outputs[name].append((value, rows))
        for key, value in batch.items():
            if key not in TOKEN_INPUTS:
                outputs[f"batch/{key}"].append((np.asarray(value), rows))
    host = jax.device_get(dict(outputs))
    return {key: np.concatenate([np.asarray(v)[:rows] for v, rows in parts])
            for key, parts in host.items()}


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


# --------------------------------------------------------------------------------- run


def write_run_files(cfg: config_lib.Experiment, run_dir: Path, *, resumed_from: int | None):
    """`config.yaml` (the resolved config) and `run.json` (policy hash, provenance)."""
    policy_hash = None
    if cfg.policy is not None:
        if not Path(cfg.policy).is_file():
            raise FileNotFoundError(f"policy: document {cfg.policy} not found")
        policy_hash = config_lib.file_hash(cfg.policy)
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_lib.resolved_yaml(cfg))
    info = {
        "name": cfg.name,
        "policy": cfg.policy,
        "policy_sha256": policy_hash,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "resumed_from_step": resumed_from,
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _state_shardings(distiller: Distiller, seed: int, mesh, rules):
    """Exactly the shardings a fresh `init_sharded_state` gives the state.

    A resumed run must compile the very program a fresh run compiles (for bitwise-exact
    resume), and the shardings XLA reports for a compiled init are normalised (`P()` for
    `P(None, 'fsdp')` on a size-1 axis), which is equivalent but not the same program. So the
    state is built once, its shardings read, and its buffers freed before the restore.
    """
    state = init_sharded_state(distiller, seed, mesh, rules)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    jax.tree.map(lambda x: x.delete(), state)
    return shardings


def run(cfg: config_lib.Experiment, run_dir: str | Path, *, resume: bool = True,
        force_teachers: bool = False) -> RunResult:
    """Trains `cfg` in `run_dir` until `trainer.steps`, or until SIGTERM / preemption."""
    run_dir = Path(run_dir).absolute()
    mesh = parallel.make_mesh(cfg.mesh.shape)
    rules = dict(cfg.mesh.rules)
    online, offline, manifest = load_teachers(cfg, mesh=mesh, rules=rules)
    student = functional(model_config(cfg.model))
    optimizer, schedule = make_optimizer(cfg.optimizer)
    distiller = Distiller(
        student=student, teachers={name: model for name, (model, _) in online.items()},
        terms=tuple(cfg.objective), optimizer=optimizer, schedule=schedule,
        micro_batches=cfg.trainer.micro_batches,
        teacher_inputs={n: t.inputs for n, t in cfg.teachers.items() if t.inputs and n in online})
    teacher_params = {name: params for name, (_, params) in online.items()}
    if offline:
        log.info("offline teachers (outputs from batch['offline']): %s", offline)

    checkpoint_dir = run_dir / CHECKPOINT_SUBDIR
    checkpointer = Checkpointer.from_config(checkpoint_dir, cfg.checkpoint,
                                            config_yaml=config_lib.resolved_yaml(cfg),
                                            manifest=manifest)
    try:
        return _run(cfg, run_dir, mesh, rules, distiller, teacher_params, checkpointer,
                    resume=resume, force_teachers=force_teachers)
    finally:
        checkpointer.close()


def _run(cfg, run_dir, mesh, rules, distiller, teacher_params, checkpointer, *, resume,
         force_teachers) -> RunResult:
    start = checkpointer.latest_step()
    if start is not None and not resume:
        raise FileExistsError(f"{checkpointer.directory} already holds checkpoints (latest step "
                              f"{start}); resume, or start the run in a fresh directory")
    if start is not None:
        differences = manifest_differences(checkpointer.read_meta(start)["manifest"],
                                           checkpointer.manifest)
        if differences and not force_teachers:
            raise TeacherMismatchError(
                f"{checkpointer.directory}/{start}: the checkpoint was trained with other "
                "teachers; refusing to resume (pass force_teachers / --force-teachers to "
                "continue anyway):\n  " + "\n  ".join(differences))
        for line in differences:
            log.warning("resuming with changed teachers (forced): %s", line)
    write_run_files(cfg, run_dir, resumed_from=start)

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_iter = iter(split_dataset(cfg, tokenizer, cfg.data.train_split, train=True))
    if start is not None:
        state, saved_iterator, _ = checkpointer.restore(
            start, target_state_shardings=_state_shardings(distiller, cfg.seed, mesh, rules))
        restore_iterator(train_iter, saved_iterator)
        log.info("resumed from %s at step %d", checkpointer.directory, start)
    else:
        params = initial_params(cfg, distiller.student, mesh, rules)
        state = init_sharded_state(distiller, cfg.seed, mesh, rules, params)
    step = start or 0

    eval_data = None
    if cfg.data.eval_split is not None:
        try:
            eval_data = split_dataset(cfg, tokenizer, cfg.data.eval_split, train=False)
        except KeyError as err:
            log.warning("no eval: %s", err)
    eval_step = make_eval_step(distiller, mesh, rules) if eval_data is not None else None

    trainer = cfg.trainer
    writer = MetricWriter(run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                          wandb=cfg.logging.wandb, project=cfg.logging.wandb_project)
    bar = progress_bar(trainer.steps, initial=step, enabled=trainer.progress)
    checkpointer.install_sigterm_handler()
    step_fn = None
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    malformed, preempted = 0, False
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < trainer.steps:
            batch = dict(next(train_iter))
            malformed += _split_host_counters(batch)
            device_batch = _to_device(batch, mesh, rules)
            if step_fn is None:
                step_fn = compile_step(distiller, mesh, rules, state, teacher_params, batch)
            with jax.transfer_guard("disallow"):
                state, metrics = step_fn(state, teacher_params, device_batch)
            step += 1
            window_steps += 1
            bar.update(1)

            if step % trainer.log_every == 0 or step == trainer.steps:
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                last_metrics["steps_per_second"] = window_steps / max(now - window_start, 1e-9)
                if cfg.data.skip_malformed:
                    last_metrics["malformed_records"] = malformed
                window_start, window_steps = now, 0
                writer.write(step, last_metrics)
                bar.set_postfix(loss=f"{last_metrics['loss/total']:.4g}", refresh=False)

            evaluated = False
            if eval_step is not None and (step % trainer.eval_every == 0 or step == trainer.steps):
                eval_metrics = evaluate(eval_step, state["params"], teacher_params, eval_data,
                                        state["step"], mesh, rules,
                                        max_batches=trainer.eval_batches)
                evaluated = bool(eval_metrics)
                if evaluated:
                    writer.write(step, eval_metrics)
                else:
                    log.warning("eval split %r gave no full batch", cfg.data.eval_split)

            stop = checkpointer.should_stop(step)
            if stop or step == trainer.steps or checkpointer.should_save(step):
                checkpointer.save(step, state, iterator_state(train_iter),
                                  metrics=eval_metrics if evaluated else None, force=True)
            if stop:
                preempted = True
                log.warning("stopping at step %d (SIGTERM / preemption); checkpoint saved", step)
                break
    finally:
        bar.close()
        writer.close()
        checkpointer.wait()
    return RunResult(run_dir=run_dir, step=step, metrics=last_metrics, eval_metrics=eval_metrics,
                     checkpoint_dir=checkpointer.directory, preempted=preempted)
