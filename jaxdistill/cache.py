"""Offline teachers: one teacher's outputs precomputed over a dataset and carried by its records.

`cache_teacher` runs a teacher over every split of the config's dataset and writes a new
dataset: the same records, each carrying `offline: {teacher: {output: list}}` (listwise: on each
candidate). The pipeline hands them to the step as `batch["offline"][teacher][output]`, which
the objective reads exactly like an online teacher's output, so a config switches a teacher
to `source: offline:DIR` (with `data.path: DIR`) and changes nothing else.

A manifest `offline_teachers.json` beside the dataset names each cached teacher's source,
outputs and shapes. Caching a second teacher = running `cache_teacher` on the first cache.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.config import ConfigError, Experiment
from jaxdistill.data import sources
from jaxdistill.data.pipeline import make_dataset
from jaxdistill.data.tokenizer import load_tokenizer
from jaxdistill.models.heads import LMHead
from jaxdistill.models.model import ModelConfig, Params, functional

OFFLINE_PREFIX = "offline:"
MANIFEST = "offline_teachers.json"


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """{teacher: {"source", "outputs": {name: shape}}} of a dataset's cached teachers."""
    path = Path(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def check_offline_sources(cfg: Experiment) -> None:
    """Every offline teacher's DIR is the dataset being read and holds the outputs its terms read.

    Outputs travel with the records, so `source: offline:DIR` only makes sense with
    `data.path: DIR`; anything else fails here, at config time, not as a missing batch key.
    """
    for name, teacher in cfg.teachers.items():
        if not teacher.source.startswith(OFFLINE_PREFIX):
            continue
        where = f"teachers.{name}.source ({teacher.source})"
        cache_dir = Path(teacher.source[len(OFFLINE_PREFIX):])
        if not (cache_dir / "dataset_info.json").is_file():
            raise FileNotFoundError(f"{where}: {cache_dir} is not a dataset; write it with "
                                    f"`jaxdistill cache-teacher CONFIG --teacher {name} --out DIR`")
        if cache_dir.resolve() != Path(cfg.data.path).resolve():
            raise ConfigError(f"{where}: cached outputs travel with the records, so data.path "
                              f"must be {cache_dir}, found {cfg.data.path}")
        cached = read_manifest(cache_dir).get(name)
        if cached is None:
            raise ConfigError(f"{where}: {cache_dir} holds no outputs of teacher {name!r} "
                              f"(it holds {sorted(read_manifest(cache_dir))})")
        for term in cfg.objective:
            if term.teacher == name and term.source_output not in cached["outputs"]:
                raise ConfigError(
                    f"objective term {term.name!r} reads {name}.{term.source_output}, but "
                    f"{cache_dir} cached only {sorted(cached['outputs'])} of {name!r}; re-run "
                    f"cache-teacher with --outputs {term.source_output}")


def dataset(cfg: Experiment, split: str, *, training: bool = False, data_dir=None):
    """The config's batch pipeline over one split: training order (shuffled, repeated) or one
    ordered pass with a short last batch (evaluation, caching)."""
    data = cfg.data
    return make_dataset(
        sources.open_source(data_dir or data.path, split), tokenizer=load_tokenizer(data.tokenizer),
        kind=data.kind, max_len=data.max_len, batch_size=data.batch_size, seed=cfg.seed,
        shuffle=training and data.shuffle, num_epochs=None if training else 1,
        list_size=data.list_size, action_names=data.action_names,
        member_features_dim=data.member_features_dim, shard_index=0, shard_count=1,
        prefetch=data.prefetch, drop_remainder=training, skip_malformed=data.skip_malformed)


def eval_batches(cfg: Experiment, split: str) -> Iterator[dict[str, Any]]:
    return iter(dataset(cfg, split))


def teacher_outputs(
    model_cfg: ModelConfig,
    params: Params,
    batches: Iterator[Mapping[str, Any]],
    outputs: Sequence[str],
) -> dict[str, np.ndarray]:
    """{output: float32 [records, ...]} of a model over ordered batches (jitted forward)."""
    model = functional(model_cfg)

    @jax.jit
    def forward(params, batch):
        out = model.apply(params, batch)
        return {name: out[name].astype(jnp.float32) for name in outputs}

    collected: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k not in ("offline", "batch_malformed")}
        for name, value in jax.device_get(forward(params, batch)).items():
            collected[name].append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in collected.items() if values}


