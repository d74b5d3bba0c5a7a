"""Memory plan of an experiment's fused step: per-device bytes, from abstract arrays only.

`plan(cfg)` builds the experiment's student, online teachers (their model configs read from
`run:`/`hf:` directories without loading a weight) and an abstract batch of the data
contract's shapes, gives every array the sharding the rules give it, and compiles the fused
step from `jax.ShapeDtypeStruct`s (`jit(...).lower(...).compile()`): nothing is allocated and
nothing runs. It reports per device the bytes of the student's params, the optimizer state,
each teacher and the batch (from the declared shardings), XLA's compiled figures
(`memory_analysis()`: arguments, outputs, donated aliases, temporaries = activations and
scratch) and whether the peak fits a device's memory.

The compiled figures come from the backend the plan runs on: on CPU (a fake device mesh) XLA's
fusion and buffer assignment differ from a GPU's, so temporaries are an estimate there.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdistill import config as config_lib
from jaxdistill import parallel
from jaxdistill.data.pipeline import CHAT_MASKS
from jaxdistill.data.records import NUM_GRADES
from jaxdistill.distill.losses import LOSSES
from jaxdistill.distill.step import (Distiller, abstract_state, batch_shardings, compile_step,
                                     make_optimizer)
from jaxdistill.models.heads import ActionHead
from jaxdistill.models.model import Functional, ModelConfig, functional

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '24e9', '512MiB' -> bytes (GB = 1e9, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"device memory {text!r}: expected a number with an optional unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GiB")
    try:
        return int(float(match.group(1)) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"device memory {text!r}: {match.group(1)!r} is not a number") from None


def format_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one fused step on `mesh` (every figure is for one device)."""

    mesh: dict[str, int]
    student_params: int
    optimizer_state: int
    teachers: dict[str, int]
    batch: int
    compiled: dict[str, int]  # XLA memory_analysis(): argument/output/alias/temp/code bytes
    peak: int  # arguments + outputs - donated aliases + temporaries
    device_memory: int | None
    backend: str

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits}

    def format(self) -> str:
        mesh = " x ".join(f"{axis} {size}" for axis, size in self.mesh.items())
        rows = [("student params", self.student_params),
                ("optimizer state", self.optimizer_state)]
        rows += [(f"teacher {name}", size) for name, size in self.teachers.items()]
        rows += [("batch", self.batch),
                 ("temporaries (activations, XLA scratch)", self.compiled["temp"]),
                 ("step outputs not donated", self.compiled["output"] - self.compiled["alias"]),
                 ("peak (arguments + outputs - donated + temporaries)", self.peak)]
        lines = [f"memory plan per device: {math.prod(self.mesh.values())} devices "
                 f"({mesh}), compiled on {self.backend}"]
        lines += [f"  {name:52s} {format_bytes(size):>12s}" for name, size in rows]
        c = self.compiled
        lines.append(f"  (XLA: arguments {format_bytes(c['argument'])}, outputs "
                     f"{format_bytes(c['output'])}, donated aliases {format_bytes(c['alias'])}, "
                     f"temporaries {format_bytes(c['temp'])}, code {format_bytes(c['code'])})")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {format_bytes(self.device_memory)} per device "
                         f"({self.peak / self.device_memory:.0%} used)")
        if self.backend == "cpu":
            lines.append("  (temporaries from CPU buffer assignment: an estimate of a GPU's)")
        return "\n".join(lines)


def teacher_model(name: str, section: config_lib.TeacherSection, example_batch) -> Functional:
    """An online teacher's Functional from its source's recorded config: no weight is read."""
    kind, path = section.source.kind, section.source.path
    if not Path(path).is_dir():
        raise FileNotFoundError(f"teachers.{name}.source '{section.source}': directory {path} "
                                "not found")
    if kind == "hf":
        from jaxdistill.models import hf

        if section.heads is None:
            raise ValueError(f"teachers.{name}: an hf: source needs `heads`")
        model_cfg = ModelConfig.model_validate(
            {"backbone": hf.config_from_hf(path).model_dump(), "heads": section.heads})
    else:
        from jaxdistill.checkpoint import run_model_config

        model_cfg = run_model_config(path)
        if section.heads is not None:
            missing = sorted(set(section.heads) - set(model_cfg.heads))
            if missing:
                raise ValueError(f"teachers.{name}: heads {missing} are not heads of "
                                 f"{section.source} (it has {sorted(model_cfg.heads)})")
            model_cfg = model_cfg.model_copy(
                update={"heads": {n: model_cfg.heads[n] for n in section.heads}})
    model = functional(model_cfg.with_numerics(
        dtype=section.dtype, param_dtype=section.dtype, remat="none"))
    if section.quantize is None:
        return model
    from jaxdistill import quantize

    return quantize.quantize_teacher(model, None, section.quantize, example_batch)[0]


