"""Experiments as runs: what a run needs (`setup`), and a finished run evaluated or scoring records.

`setup(cfg)` builds, once, the mesh, the online teachers (through `loader`), the student's
static model, the fused step's `Distiller` and the tokenizers each model reads; the training
loop, `evaluate_run` (the `eval` command) and `predict_run` (the `predict` command) all start
from it, so they load the same models the same way and score through the same `Evaluator`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdistill import config as config_lib
from jaxdistill import evaluator as evaluator_lib
from jaxdistill import loader, parallel
from jaxdistill.data.batches import split_batches
from jaxdistill.data.labels import action_order, check_labels
from jaxdistill.distill.step import Distiller, make_optimizer
from jaxdistill.models.heads import ActionHead, ClassifierHead, LMHead, TokenScoreHead
from jaxdistill.models.model import Params, functional

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
CALIBRATION_FILE = "calibration.json"


@dataclasses.dataclass
class Setup:
    """Everything a run (or an evaluation of it) needs, built once from the config."""

    cfg: config_lib.Experiment
    mesh: Any
    rules: dict
    distiller: Distiller
    teachers: loader.Teachers
    token_specs: dict[str, str]  # tokenizer key -> spec, for teachers on another tokenizer

    def evaluator(self) -> evaluator_lib.Evaluator:
        return evaluator_lib.Evaluator(
            self.distiller.student, self.teachers.models, mesh=self.mesh, rules=self.rules,
            terms=self.cfg.objective, token_keys=self.distiller.token_keys)

    def batches(self, split: str, *, train: bool, **kwargs):
        return split_batches(self.cfg, split, train=train, token_specs=self.token_specs,
                             **kwargs)

    @property
    def action_names(self) -> tuple[str, ...]:
        """The column order of the batches' `actions` (the student's action heads' first)."""
        return action_order(self.cfg.model.heads, self.cfg.data.action_names)

    def metrics(self, scores: evaluator_lib.Scores) -> dict[str, Any]:
        """Objective terms and every head's metrics of one evaluation."""
        student_cfg = self.distiller.student.cfg
        return {**scores.terms, **evaluator_lib.head_metrics(
            student_cfg, scores, self.cfg.objective, action_names=self.action_names)}

    def sampler(self):
        """The on-policy sampling program's spec (`on_policy.Sampler`), or None when no step
        samples (no `on_policy`, or fraction 0)."""
        on_policy = self.cfg.on_policy
        if on_policy is None or on_policy.fraction == 0:
            return None
        from jaxdistill.data.batches import tokenizer
        from jaxdistill.on_policy import Sampler

        student_tokenizer = tokenizer(self.cfg.data.tokenizer)
        if student_tokenizer.eos_token_id is None:
            raise config_lib.ConfigError(
                f"on_policy: data.tokenizer {self.cfg.data.tokenizer!r} has no eos token, so "
                "a sampled response cannot end; use a tokenizer with one")
        return Sampler(self.distiller.student, seed=self.cfg.seed,
                       max_new_tokens=on_policy.max_new_tokens,
                       eos_id=student_tokenizer.eos_token_id,
                       pad_id=student_tokenizer.pad_token_id, temperature=on_policy.temperature,
                       top_k=on_policy.top_k, top_p=on_policy.top_p,
                       answer_span=on_policy.answer_span)

    def check_labels(self) -> None:
        """The training split's labels fit the heads they train (first offending record named)."""
        from jaxdistill.data.sources import open_source

        check_labels(open_source(self.cfg.data.path, self.cfg.data.train_split),
                     self.cfg.data.kind, self.cfg.objective, self.cfg.model.heads,
                     self.cfg.data.action_names)


def setup(cfg: config_lib.Experiment, *, teachers: bool = True) -> Setup:
    """Mesh, teachers (each weight in its sharding), the student's static model, the step."""
    mesh = parallel.make_mesh(cfg.mesh.shape)
    rules = dict(cfg.mesh.rules)
    loader.check_student_tokenizer(cfg)
    _check_vocab_size(cfg)
    used = {t.teacher for t in cfg.objective if t.teacher is not None} if teachers else set()
    loaded = loader.load_teachers(cfg, mesh=mesh, rules=rules, names=used)
    token_keys = loader.tokenizer_keys(cfg.data.tokenizer, loaded)
    if cfg.on_policy is not None and token_keys:
        raise config_lib.ConfigError(
            f"on_policy: teachers {sorted(token_keys)} read another tokenizer than the "
            f"student's ({cfg.data.tokenizer!r}); the student's samples exist only in its own "
            "tokens, so on-policy distillation needs every teacher on the student's tokenizer")
    optimizer, schedule = make_optimizer(cfg.optimizer)
    token_specs = {key: loaded.online[name].tokenizer for name, key in token_keys.items()}
    loaded = _quantize_teachers(cfg, loaded, token_keys, token_specs, mesh, rules)
    _check_action_heads(cfg, loaded)
    distiller = Distiller(
        student=functional(loader.model_config(cfg.model)), teachers=loaded.models,
        terms=tuple(cfg.objective), optimizer=optimizer, schedule=schedule,
        micro_batches=cfg.trainer.micro_batches, token_keys=token_keys)
    if loaded.offline:
        log.info("offline teachers (outputs from batch['offline']): %s", loaded.offline)
    return Setup(cfg, mesh, rules, distiller, loaded, token_specs)


