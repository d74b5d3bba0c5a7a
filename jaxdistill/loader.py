"""Models from their sources: one loader for students, teachers, warm starts and scoring.

Longer than ~400 lines because every way a model comes from disk (run and HF sources, teachers
and their tokenizers, the manifest, warm starts) lives here, so there is one loader.

A source is a typed `config.Source` (`run:DIR`, `hf:DIR`, `offline:DIR`), parsed once when the
config loads. `load_model` turns a run or HF source into `(ModelConfig, params)` in the numerics
asked for, every weight read straight into its sharding on the mesh (orbax restores a run's
arrays into their target shardings; the HF reader slices safetensors per shard); a cast to
another dtype happens once, in a jit whose output sharding is the weight's own.

Each model knows its tokenizer: a run records it in its resolved config (`data.tokenizer`), an
HF directory holds its tokenizer files. `load_teachers` keys every online teacher by its
tokenizer's fingerprint, so the data pipeline tokenises the text once per distinct tokenizer
and the step hands each teacher its own ids; a teacher whose configured tokenizer contradicts
its source's is refused, naming both.

The teacher manifest (recorded with every checkpoint, checked on resume) identifies a teacher
by its source and a sha256 over its checkpoint files, read from disk once per load: no weight
is gathered to any host to compute it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxdistill import config as config_lib
from jaxdistill.checkpoint import CHECKPOINT_SUBDIR, CONFIG_FILE, load_params
from jaxdistill.config import Source
from jaxdistill.models.model import Functional, ModelConfig, Params, functional

log = logging.getLogger(__name__)


class TeacherMismatchError(RuntimeError):
    """Resuming with teachers other than the checkpoint's; the message lists the differences."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    """An online teacher ready for the step: its frozen model, its params and its tokenizer."""

    model: Functional
    params: Params
    tokenizer: str | None  # a tokenizer directory or builtin spec; None: unknown (the data's)


@dataclasses.dataclass(frozen=True)
class Teachers:
    online: dict[str, Teacher]
    offline: list[str]
    manifest: dict[str, dict[str, Any]]  # {name: {"source", "content_hash", "tokenizer"}}

    @property
    def models(self) -> dict[str, Functional]:
        return {name: t.model for name, t in self.online.items()}

    @property
    def params(self) -> dict[str, Params]:
        return {name: t.params for name, t in self.online.items()}


def model_config(section: config_lib.ModelSection) -> ModelConfig:
    """The ModelConfig part of a config's `model:` section (without its sources)."""
    return ModelConfig(backbone=section.backbone, heads=section.heads)


# ----------------------------------------------------------------------------- loading


def load_model(source: Source | str, *, heads: Mapping[str, Any] | None = None,
               dtype: str | None = None, param_dtype: str | None = None, mesh=None, rules=None,
               allow_pickle: bool = False, init_missing_heads: bool = False,
               ) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) of a run: or hf: source, each weight in its sharding on `mesh`.

    `heads`: for hf, the heads to build (None: those the directory records; a head it does not
    hold is refused unless `init_missing_heads`); for a run, a subset of the run's heads to
    keep. `dtype` / `param_dtype` set the model's numerics (params are cast to param_dtype).
    """
    source = Source.parse(source)
    if source.kind not in ("run", "hf"):
        raise ValueError(f"model source {source}: expected 'run:DIR' or 'hf:DIR'")
    if not source.path.is_dir():
        raise FileNotFoundError(f"model source {source}: directory {source.path} not found")
    numerics = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
    if source.kind == "hf":
        from jaxdistill.models import hf

        return hf.load_hf(source.path, heads=heads, mesh=mesh, rules=rules,
                          allow_pickle=allow_pickle, init_missing_heads=init_missing_heads,
                          **numerics)
    cfg = _run_heads(source, heads)
    if numerics:
        cfg = cfg.with_numerics(**numerics)
    model = functional(cfg)
    # Restored as saved (fp32 master weights, usually), straight into the final sharding,
    # then cast once in place.
    shardings = None if mesh is None else model.shardings(mesh, rules)
    _, params = load_params(source.path, shardings=_run_subtree(source, cfg, shardings))
    params = _keep_heads(params, model.shapes)
    return cfg, cast_params(params, model, shardings)


def _run_heads(source: Source, heads: Mapping[str, Any] | None) -> ModelConfig:
    from jaxdistill.checkpoint import run_model_config

    cfg = run_model_config(source.path)
    if heads is None:
        return cfg
    chosen = {name: ModelConfig.model_validate(
        {"backbone": cfg.backbone.model_dump(), "heads": {name: head}}).heads[name]
        for name, head in heads.items()}
    wrong = sorted(n for n, h in chosen.items() if cfg.heads.get(n) != h)
    if wrong:
        raise ValueError(f"model source {source}: heads {wrong} are not heads of that run "
                         f"(it has {sorted(cfg.heads)}: {cfg.heads})")
    return cfg.model_copy(update={"heads": chosen})


def _run_subtree(source: Source, cfg: ModelConfig, shardings):
    """Target shardings for the run's whole params tree (heads not kept get the default)."""
    if shardings is None:
        return None
    from jaxdistill.checkpoint import run_model_config

    full = functional(run_model_config(source.path))
    replicated = jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh,
                                            jax.sharding.PartitionSpec())
    kept = shardings.get("heads", {})
    out = {k: v for k, v in shardings.items() if k != "heads"}
    heads = {name: kept.get(name, jax.tree.map(lambda _: replicated, tree))
             for name, tree in full.shapes.get("heads", {}).items()}
    return {**out, **({"heads": heads} if heads else {})}


