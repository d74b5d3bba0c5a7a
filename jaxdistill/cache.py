"""Offline teachers: one teacher's outputs precomputed over a dataset and carried by its records.

`cache_teacher` runs a teacher over every split of the config's dataset and writes a new
dataset: the same records, each carrying `offline: {teacher: {output: list}}` (listwise: on each
candidate). The pipeline hands them to the step as `batch["offline"][teacher][output]`, which
the objective reads exactly like an online teacher's output, so a config switches a teacher
to `source: offline:DIR` (with `data.path: DIR`) and changes nothing else.

A token-level (`lm`) teacher on chat data is cached as its top-k distributions instead
(`--top-k K`): per record, at each position predicting a response token, the teacher's k most
likely ids, their log-probs and the tail's mass, stored beside the records in compact bytes
(`data.topk_store`, not JSON) and read into the batch as `batch["offline"][teacher][head]`, the
dict `losses.topk_teacher` returns, which a `sparse_token_kl` term reads.

A manifest `offline_teachers.json` beside the dataset names each cached teacher's source,
outputs and shapes (top-k: k, temperature, log-prob dtype, bytes per token). Caching a second
teacher = running `cache_teacher` on the first cache.

With several JAX processes each caches a contiguous block of every split on its own devices
and writes its own shard files; process 0 joins them (`sources.join_datasets`) and writes the
manifest once every shard exists. The joined dataset reads back as a one-process cache does.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdistill import parallel
from jaxdistill.config import ConfigError, Experiment
from jaxdistill.data import sources, topk_store
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
            if term.teacher == name and "top_k" in cached:
                _check_topk_term(cfg, term, cached, cache_dir)


def _check_topk_term(cfg: Experiment, term, cached: Mapping[str, Any], cache_dir: Path) -> None:
    """A term reading a top-k cache: the sparse loss, the cache's temperature, tokens and length."""
    from jaxdistill.distill import losses
    from jaxdistill.loader import spec_fingerprint

    where = f"objective term {term.name!r}"
    if losses.LOSSES[term.loss].teacher != "topk":
        raise ConfigError(f"{where}: teacher {term.teacher!r} is a top-k cache ({cache_dir}); "
                          f"its loss must be 'sparse_token_kl', found {term.loss!r}")
    temperature = term.hparams.get("temperature", 1.0)
    if float(temperature) != float(cached["temperature"]):
        raise ConfigError(
            f"{where}: hparams.temperature is {temperature} but {cache_dir} cached "
            f"{term.teacher!r}'s top-k at temperature {cached['temperature']} (a distribution "
            "softened differently); set the term's temperature to it or re-run cache-teacher "
            "with --temperature")
    if cfg.data.max_len != cached["max_len"] or (
            spec_fingerprint(cfg.data.tokenizer) != spec_fingerprint(cached["tokenizer"])):
        raise ConfigError(
            f"{where}: {cache_dir} cached the top-k of teacher {term.teacher!r} for "
            f"tokenizer {cached['tokenizer']} at max_len {cached['max_len']}; data.tokenizer "
            f"is {cfg.data.tokenizer} and data.max_len {cfg.data.max_len} (the cached "
            "positions would not be these tokens); use the cache's or re-run cache-teacher")


def teacher_evaluator(cfg: Experiment, model: Functional, outputs: Sequence[str], *,
                      tokenizer: str | None = None,
                      reduce_outputs: Mapping[str, Any] | None = None):
    """(the shared evaluator running one teacher, the token specs its batches need): on its
    own `tokenizer`'s ids when that is not the data's. `reduce_outputs` {head: fn(output,
    batch)}: see `Evaluator`. Built once per cache, so each batch shape compiles once."""
    from jaxdistill.evaluator import Evaluator
    from jaxdistill.loader import spec_fingerprint

    name = "teacher"
    token_keys, token_specs = {}, {}
    if tokenizer is not None and spec_fingerprint(tokenizer) != spec_fingerprint(cfg.data.tokenizer):
        token_keys[name] = spec_fingerprint(tokenizer)[:16]
        token_specs[token_keys[name]] = tokenizer
    evaluator = Evaluator(None, {name: model}, mesh=cache_mesh(cfg), rules=dict(cfg.mesh.rules),
                          token_keys=token_keys, teacher_outputs={name: outputs},
                          reduce_outputs={name: reduce_outputs} if reduce_outputs else None)
    return evaluator, token_specs