def _quantize_teachers(cfg, teachers: loader.Teachers, token_keys, token_specs, mesh, rules
                       ) -> loader.Teachers:
    """Teachers with `quantize: int8|fp8` run quantized (qwix); each one's output error against
    its own precision is measured on the first training batch, logged and kept in the manifest."""
    modes = {n: s.quantize for n, s in cfg.teachers.items() if s.quantize and n in teachers.online}
    if not modes:
        return teachers
    from jaxdistill import quantize
    from jaxdistill.distill.step import model_batch

    example = dict(next(iter(split_batches(cfg, cfg.data.train_split, train=False,
                                           token_specs=token_specs, shard=False))))
    example.pop("batch_malformed", None)
    online, manifest = dict(teachers.online), {k: dict(v) for k, v in teachers.manifest.items()}
    for name, mode in modes.items():
        teacher = online[name]
        batch = model_batch(example, token_keys.get(name))
        qmodel, qparams = quantize.quantize_teacher(teacher.model, teacher.params, mode, batch)
        qparams = jax.device_put(qparams, qmodel.shardings(mesh, rules))
        error = quantize.output_error(teacher.model, teacher.params, qmodel, qparams, batch)
        log.warning("teacher %s runs %s; output error on a training batch: %s", name, mode,
                    error)
        manifest[name].update(quantize=mode, quantize_error=error)
        online[name] = loader.Teacher(qmodel, qparams, teacher.tokenizer)
    return loader.Teachers(online, teachers.offline, manifest)


def _check_vocab_size(cfg: config_lib.Experiment) -> None:
    """The student's embedding covers every id its tokenizer emits (out-of-range ids embed as
    NaN and the run would train on NaN)."""
    from jaxdistill.data.batches import tokenizer

    vocab_size = getattr(cfg.model.backbone, "vocab_size", None)
    if vocab_size is None:
        return
    size = len(tokenizer(cfg.data.tokenizer))
    if vocab_size < size:
        raise ValueError(f"model.backbone.vocab_size is {vocab_size} but data.tokenizer "
                         f"{cfg.data.tokenizer!r} has {size} tokens; ids >= {vocab_size} would "
                         f"embed as NaN. Set model.backbone.vocab_size to at least {size}")


def _check_action_heads(cfg: config_lib.Experiment, teachers: loader.Teachers) -> None:
    """A distilled actions head lines up column by column with its teacher's: same names,
    same order (soft targets are not reordered)."""
    for term in cfg.objective:
        student = cfg.model.heads.get(term.student)
        teacher = teachers.online.get(term.teacher)
        if teacher is None or not isinstance(student, ActionHead):
            continue
        source = teacher.model.cfg.heads.get(term.source_output)
        if isinstance(source, ActionHead) and source.names != student.names:
            raise ValueError(
                f"objective term {term.name!r}: student head {term.student!r} predicts actions "
                f"{list(student.names)} but teacher {term.teacher!r}'s {term.source_output!r} "
                f"predicts {list(source.names)}; give model.heads.{term.student}.names the "
                "teacher's order")


def write_eval(run_dir: Path, step: int, split: str, metrics: dict[str, Any]) -> Path:
    """`eval.json`: the run's last evaluation, every metric (confusion matrices too)."""
    path = run_dir / EVAL_FILE
    if jax.process_index() == 0:
        path.write_text(json.dumps({"step": step, "split": split, "metrics": metrics},
                                   indent=2, default=str) + "\n")
    return path


def load_student(s: Setup, run_dir: str | os.PathLike) -> Params:
    """A finished run's student params (its best or latest checkpoint), in their shardings."""
    _, params = loader.load_model(config_lib.Source("run", Path(run_dir)),
                                  heads=s.distiller.student.cfg.heads, mesh=s.mesh, rules=s.rules)
    return params