def abstract_batch(cfg: config_lib.Experiment, offline: Mapping[str, Mapping[str, Any]] = {}
                   ) -> dict[str, Any]:
    """ShapeDtypeStructs of one global batch, per the data pipeline's batch contract.

    The member-feature width is `data.member_features_dim`; unset, the pipeline reads it off
    the data, so the plan takes the widest `features` of the student's action heads.
    """
    data = cfg.data
    b, t = data.batch_size, data.max_len
    features = data.member_features_dim
    if features is None:
        features = max((h.features for h in cfg.model.heads.values()
                        if isinstance(h, ActionHead)), default=0)
    i32, f32 = np.int32, np.float32
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))  # noqa
    if data.kind == "chat":
        batch = {k: spec((b, t), i32) for k in ("input_ids", "attention_mask", *CHAT_MASKS)}
        if data.pack:
            batch |= {"segment_ids": spec((b, t), i32), "positions": spec((b, t), i32)}
    else:
        lead = (b, data.list_size) if data.kind == "listwise" else (b,)
        k = len(data.action_names)
        batch = {key: spec(lead + (t,), i32)
                 for key in ("input_ids", "attention_mask", "token_type_ids")}
        batch |= {"grade": spec(lead, i32), "grade_probs": spec(lead + (NUM_GRADES,), f32),
                  "grade_probs_mask": spec(lead, f32), "position": spec(lead, i32),
                  "member_features": spec((b, features), f32),
                  "actions": spec(lead + (k,), f32), "action_mask": spec(lead + (k,), f32)}
        if data.kind == "listwise":
            batch["candidate_mask"] = spec(lead, f32)
    if not (data.kind == "chat" and data.pack):
        batch["record_index"] = spec((b,), i32)
    if offline:
        batch["offline"] = {name: dict(outputs) for name, outputs in offline.items()}
    return batch


def _topk_shapes(cfg: config_lib.Experiment, teacher: str) -> dict[str, Any]:
    """The batch arrays of a teacher's top-k cache, k and dtype from its manifest."""
    from jaxdistill.cache import read_manifest

    source = cfg.teachers[teacher].source
    cached = read_manifest(source.path).get(teacher, {}) if source.path else {}
    if "top_k" not in cached:
        raise config_lib.ConfigError(
            f"teachers.{teacher}.source ({source}): a sparse_token_kl term reads a top-k cache, "
            f"and {source.path} holds none of {teacher!r} (write it with cache-teacher --top-k)")
    b, t, k = cfg.data.batch_size, cfg.data.max_len, cached["top_k"]
    return {"topk_ids": jax.ShapeDtypeStruct((b, t, k), np.dtype(np.int32)),
            "topk_logprobs": jax.ShapeDtypeStruct((b, t, k), np.dtype(cached["logprob_dtype"])),
            "tail_logprob": jax.ShapeDtypeStruct((b, t), np.dtype(np.float32))}


def _per_device(shapes, shardings) -> int:
    def one(shape, sharding):
        return math.prod(sharding.shard_shape(shape.shape)) * np.dtype(shape.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(one, shapes, shardings)))


def plan(cfg: config_lib.Experiment, device_memory: int | None = None, *,
         devices: Sequence[jax.Device] | None = None,
         compiler_options: Mapping[str, Any] | None = None) -> Plan:
    """Per-device memory of `cfg`'s fused step on its mesh; compiled, never run."""
    mesh = parallel.make_mesh(cfg.mesh.shape, devices)
    rules = dict(cfg.mesh.rules)
    student = functional(ModelConfig(backbone=cfg.model.backbone, heads=cfg.model.heads))
    online = {n: s for n, s in cfg.teachers.items() if s.source.kind != "offline"}

    # Offline teachers' cached outputs have the shapes of the student heads their terms read.
    batch = abstract_batch(cfg)
    student_out = jax.eval_shape(student.apply, student.shapes, batch)
    offline = {}
    for term in cfg.objective:
        if term.teacher is not None and term.teacher not in online:
            if LOSSES[term.loss].teacher == "topk":  # a cached top-k: [B, T, k] per token
                shape = _topk_shapes(cfg, term.teacher)
            else:
                shape = jax.ShapeDtypeStruct(student_out[term.student].shape, np.float32)
            offline.setdefault(term.teacher, {})[term.source_output] = shape
    batch = abstract_batch(cfg, offline)

    teachers = {name: teacher_model(name, s, batch) for name, s in online.items()}
    optimizer, schedule = make_optimizer(cfg.optimizer)
    distiller = Distiller(
        student=student, teachers=teachers, terms=tuple(cfg.objective), optimizer=optimizer,
        schedule=schedule, micro_batches=cfg.trainer.micro_batches)

    # Teachers on another tokenizer read inputs of the same shapes: the plan is the same.
    state = abstract_state(distiller, mesh, rules)
    teacher_params = {name: model.shapes for name, model in teachers.items()}
    teacher_shardings = {name: model.shardings(mesh, rules) for name, model in teachers.items()}
    step = compile_step(distiller, mesh, rules, state, teacher_params, batch)
    compiled = step.lower(state, teacher_params, batch).compile(compiler_options)
    memory = compiled.memory_analysis()
    figures = {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
               "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
               "code": memory.generated_code_size_in_bytes}
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return Plan(
        mesh=dict(mesh.shape),
        student_params=_per_device(state["params"], shardings["params"]),
        optimizer_state=_per_device(state["opt_state"], shardings["opt_state"]),
        teachers={name: _per_device(teacher_params[name], teacher_shardings[name])
                  for name in teachers},
        batch=_per_device(batch, batch_shardings(batch, mesh, rules)),
        compiled=figures,
        peak=figures["argument"] + figures["output"] - figures["alias"] + figures["temp"],
        device_memory=device_memory,
        backend=jax.default_backend(),
    )
