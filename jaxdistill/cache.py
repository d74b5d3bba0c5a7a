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

import numpy as np

from jaxdistill import parallel
from jaxdistill.config import ConfigError, Experiment
from jaxdistill.data import sources
from jaxdistill.models.heads import LMHead
from jaxdistill.models.model import Functional, ModelConfig, Params, functional

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
        if teacher.source.kind != "offline":
            continue
        where = f"teachers.{name}.source ({teacher.source})"
        cache_dir = teacher.source.path
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


def teacher_outputs(
    cfg: Experiment,
    model: Functional,
    params: Params,
    split: str,
    outputs: Sequence[str],
    *,
    tokenizer: str | None = None,
) -> dict[str, np.ndarray]:
    """{output: float32 [records, ...]} of one model over a split, in record order, through
    the shared evaluator (on its own `tokenizer`'s ids when that is not the data's)."""
    from jaxdistill.data.batches import split_batches
    from jaxdistill.evaluator import Evaluator

    mesh = parallel.make_mesh(cfg.mesh.shape)
    rules = dict(cfg.mesh.rules)
    from jaxdistill.loader import spec_fingerprint

    name = "teacher"
    token_keys, token_specs = {}, {}
    if tokenizer is not None and spec_fingerprint(tokenizer) != spec_fingerprint(cfg.data.tokenizer):
        token_keys[name] = spec_fingerprint(tokenizer)[:16]
        token_specs[token_keys[name]] = tokenizer
    evaluator = Evaluator(None, {name: model}, mesh=mesh, rules=rules, token_keys=token_keys,
                          teacher_outputs={name: outputs})
    batches = split_batches(cfg, split, train=False, token_specs=token_specs, shard=False)
    scores = evaluator.run(None, {name: params}, batches)
    return {o: scores.teachers[name][o].astype(np.float32) for o in outputs}


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
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Writes cfg.data.path's splits + the teacher's `outputs` as a new dataset at `out_dir`.

    `tokenizer`: the teacher's own tokenizer (default: the data's)."""
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
        values = teacher_outputs(cfg, functional(model_cfg), params, split, outputs,
                                 tokenizer=tokenizer)
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
        "source": str(cfg.teachers[teacher].source), "dtype": cfg.teachers[teacher].dtype,
        "outputs": shapes, "per_candidate": data.kind == "listwise",
        "data": os.fspath(data.path), "max_len": data.max_len,
        "tokenizer": tokenizer or data.tokenizer}}
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
    from jaxdistill import loader

    if teacher not in cfg.teachers:
        raise ConfigError(f"no teacher {teacher!r} in the config; teachers are {sorted(cfg.teachers)}")
    spec = cfg.teachers[teacher]
    if spec.source.kind == "offline":
        raise ConfigError(f"teachers.{teacher} is already offline ({spec.source})")
    mesh = parallel.make_mesh(cfg.mesh.shape)
    loaded = loader.load_teachers(cfg, mesh=mesh, rules=dict(cfg.mesh.rules), names={teacher})
    online = loaded.online[teacher]
    return cache_outputs(cfg, teacher, online.model.cfg, online.params, out_dir,
                         outputs=outputs, overwrite=overwrite, tokenizer=online.tokenizer)