def _keep_heads(params: Params, shapes: Params) -> Params:
    kept = shapes.get("heads", {})
    heads = {n: v for n, v in params.get("heads", {}).items() if n in kept}
    params = {k: v for k, v in params.items() if k != "heads"}
    return {**params, "heads": heads} if heads else params


def cast_params(params: Params, model: Functional, shardings=None) -> Params:
    """Params in the model's param dtypes; weights already right are left untouched."""
    if all(x.dtype == s.dtype for x, s in zip(jax.tree.leaves(params),
                                              jax.tree.leaves(model.shapes))):
        return params
    cast = lambda p: jax.tree.map(lambda x, s: x.astype(s.dtype), p, model.shapes)  # noqa: E731
    if shardings is None:
        return jax.jit(cast)(params)
    return jax.jit(cast, in_shardings=(shardings,), out_shardings=shardings,
                   donate_argnums=(0,))(params)


def _check_same_shapes(params: Params, shapes: Params, source: Source) -> None:
    got = {jax.tree_util.keystr(p): tuple(x.shape)
           for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
    if got != want:
        diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))[:6]
        details = ", ".join(f"{k}: source {got.get(k)} vs model {want.get(k)}" for k in diff)
        raise ValueError(f"model.init {source} does not match model's config ({details}); "
                         "use model.warm_start to start a different shape from it")


# ---------------------------------------------------------------------------- tokenizers


def source_tokenizer(source: Source) -> str | None:
    """The tokenizer a run: or hf: model was trained with (None when the source says none)."""
    if source.kind == "run":
        path = source.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        tokenizer = (data.get("data") or {}).get("tokenizer")
        if isinstance(tokenizer, str) and not tokenizer.startswith("builtin:"):
            tokenizer_path = Path(tokenizer)
            if not tokenizer_path.is_absolute() and not tokenizer_path.exists():
                tokenizer = str(source.path / tokenizer_path)
        return tokenizer
    if source.kind == "hf":
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
        return str(source.path) if any((source.path / n).is_file() for n in names) else None
    return None


def model_tokenizer(source: Source, configured: str | None, *, where: str) -> str | None:
    """The tokenizer of a model: its source's, checked against a configured one."""
    recorded = source_tokenizer(source)
    if configured is None or recorded is None:
        return recorded or configured
    if spec_fingerprint(configured) != spec_fingerprint(recorded):
        raise ValueError(f"{where}: tokenizer {configured!r} is not the tokenizer {source} was "
                         f"trained with ({recorded!r}); a model fed another tokenizer's ids reads "
                         "garbage. Drop the tokenizer key or name the model's own")
    return recorded


@functools.lru_cache(maxsize=32)
def spec_fingerprint(spec: str) -> str:
    """The fingerprint of a tokenizer directory or builtin spec (`data.tokenizer`'s)."""
    from jaxdistill.data.batches import tokenizer
    from jaxdistill.data.tokenizer import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer(spec))


def tokenizer_keys(student_tokenizer: str, teachers: Teachers) -> dict[str, str]:
    """{teacher: fingerprint} of each online teacher whose tokenizer is not the student's.

    Those teachers read `batch["tokens"][fingerprint]`; the others share the student's ids.
    """
    student = spec_fingerprint(student_tokenizer)
    keys = {}
    for name, teacher in teachers.online.items():
        if teacher.tokenizer is None:
            continue
        fingerprint = spec_fingerprint(teacher.tokenizer)
        if fingerprint != student:
            keys[name] = fingerprint[:16]
    return keys