def default_outputs(model_cfg: ModelConfig) -> list[str]:
    """Every head but lm heads (their [T, V] outputs are never cached)."""
    return [name for name, head in model_cfg.heads.items() if not isinstance(head, LMHead)]


def cache_outputs(
    cfg: Experiment,
    teacher: str,
    model_cfg: ModelConfig,
    params: Params,
    out_dir: str | os.PathLike,
    *,
    outputs: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes cfg.data.path's splits + the teacher's `outputs` as a new dataset at `out_dir`."""
    data = cfg.data
    if data.kind == "chat":
        raise ConfigError("cache-teacher: chat teachers are token-level ([T, V] outputs); cache "
                          "pointwise, listwise or impressions data instead")
    outputs = list(outputs) if outputs else default_outputs(model_cfg)
    known = [*default_outputs(model_cfg), "pooled"]
    unknown = [o for o in outputs if o not in known]
    if unknown:
        raise ConfigError(f"teacher {teacher!r} has no output(s) {unknown}; it has {known}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    info = sources.dataset_info(data.path)
    splits: dict[str, list[dict[str, Any]]] = {}
    shapes: dict[str, list[int]] = {}
    for split in info["splits"]:
        records = list(sources.open_source(data.path, split))
        values = teacher_outputs(model_cfg, params, eval_batches(cfg, split), outputs)
        count = len(next(iter(values.values()))) if values else 0
        if count != len(records):
            raise ValueError(
                f"{data.path}[{split}]: {len(records)} records but {count} teacher outputs; "
                "malformed records cannot be cached (clean the dataset first)")
        for i, record in enumerate(records):
            _attach(record, teacher, {name: value[i] for name, value in values.items()},
                    data.kind, data.list_size)
        splits[split] = records
        shapes = {name: list(value.shape[2 if data.kind == "listwise" else 1:])
                  for name, value in values.items()}
    sources.write_dataset(splits, info["kind"], out_dir, overwrite=overwrite,
                          source_name=f"cache of {data.path}")
    manifest = {**read_manifest(data.path), teacher: {
        "source": cfg.teachers[teacher].source, "dtype": cfg.teachers[teacher].dtype,
        "outputs": shapes, "per_candidate": data.kind == "listwise",
        "data": os.fspath(data.path), "max_len": data.max_len, "tokenizer": data.tokenizer}}
    tmp = out_dir / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return {"out": os.fspath(out_dir), "teacher": teacher, "outputs": shapes,
            "splits": {name: len(records) for name, records in splits.items()}}


def _attach(record: dict, teacher: str, values: Mapping[str, np.ndarray], kind: str,
            list_size: int | None) -> None:
    if kind != "listwise":
        record.setdefault("offline", {})[teacher] = {k: v.tolist() for k, v in values.items()}
        return
    # Candidates beyond list_size are never batched; they carry nothing and are cut on read.
    for i, candidate in enumerate(record["candidates"][:list_size]):
        candidate.setdefault("offline", {})[teacher] = {k: v[i].tolist() for k, v in values.items()}


def cache_teacher(cfg: Experiment, teacher: str, out_dir: str | os.PathLike, *,
                  outputs: Sequence[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Loads the config's teacher `teacher` (run:/hf:) and caches its outputs (`cache_outputs`)."""
    if teacher not in cfg.teachers:
        raise ConfigError(f"no teacher {teacher!r} in the config; teachers are {sorted(cfg.teachers)}")
    spec = cfg.teachers[teacher]
    if spec.source.startswith(OFFLINE_PREFIX):
        raise ConfigError(f"teachers.{teacher} is already offline ({spec.source})")
    if spec.inputs is not None:
        raise ConfigError(f"teachers.{teacher}: caching a teacher with its own inputs "
                          f"({spec.inputs}) is not supported")
    from jaxdistill import train

    model_cfg, params = train.load_model(spec.source, heads=spec.heads, dtype=spec.dtype)
    return cache_outputs(cfg, teacher, model_cfg, params, out_dir, outputs=outputs,
                         overwrite=overwrite)