def evaluate_run(cfg: config_lib.Experiment, run_dir: str | os.PathLike, split: str, *,
                 max_batches: int | None = None) -> dict[str, Any]:
    """A run's student on `split`: objective terms (teachers online, or offline from the
    records) and its heads' metrics; also written to RUN_DIR/eval.json."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive number of batches, found {max_batches}")
    from jaxdistill import cache

    cache.check_offline_sources(cfg)
    s = setup(cfg)
    params = load_student(s, run_dir)
    scores = s.evaluator().run(params, s.teachers.params,
                               s.batches(split, train=False, shard=True),
                               max_batches=max_batches, step=2**30)
    return {"batches": scores.batches, "records": scores.rows, "terms": scores.terms,
            "metrics": evaluator_lib.head_metrics(s.distiller.student.cfg, scores, cfg.objective,
                                                  action_names=s.action_names)}


# ----------------------------------------------------------------------------- predict


def read_calibration(run_dir: str | os.PathLike) -> dict[str, Any]:
    """{head or action: calibrator} fitted for a run (empty when it has none)."""
    from jaxdistill import calibration

    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {name: calibration.calibrator_from_dict(d) for name, d in data.items()}
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a calibration file ({err})") from None


def _calibrate(calibrator, probs: np.ndarray) -> np.ndarray:
    """Position-aware calibrators score as if shown first (position 0)."""
    if getattr(calibrator, "kind", None) == "position_aware":
        return calibrator(probs, 0)
    return calibrator(probs)


def prediction_rows(model_cfg, scores: evaluator_lib.Scores, records: Sequence[Mapping] | None,
                    calibrators: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """One row per record (per candidate for listwise data): its id, then each head's raw
    outputs (logits) and probabilities, calibrated where the run has a calibrator."""
    n = scores.rows
    index = scores.fields.get("record_index", np.arange(n))
    columns: dict[str, np.ndarray] = {}
    for head, head_cfg in model_cfg.heads.items():
        if isinstance(head_cfg, LMHead) or head not in scores.student:
            continue
        value = scores.student[head]
        if isinstance(head_cfg, TokenScoreHead) and len(head_cfg.token_ids) == 2:
            columns[f"{head}/logits"] = value
            probs = evaluator_lib.p_yes(value)
            columns[f"{head}/p_yes"] = probs
            if head in calibrators:
                columns[f"{head}/p_yes_calibrated"] = _calibrate(calibrators[head], probs)
        elif isinstance(head_cfg, ActionHead):
            for i, action in enumerate(head_cfg.names):
                columns[f"{head}/{action}/logit"] = value[..., i]
                probs = 1.0 / (1.0 + np.exp(-value[..., i]))
                columns[f"{head}/{action}/probability"] = probs
                if action in calibrators:
                    columns[f"{head}/{action}/probability_calibrated"] = _calibrate(
                        calibrators[action], probs)
        elif isinstance(head_cfg, ClassifierHead):
            columns[f"{head}/logits"] = value
            probs = np.exp(value - np.logaddexp.reduce(value, axis=-1, keepdims=True))
            columns[f"{head}/probabilities"] = probs
            columns[f"{head}/class"] = probs.argmax(-1)
        else:
            columns[f"{head}/output"] = value
    rows = []
    listwise = kind == "listwise"
    candidate_mask = scores.fields.get("candidate_mask")
    for r in range(n):
        record = records[int(index[r])] if records is not None else {}
        record_id = record.get("id", int(index[r]))
        if not listwise:
            rows.append({"id": record_id, **{k: _plain(v[r]) for k, v in columns.items()}})
            continue
        candidates = record.get("candidates", [])
        for c in range(candidate_mask.shape[1]):
            if candidate_mask[r, c] <= 0:
                continue
            candidate = candidates[c] if c < len(candidates) else {}
            rows.append({"id": record_id, "candidate": c,
                         "candidate_id": candidate.get("id", c),
                         **{k: _plain(v[r, c]) for k, v in columns.items()}})
    return rows


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def predict_run(cfg: config_lib.Experiment, run_dir: str | os.PathLike, *,
                data: str | os.PathLike | None = None, split: str | None = None
                ) -> list[dict[str, Any]]:
    """Scores records with a run's student: a dataset directory's split, or a JSONL/Parquet
    file of records of the run's data kind. One row per record (or candidate)."""
    from jaxdistill.data import sources
    from jaxdistill.data.prepare import read_records
    from jaxdistill.data.records import validate_record

    s = setup(cfg, teachers=False)
    params = load_student(s, run_dir)
    records = None
    path = Path(data) if data is not None else Path(cfg.data.path)
    if path.is_file():
        records = []
        for i, record in read_records(path):
            validate_record(cfg.data.kind, record, source=str(path), index=i)
            records.append(record)
        if not records:
            raise ValueError(f"{path}: no records to score")
        batches = split_batches(cfg, "predict", train=False, records=records, shard=False)
    else:
        split = split or cfg.data.eval_split or "test"
        source = sources.open_source(path, split)
        records = source
        batches = split_batches(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"path": str(path)})}), split, train=False, shard=False)
    scores = evaluator_lib.Evaluator(s.distiller.student, mesh=s.mesh, rules=s.rules).run(
        params, {}, batches)
    return prediction_rows(s.distiller.student.cfg, scores, records, read_calibration(run_dir),
                           cfg.data.kind)


def write_rows(rows: Sequence[Mapping[str, Any]], out: str | os.PathLike) -> Path:
    """Rows as JSONL (`.jsonl`) or Parquet (`.parquet`), written atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    else:
        raise ValueError(f"--out {out}: expected a .jsonl or .parquet file")
    os.replace(tmp, out)
    return out