# ------------------------------------------------------------------------------ teachers


def source_hash(source: Source) -> str | None:
    """sha256 over a source's files as stored (names, sizes, bytes), read once from disk.

    run: the config and the checkpoint step the run would load; hf: config and weights;
    offline: the cached dataset's per-split content hashes.
    """
    if source.kind == "offline":
        from jaxdistill.data.sources import dataset_info

        try:
            info = dataset_info(source.path)
        except (FileNotFoundError, OSError, ValueError):
            return None
        return hashlib.sha256(json.dumps(info["content_sha256"], sort_keys=True).encode()).hexdigest()
    root = source.path
    if source.kind == "run":
        files = [root / CONFIG_FILE, *_latest_step_files(root / CHECKPOINT_SUBDIR)]
    else:
        files = sorted(p for p in root.iterdir() if p.is_file() and (
            p.suffix in (".json", ".safetensors", ".bin", ".pt", ".pth")))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root)}|{path.stat().st_size}|".encode())
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _latest_step_files(directory: Path) -> list[Path]:
    steps = sorted((int(p.name), p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()
                   ) if directory.is_dir() else []
    if not steps:
        return []
    return sorted(p for p in steps[-1][1].rglob("*") if p.is_file())


def load_teachers(cfg: config_lib.Experiment, *, mesh, rules, names=None) -> Teachers:
    """The config's teachers (those in `names`, default all): online ones loaded in their
    `dtype` (params and compute, no remat: no backward pass ever runs through them), each weight
    in its sharding on `mesh`; offline ones only named (their outputs come in the batch)."""
    online, offline, manifest = {}, [], {}
    for name, spec in cfg.teachers.items():
        if names is not None and name not in names:
            continue
        where = f"teachers.{name}"
        tokenizer = None
        if spec.source.kind == "offline":
            offline.append(name)
        else:
            tokenizer = model_tokenizer(spec.source, spec.tokenizer, where=where)
            loaded_cfg, params = load_model(spec.source, heads=spec.heads, dtype=spec.dtype,
                                            param_dtype=spec.dtype, mesh=mesh, rules=rules,
                                            allow_pickle=spec.allow_pickle,
                                            init_missing_heads=spec.init_missing_heads)
            online[name] = Teacher(functional(loaded_cfg.with_numerics(remat="none")), params,
                                   tokenizer)
        manifest[name] = {"source": str(spec.source), "content_hash": source_hash(spec.source),
                          "tokenizer": tokenizer}
        log.info("teacher %s: %s (%s, sha256 %s...)", name, spec.source, spec.dtype,
                 (manifest[name]["content_hash"] or "?")[:12])
    return Teachers(online, offline, manifest)


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
    if section.init.kind != "scratch":
        source_cfg, params = load_model(section.init, heads=section.heads, dtype=backbone.dtype,
                                        param_dtype=backbone.param_dtype, mesh=mesh, rules=rules,
                                        allow_pickle=section.allow_pickle,
                                        init_missing_heads=True)
        differs = [f"{k}: config {getattr(backbone, k)!r}, {section.init} {v!r}"
                   for k, v in source_cfg.backbone.model_dump().items()
                   if k not in config_lib.NUMERIC_KEYS and getattr(backbone, k, None) != v]
        if differs:
            raise ValueError(f"model.backbone does not describe the checkpoint model.init names "
                             f"(set these to the checkpoint's values): {'; '.join(differs)}")
        _check_same_shapes(params, student.shapes, section.init)
        params = cast_params(params, student)
    if section.warm_start is not None:
        _, source = load_model(section.warm_start, mesh=mesh, rules=rules,
                               allow_pickle=section.allow_pickle)
        base = params if params is not None else student.init(cfg.seed, mesh, rules)
        params = warm_start(student.shapes, source, fallback=base)
    return params


def check_student_tokenizer(cfg: config_lib.Experiment) -> None:
    """A student initialised from a checkpoint reads that checkpoint's tokenizer's ids."""
    for key in ("init", "warm_start"):
        source = getattr(cfg.model, key)
        if source is not None and source.kind in ("run", "hf"):
            model_tokenizer(source, cfg.data.tokenizer, where=f"model.{key} / data.tokenizer")