def teacher_outputs(cfg: Experiment, evaluator, params: Params, split: str,
                    records: Sequence[Mapping[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """{output: float32 [records, ...]} of `teacher_evaluator`'s model over a split (or over
    `records` of it), in record order; reduced outputs as `head/key`, in their own dtypes."""
    from jaxdistill.data.batches import split_batches

    evaluator, token_specs = evaluator
    batches = split_batches(cfg, split, train=False, token_specs=token_specs, shard=False,
                            records=records)
    scores = evaluator.run(None, {"teacher": params}, batches)
    if evaluator.reduce_outputs:
        return dict(scores.teachers["teacher"])
    return {o: v.astype(np.float32) for o, v in scores.teachers["teacher"].items()}


def cache_mesh(cfg: Experiment):
    """The mesh a teacher is cached on: the config's; with several processes, each process's
    own devices (caching is independent per record: no collective, no lockstep)."""
    if jax.process_count() == 1:
        return parallel.make_mesh(cfg.mesh.shape)
    shape = list(cfg.mesh.shape)
    if -1 not in shape:
        shape[0] = -1  # the data axis takes this process's devices
    try:
        return parallel.make_mesh(shape, jax.local_devices())
    except ValueError as error:
        raise ConfigError(f"mesh.shape {list(cfg.mesh.shape)}: cache-teacher runs each process "
                          f"on its {jax.local_device_count()} local devices: {error}") from None


def _block(count: int, process: int, processes: int) -> tuple[int, int]:
    """Process `process`'s contiguous share [lo, hi) of `count` records (sizes differ by <= 1)."""
    return count * process // processes, count * (process + 1) // processes


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
    top_k: int | None = None,
    temperature: float = 1.0,
    logprob_dtype: str = "float16",
) -> dict[str, Any]:
    """Writes cfg.data.path's splits + the teacher's `outputs` as a new dataset at `out_dir`.

    `tokenizer`: the teacher's own tokenizer (default: the data's). `top_k`: cache the lm
    head's top-k distributions at `temperature` (chat data; see the module docstring), the
    log-probs stored as `logprob_dtype` ("float16" or "float32", `data.topk_store`)."""
    data = cfg.data
    if top_k is not None:
        head = _topk_head(cfg, teacher, model_cfg, outputs, top_k, tokenizer, logprob_dtype)
        outputs = [head]
    elif data.kind == "chat":
        raise ConfigError("cache-teacher: chat teachers are token-level ([T, V] outputs); cache "
                          "their top-k with --top-k K, or cache pointwise, listwise or "
                          "impressions data")
    else:
        outputs = list(outputs) if outputs else default_outputs(model_cfg)
        known = [*default_outputs(model_cfg), "pooled"]
        unknown = [o for o in outputs if o not in known]
        if unknown:
            raise ConfigError(f"teacher {teacher!r} has no output(s) {unknown}; it has {known}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    process, processes = jax.process_index(), jax.process_count()
    info = sources.dataset_info(data.path)
    splits: dict[str, list[dict[str, Any]]] = {}
    shapes: dict[str, Any] = {}
    blobs: dict[str, list[bytes]] = {}
    stored_tokens = 0
    if top_k is None:
        evaluator = teacher_evaluator(cfg, functional(model_cfg), outputs, tokenizer=tokenizer)
    else:
        topk_of = _topk_reduce(top_k, temperature, logprob_dtype)
        evaluator = teacher_evaluator(cfg, functional(model_cfg), [head], tokenizer=tokenizer,
                                      reduce_outputs={head: topk_of})
    for split in info["splits"]:
        records = list(sources.open_source(data.path, split))
        if len(records) < processes:
            raise ValueError(f"{data.path}[{split}]: {len(records)} records cannot be cached "
                             f"by {processes} processes (each writes a non-empty shard)")
        lo, hi = _block(len(records), process, processes)
        records = records[lo:hi]
        # One process reads the split itself (its stored token ids); several, their blocks.
        mine = None if processes == 1 else records
        if top_k is not None:
            blobs[split] = _topk_blobs(cfg, evaluator, params, split, head, logprob_dtype,
                                       mine, len(records))
            stored_tokens += sum(int(np.frombuffer(b, np.int32, 1)[0]) for b in blobs[split])
            splits[split] = records
            continue
        values = teacher_outputs(cfg, evaluator, params, split, mine)
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
    entry = {
        "source": str(cfg.teachers[teacher].source), "dtype": cfg.teachers[teacher].dtype,
        "outputs": shapes, "per_candidate": data.kind == "listwise",
        "data": os.fspath(data.path), "max_len": data.max_len,
        "tokenizer": tokenizer or data.tokenizer}
    if top_k is not None:
        entry.update({
            "outputs": {head: {"topk_ids": [top_k], "topk_logprobs": [top_k],
                               "tail_logprob": []}},
            "top_k": top_k, "temperature": float(temperature), "logprob_dtype": logprob_dtype,
            "bytes_per_token": topk_store.bytes_per_token(top_k, logprob_dtype),
            "positions": "next_loss_mask",
            "stored_tokens": _sum_over_processes(stored_tokens)})
    name = f"cache of {data.path}"
    if processes == 1:
        sources.write_dataset(splits, info["kind"], out_dir, overwrite=overwrite,
                              source_name=name)
        _write_topk(out_dir, teacher, outputs, blobs, 0, 1)
        _carry_topk(data.path, out_dir, teacher)
        _write_manifest(data.path, out_dir, teacher, entry)
    else:
        from jax.experimental import multihost_utils

        part = out_dir.parent / f".{out_dir.name}.part-{process:05d}-of-{processes:05d}"
        sources.write_dataset(splits, info["kind"], part, overwrite=True, source_name=name)
        _write_topk(part, teacher, outputs, blobs, process, processes)
        multihost_utils.sync_global_devices(f"cache-teacher {out_dir}: every part written")
        if process == 0:
            parts = [out_dir.parent / f".{out_dir.name}.part-{i:05d}-of-{processes:05d}"
                     for i in range(processes)]
            sources.join_datasets(parts, out_dir, overwrite=overwrite)
            _carry_topk(data.path, out_dir, teacher)
            _write_manifest(data.path, out_dir, teacher, entry)
        multihost_utils.sync_global_devices(f"cache-teacher {out_dir}: joined")
    report = {"out": os.fspath(out_dir), "teacher": teacher, "outputs": entry["outputs"],
              "splits": {split: info["splits"][split] for split in splits},
              "processes": processes}
    if top_k is not None:
        report.update({k: entry[k] for k in ("top_k", "temperature", "logprob_dtype",
                                              "bytes_per_token", "stored_tokens")})
    return report


def _topk_head(cfg: Experiment, teacher: str, model_cfg: ModelConfig,
               outputs: Sequence[str] | None, top_k: int, tokenizer: str | None,
               logprob_dtype: str) -> str:
    """The lm head whose top-k is cached; every misuse of --top-k named."""
    from jaxdistill.loader import spec_fingerprint

    lm_heads = [n for n, h in model_cfg.heads.items() if isinstance(h, LMHead)]
    if outputs:
        lm_heads = [n for n in lm_heads if n in outputs]
    if len(lm_heads) != 1:
        found = f"lm heads {lm_heads}" if lm_heads else "no lm head"
        asked = f" (--outputs {','.join(outputs)})" if outputs else ""
        raise ConfigError(
            f"--top-k caches one lm head's token distributions; teacher {teacher!r} has "
            f"{found} among {sorted(model_cfg.heads)}{asked}; cache its other heads without "
            "--top-k")
    if cfg.data.kind != "chat":
        raise ConfigError(f"--top-k: data.kind is {cfg.data.kind!r}; an lm teacher's top-k is "
                          "cached over the response tokens of chat data (data.kind: chat)")
    vocab = model_cfg.backbone.vocab_size
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k must be an integer in [1, {vocab}] (teacher {teacher!r}'s "
                          f"model.backbone.vocab_size), got {top_k!r}")
    if logprob_dtype not in topk_store.LOGPROB_DTYPES:
        raise ConfigError(f"--logprob-dtype must be one of {sorted(topk_store.LOGPROB_DTYPES)}, "
                          f"got {logprob_dtype!r}")
    if tokenizer is not None and spec_fingerprint(tokenizer) != spec_fingerprint(
            cfg.data.tokenizer):
        raise ConfigError(f"teachers.{teacher}.tokenizer {tokenizer} is not data.tokenizer "
                          f"{cfg.data.tokenizer}: a top-k cache is over the student's token ids, "
                          "so the teacher must share its vocabulary")
    return lm_heads[0]


def _topk_reduce(top_k: int, temperature: float, logprob_dtype: str):
    """An lm head's (hidden, unembedding) -> its top-k at the `next_loss_mask` positions."""
    from jaxdistill.distill import losses

    dtype = topk_store.LOGPROB_DTYPES[logprob_dtype]

    def topk_of(output, batch):
        hidden_BxTxD, unembed_DxV = output
        return losses.topk_teacher(hidden_BxTxD, unembed_DxV, top_k, batch["next_loss_mask"],
                                   temperature=temperature, logprob_dtype=dtype)

    return topk_of


def _topk_blobs(cfg, evaluator, params, split, head, logprob_dtype, records,
                count) -> list[bytes]:
    """Each record's stored top-k bytes: the teacher over unpacked rows (positions of the
    record's own tokens, valid packed or not), at its `next_loss_mask` positions."""
    unpacked = cfg.model_copy(update={"data": cfg.data.model_copy(update={"pack": False})})
    values = teacher_outputs(unpacked, evaluator, params, split, records)
    ids = values[f"{head}/topk_ids"]
    if len(ids) != count:
        raise ValueError(
            f"{cfg.data.path}[{split}]: {count} records but {len(ids)} teacher outputs; "
            "malformed records cannot be cached (clean the dataset first)")
    logprobs, tail = values[f"{head}/topk_logprobs"], values[f"{head}/tail_logprob"]
    blobs = []
    for i in range(count):
        positions = np.flatnonzero(ids[i, :, 0] >= 0)
        blobs.append(topk_store.pack_topk(positions, ids[i, positions], logprobs[i, positions],
                                          tail[i, positions], logprob_dtype))
    return blobs


def _write_topk(out_dir: Path, teacher: str, outputs: Sequence[str],
                blobs: Mapping[str, list[bytes]], shard: int, shards: int) -> None:
    for split, split_blobs in blobs.items():
        topk_store.write_shard(topk_store.shard_path(out_dir, teacher, outputs[0], split, shard,
                                                     shards), split_blobs)


def _carry_topk(data_dir, out_dir: Path, teacher: str) -> None:
    """Other teachers' top-k caches of the source dataset come along (records carry theirs)."""
    root = Path(data_dir) / topk_store.OFFLINE_DIR
    for path in sorted(root.glob("*/*/*")) if root.is_dir() else []:
        if path.is_file() and path.relative_to(root).parts[0] != teacher:
            target = out_dir / topk_store.OFFLINE_DIR / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _write_manifest(data_dir, out_dir: Path, teacher: str, entry: Mapping[str, Any]) -> None:
    manifest = {**read_manifest(data_dir), teacher: dict(entry)}
    tmp = out_dir / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def _sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _attach(record: dict, teacher: str, values: Mapping[str, np.ndarray], kind: str,
            list_size: int | None) -> None:
    if kind != "listwise":
        record.setdefault("offline", {})[teacher] = {k: v.tolist() for k, v in values.items()}
        return
    # Candidates beyond list_size are never batched; they carry nothing and are cut on read.
    for i, candidate in enumerate(record["candidates"][:list_size]):
        candidate.setdefault("offline", {})[teacher] = {k: v[i].tolist() for k, v in values.items()}


def cache_teacher(cfg: Experiment, teacher: str, out_dir: str | os.PathLike, *,
                  outputs: Sequence[str] | None = None, overwrite: bool = False,
                  top_k: int | None = None, temperature: float | None = None,
                  logprob_dtype: str = "float16") -> dict[str, Any]:
    """Loads the config's teacher `teacher` (run:/hf:) and caches its outputs (`cache_outputs`).

    A top-k cache's `temperature` defaults to the one the config's token-level terms on
    this teacher use (1.0 when they set none)."""
    from jaxdistill import loader

    if teacher not in cfg.teachers:
        raise ConfigError(f"no teacher {teacher!r} in the config; teachers are {sorted(cfg.teachers)}")
    spec = cfg.teachers[teacher]
    if spec.source.kind == "offline":
        raise ConfigError(f"teachers.{teacher} is already offline ({spec.source})")
    if top_k is not None and temperature is None:
        temperature = _term_temperature(cfg, teacher)
    mesh = cache_mesh(cfg)
    loaded = loader.load_teachers(cfg, mesh=mesh, rules=dict(cfg.mesh.rules), names={teacher})
    online = loaded.online[teacher]
    return cache_outputs(cfg, teacher, online.model.cfg, online.params, out_dir,
                         outputs=outputs, overwrite=overwrite, tokenizer=online.tokenizer,
                         top_k=top_k, temperature=1.0 if temperature is None else temperature,
                         logprob_dtype=logprob_dtype)


def _term_temperature(cfg: Experiment, teacher: str) -> float:
    from jaxdistill.distill import losses

    found = {float(term.hparams.get("temperature", 1.0)) for term in cfg.objective
             if term.teacher == teacher and losses.LOSSES[term.loss].level == "token"}
    if len(found) > 1:
        raise ConfigError(f"the objective's token terms on teacher {teacher!r} use temperatures "
                          f"{sorted(found)}; a top-k cache holds one: pass --temperature")
    return found.pop() if found else 1.0
