"""The job-search pipeline: workload -> teachers -> students -> calibration -> evaluation -> report.

Each stage's output lives in `<workdir>/<stage>/<key>/` and is reused while its key is
unchanged. A key hashes the stage's resolved config (with every input replaced by that input's
key), the policy document's hash and the data's key, so editing the engagement teacher's config
re-runs the engagement teacher and everything that reads it (students, evaluation), never the
relevance teacher; editing the policy changes the labels and so every key downstream of them.
A stage interrupted half-way resumes from its last checkpoint on the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jaxdistill import config as config_lib
from jaxdistill import judge as judge_lib

DATA_FORMAT_VERSION = 1  # bump when the workload's records change shape
EVALUATION_VERSION = 3  # bump when evaluation changes what it measures
EVAL_SPLITS = ("validation", "test", "golden")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSpec(_Strict):
    config: str
    teachers: dict[str, str] = Field(default_factory=dict, description="teacher name -> stage")
    warm_start: str | None = Field(default=None, description="stage whose model seeds this one")


class PresetSpec(_Strict):
    workload: dict[str, Any] = Field(default_factory=dict)
    teacher_dtype: str = "float32"
    set: list[str] = Field(default_factory=list)
    teacher_set: list[str] = Field(default_factory=list)
    student_set: list[str] = Field(default_factory=list)


class EvaluateSpec(_Strict):
    list_size: int = Field(default=20, ge=1, description="candidates ranked per query")
    batch_size: int = Field(default=16, ge=1, description="queries per scoring batch")
    k: int = Field(default=10, ge=1)
    poor_grade: int = Field(default=1, ge=0, le=4)
    throughput_batches: int = Field(default=6, ge=2)


class PipelineConfig(_Strict):
    name: str
    workdir: str = "runs/job_search"
    policy: str
    tokenizer_vocab_size: int = Field(default=1000, ge=64)
    main_student: str
    stages: dict[str, StageSpec]
    presets: dict[str, PresetSpec]
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)


@dataclasses.dataclass
class StageOutput:
    name: str
    key: str
    path: Path
    cached: bool
    seconds: float
    experiment: config_lib.Experiment | None = None


def load_pipeline(path: str | Path) -> tuple[PipelineConfig, Path]:
    path = Path(path)
    data = config_lib.read_yaml(path)
    try:
        cfg = PipelineConfig.model_validate(data)
    except Exception as err:  # pydantic.ValidationError
        if hasattr(err, "errors"):
            raise config_lib.ConfigError(config_lib.format_errors(err, data, str(path))) from None
        raise
    for name, stage in cfg.stages.items():
        unknown = [s for s in [*stage.teachers.values(), stage.warm_start] if s and s not in cfg.stages]
        if unknown:
            raise config_lib.ConfigError(f"{path}: stages.{name} depends on unknown stages {unknown}")
    if cfg.main_student not in cfg.stages:
        raise config_lib.ConfigError(f"{path}: main_student {cfg.main_student!r} is not a stage")
    return cfg, path.parent


def digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _done(path: Path) -> bool:
    return (path / "DONE.json").is_file()


def _mark_done(path: Path, info: Mapping[str, Any]) -> None:
    tmp = path / "DONE.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.rename(path / "DONE.json")


def _say(message: str) -> None:
    print(f"[pipeline] {message}", flush=True)


# -------------------------------------------------------------------------------- data


def prepare_data(cfg: PipelineConfig, preset: PresetSpec, workdir: Path, policy_path: Path,
                 policy_hash: str) -> StageOutput:
    """Workload records (labelled by the judge under the policy) and a tokenizer for them."""
    from jaxdistill.data.job_search import JobSearchConfig, generate_splits

    workload = dict(preset.workload)
    preset_name = workload.pop("preset", "laptop")
    job_cfg = JobSearchConfig.preset(preset_name, policy_path=str(policy_path), **workload)
    key = digest({"workload": job_cfg.model_dump(exclude={"policy_path"}), "policy": policy_hash,
                  "vocab": cfg.tokenizer_vocab_size, "version": DATA_FORMAT_VERSION})
    out = workdir / "data" / key
    if _done(out):
        return StageOutput("data", key, out, cached=True, seconds=0.0)
    start = time.time()
    from jaxdistill.data.sources import write_dataset
    from jaxdistill.data.tokenizer import build_tokenizer

    _say(f"data: generating the {preset_name} workload under policy {policy_hash[:12]}")
    splits = generate_splits(job_cfg)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    from jaxdistill import logs

    with logs.to_file(out / "log.txt", capture_output=True):  # tfds' prints and bars
        write_dataset(dict(splits), "listwise", out / "records")
    texts = [r["query"] + "\n" + r["member"] for r in splits["train"]]
    texts += [c["document"] for r in splits["train"] for c in r["candidates"]]
    build_tokenizer(texts, cfg.tokenizer_vocab_size, out / "tokenizer")
    (out / "workload.json").write_text(json.dumps(splits.metadata, indent=2, default=str))
    seconds = time.time() - start
    _mark_done(out, {"key": key, "seconds": seconds})
    return StageOutput("data", key, out, cached=False, seconds=seconds)


# ------------------------------------------------------------------------------ stages


def stage_experiment(cfg: PipelineConfig, name: str, base_dir: Path, preset: PresetSpec,
                     data: StageOutput, policy_path: Path, upstream: Mapping[str, StageOutput],
                     *, for_key: bool) -> config_lib.Experiment:
    """A stage's Experiment with the pipeline's inputs filled in.

    With `for_key`, every input is named by its key instead of its path, so the resolved
    config is the stage's cache key material.
    """
    from jaxdistill.data.tokenizer import load_tokenizer, yes_no_token_ids

    stage = cfg.stages[name]
    where = (lambda out: out.key) if for_key else (lambda out: str(out.path))  # noqa: E731
    tokenizer = load_tokenizer(data.path / "tokenizer")
    yes_id, no_id = yes_no_token_ids(tokenizer)
    overrides = list(preset.set)
    overrides += preset.student_set if stage.teachers else preset.teacher_set
    overrides += [
        f"data.path={data.key if for_key else data.path / 'records'}",
        f"data.tokenizer={data.key if for_key else data.path / 'tokenizer'}",
        f"model.backbone.vocab_size={len(tokenizer)}",
        f"policy={policy_path}",
        "trainer.progress=true",
    ]
    raw = config_lib.apply_overrides(config_lib.read_yaml(base_dir / stage.config), overrides)
    for head in raw.get("model", {}).get("heads", {}).values():
        if head.get("type") == "token_score":
            head["token_ids"] = [no_id, yes_id]
    for teacher, source_stage in stage.teachers.items():
        raw.setdefault("teachers", {}).setdefault(teacher, {})
        raw["teachers"][teacher]["source"] = f"run:{where(upstream[source_stage])}"
        raw["teachers"][teacher]["dtype"] = preset.teacher_dtype
    if stage.warm_start:
        raw["model"]["warm_start"] = f"run:{where(upstream[stage.warm_start])}"
    return config_lib.validate(raw, source=str(base_dir / stage.config))


def run_stage(cfg: PipelineConfig, name: str, base_dir: Path, workdir: Path, preset: PresetSpec,
              data: StageOutput, policy_path: Path, policy_hash: str,
              upstream: Mapping[str, StageOutput]) -> StageOutput:
    from jaxdistill import train

    keyed = stage_experiment(cfg, name, base_dir, preset, data, policy_path, upstream, for_key=True)
    payload = keyed.model_dump(mode="json")
    payload.pop("policy")  # a path; its content is in the key through policy_hash
    key = digest({"experiment": payload, "policy": policy_hash, "data": data.key})
    out = workdir / name / key
    experiment = stage_experiment(cfg, name, base_dir, preset, data, policy_path, upstream,
                                  for_key=False)
    if _done(out):
        return StageOutput(name, key, out, cached=True, seconds=0.0, experiment=experiment)
    _say(f"{name}: training ({experiment.trainer.steps} steps) -> {out}")
    start = time.time()
    result = train.run(experiment, out, resume=True, report=False)
    if result.preempted:
        raise SystemExit(f"{name}: stopped at step {result.step} (preempted); run the pipeline "
                         "again to resume it")
    seconds = time.time() - start
    _mark_done(out, {"key": key, "step": result.step, "seconds": seconds,
                     "eval": result.eval_metrics})
    return StageOutput(name, key, out, cached=False, seconds=seconds, experiment=experiment)


# -------------------------------------------------------------------------- evaluation


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclasses.dataclass
class Predictions:
    """One model's outputs over the evaluation splits, [Q, N, ...] per split."""

    name: str
    params: int
    outputs: dict[str, dict[str, np.ndarray]]  # split -> {key: array}
    items_per_second: float

    def p_yes(self, split: str) -> np.ndarray | None:
        logits = self.outputs[split].get("relevance")
        return None if logits is None else _sigmoid(logits[..., 1] - logits[..., 0])

    def actions(self, split: str) -> np.ndarray | None:
        logits = self.outputs[split].get("actions")
        return None if logits is None else _sigmoid(logits)


def predict_stage(stage: StageOutput, experiment: config_lib.Experiment,
                  spec: EvaluateSpec, *, main: bool = False) -> Predictions:
    """A stage's model over the evaluation splits (every query, through the shared evaluator)
    and its scoring rate."""
    import jax

    from jaxdistill import evaluate, loader, parallel
    from jaxdistill.config import Source
    from jaxdistill.data.batches import split_batches
    from jaxdistill.evaluator import Evaluator
    from jaxdistill.models.model import count_params, functional

    experiment = experiment.model_copy(update={"data": experiment.data.model_copy(
        update={"list_size": spec.list_size, "batch_size": spec.batch_size})})
    mesh = parallel.make_mesh(experiment.mesh.shape)
    rules = dict(experiment.mesh.rules)
    model_cfg, params = loader.load_model(Source("run", stage.path), mesh=mesh, rules=rules)
    model = functional(model_cfg)
    evaluator = Evaluator(model, mesh=mesh, rules=rules)
    # Every query of a split is scored (the short last batch too). A model without a
    # relevance head (other than the main student, which is calibrated) needs the test split only.
    splits = EVAL_SPLITS if "relevance" in model_cfg.heads or main else ("test",)
    batches = {split: list(split_batches(experiment, split, train=False, shard=False))
               for split in splits}
    outputs = {}
    for split in splits:
        scores = evaluator.run(params, {}, batches[split])
        outputs[split] = {**scores.student,
                          **{f"batch/{k}": v for k, v in scores.fields.items()}}
    # Full test batches, on the device before timing: the rate is the model's, not the host
    # transfer's.
    full = [b for b in batches["test"] if len(b["input_ids"]) == spec.batch_size]
    forward = jax.jit(evaluator.predict_fns()["student"])
    inputs = [jax.device_put({k: v for k, v in b.items() if k != "batch_malformed"})
              for b in full[:spec.throughput_batches]]
    items = [int(np.prod(b["input_ids"].shape[:-1])) for b in inputs]

    def score(batch):
        return jax.block_until_ready(forward(params, batch))

    # Best of three passes: on a shared CPU, one pass can land on someone else's busy second.
    rate = max(evaluate.measure_throughput(score, inputs, warmup=2 if i == 0 else 0,
                                           items_per_batch=items) for i in range(3))
    return Predictions(stage.name, count_params(params), outputs, rate)


def _golden_dimensions(data: StageOutput, rows: int, list_size: int) -> dict[str, np.ndarray]:
    """Per-dimension oracle grades of the golden set, [Q, N] in the pipeline's order."""
    from jaxdistill.data.sources import open_source

    source = open_source(data.path / "records", "golden")
    dims: dict[str, np.ndarray] = {d: np.zeros((rows, list_size), np.int64)
                                   for d in judge_lib.DIMENSIONS}
    for q in range(rows):
        for n, candidate in enumerate(source[q]["candidates"][:list_size]):
            for d, g in candidate["hidden"]["dimension_grades"].items():
                dims[d][q, n] = g
    return dims


def _combined_objective(terms, model: Predictions, teachers: Mapping[str, Predictions]) -> float:
    """The main student's distillation objective (its terms, weights and temperatures at the end
    of training) for any model, on the test split; NaN for a model lacking one of the heads."""
    import jax.numpy as jnp

    from jaxdistill.distill.objectives import compute_objective

    def arrays(outputs, batch: bool):
        return {k.removeprefix("batch/"): jnp.asarray(v) for k, v in outputs.items()
                if k.startswith("batch/") == batch}

    out = model.outputs["test"]
    if any(term.student not in out for term in terms):
        return math.nan
    teacher_outputs = {name: arrays(p.outputs["test"], False) for name, p in teachers.items()}
    total, _ = compute_objective(tuple(terms), arrays(out, False), teacher_outputs,
                                 arrays(out, True), jnp.asarray(2**30))
    return float(total)


def evaluate_models(cfg: PipelineConfig, data: StageOutput, stages: Mapping[str, StageOutput],
                    experiments: Mapping[str, config_lib.Experiment], out: Path,
                    action_names: Sequence[str]) -> dict[str, Any]:
    from jaxdistill import calibration, evaluate, report

    ev = cfg.evaluate
    preds = {}
    for name, stage in stages.items():
        _say(f"evaluate: scoring {name}")
        preds[name] = predict_stage(stage, experiments[name], ev, main=name == cfg.main_student)
    relevance, engagement = preds["relevance_teacher"], preds["engagement_teacher"]
    student = preds[cfg.main_student]
    test = relevance.outputs["test"]
    grades, mask = test["batch/grade"], test["batch/candidate_mask"] > 0
    labels, action_mask = test["batch/actions"], test["batch/action_mask"]
    golden = relevance.outputs["golden"]
    golden_dims = _golden_dimensions(data, len(golden["batch/grade"]), golden["batch/grade"].shape[1])
    validation = relevance.outputs["validation"]

    rows, kappa = [], {}
    for name, p in preds.items():
        row: dict[str, Any] = {"model": name, "params": p.params,
                               "items_per_second": p.items_per_second}
        p_yes = p.p_yes("test")
        if p_yes is not None:
            row["ndcg_at_10"] = evaluate.ndcg_at_k(p_yes, grades, mask, ev.k)
            row["poor_match_rate_at_10"] = evaluate.poor_match_rate_at_k(
                p_yes, grades, mask, ev.k, ev.poor_grade)
            thresholds = evaluate.fit_grade_thresholds(
                p.p_yes("validation"), validation["batch/grade"],
                mask=validation["batch/candidate_mask"] > 0)
            predicted = evaluate.scores_to_grades(p.p_yes("golden"), thresholds)
            kappa[name] = evaluate.kappa_by_dimension(
                predicted, golden["batch/grade"], golden_dims, golden["batch/candidate_mask"] > 0)
            row["kappa"] = kappa[name]["overall"]
        probs = p.actions("test")
        if probs is not None:
            for i, action in enumerate(action_names):
                row[f"auroc_{action}"] = evaluate.auroc(
                    probs[..., i], labels[..., i], (action_mask[..., i] > 0) & mask)
        row["combined_objective"] = _combined_objective(
            experiments[cfg.main_student].objective, p,
            {"relevance_teacher": relevance, "engagement_teacher": engagement})
        rows.append(row)
    by_name = {r["model"]: r for r in rows}

    agreement = {}
    if student.p_yes("test") is not None:
        agreement["relevance"] = evaluate.agreement(relevance.p_yes("test"), student.p_yes("test"),
                                                    mask, ev.k)
    click = list(action_names).index("click")
    if student.actions("test") is not None:
        agreement["click"] = evaluate.agreement(engagement.actions("test")[..., click],
                                                student.actions("test")[..., click], mask, ev.k)

    # Calibration of the main student's heads, fitted on validation, judged on test.
    val = student.outputs["validation"]
    val_mask = val["batch/candidate_mask"]
    scores = {"relevance": student.p_yes("validation")}
    targets_ = {"relevance": (val["batch/grade"] >= 3).astype(np.float64)}
    for i, action in enumerate(action_names):
        scores[action] = student.actions("validation")[..., i]
        targets_[action] = val["batch/actions"][..., i]
    calibrators = calibration.calibrate_heads(
        scores, targets_, mask=val_mask > 0, positions=val["batch/position"],
        position_aware=tuple(action_names))
    test_scores = {"relevance": student.p_yes("test"),
                   **{a: student.actions("test")[..., i] for i, a in enumerate(action_names)}}
    test_labels = {"relevance": (grades >= 3).astype(np.float64),
                   **{a: labels[..., i] for i, a in enumerate(action_names)}}
    calib_summary = calibration.calibration_summary(
        calibrators, test_scores, test_labels, mask=mask, positions=test["batch/position"])
    calib_path = stages[cfg.main_student].path / "calibration.json"
    calib_path.write_text(json.dumps({h: c.to_dict() for h, c in calibrators.items()}, indent=2))

    teacher_params = max(relevance.params, engagement.params)
    s = by_name[cfg.main_student]
    singles = [n for n in preds if n.startswith(cfg.main_student + "_")]
    targets = [
        _target("student NDCG@10 / relevance teacher's", s["ndcg_at_10"] /
                by_name["relevance_teacher"]["ndcg_at_10"], 0.97, ">="),
        _target("student click AUROC / engagement teacher's", s["auroc_click"] /
                by_name["engagement_teacher"]["auroc_click"], 0.97, ">="),
        _target("student params / teacher params", s["params"] / teacher_params, 0.25, "<="),
        _target("student items/s / relevance teacher's", s["items_per_second"] /
                by_name["relevance_teacher"]["items_per_second"], 3.0, ">="),
    ]
    for single in singles:
        targets.append(_target(f"combined objective: student vs {single}",
                               s["combined_objective"], by_name[single]["combined_objective"],
                               "<"))
    headline = {
        "student NDCG@10": s["ndcg_at_10"],
        "relevance teacher NDCG@10": by_name["relevance_teacher"]["ndcg_at_10"],
        "student poor-match@10": s["poor_match_rate_at_10"],
        "student click AUROC": s["auroc_click"],
        "engagement teacher click AUROC": by_name["engagement_teacher"]["auroc_click"],
        "student kappa (golden)": s["kappa"],
        "student/teacher params": s["params"] / teacher_params,
        "student/teacher items/s": s["items_per_second"] /
        by_name["relevance_teacher"]["items_per_second"],
        "student-teacher relevance spearman": agreement.get("relevance", {}).get("spearman"),
        "student-teacher click spearman": agreement.get("click", {}).get("spearman"),
    }
    curves = {}  # per stage: its loss terms, train and eval
    for name, stage in stages.items():
        if (stage.path / "metrics.jsonl").is_file():
            metrics = report.read_metrics_jsonl(stage.path / "metrics.jsonl")
            curves[name] = {k: v for k, v in metrics.items() if "loss/" in k}
    out.mkdir(parents=True, exist_ok=True)
    report_path = report.write_report(
        out, headline=headline, models_table=rows, curves=curves, calibration=calib_summary,
        kappa_by_dimension=kappa, targets=targets, title="Job search: multi-teacher distillation")
    summary = {"headline": headline, "models": rows, "agreement": agreement, "targets": targets,
               "report": str(report_path)}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=_json_number))
    return summary


def _json_number(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _target(name: str, value: float, goal: float, op: str) -> dict[str, Any]:
    met = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
    note = "" if met else f"{value:.4g} is not {op} {goal:.4g}"
    return {"name": name, "value": value, "target": f"{op} {goal:.4g}", "met": bool(met),
            "note": note}


# --------------------------------------------------------------------------------- run


def run(path: str | Path, preset_name: str = "laptop", workdir: str | Path | None = None, *,
        evaluate: bool = True) -> dict[str, Any]:
    """Runs (or reuses) every stage; `evaluate=False` stops after training, reporting keys."""
    cfg, base_dir = load_pipeline(path)
    if preset_name not in cfg.presets:
        raise config_lib.ConfigError(
            f"{path}: unknown preset {preset_name!r}; presets: {sorted(cfg.presets)}")
    preset = cfg.presets[preset_name]
    workdir = Path(workdir or cfg.workdir) / preset_name
    policy_path = Path(cfg.policy).resolve()  # read_yaml made it relative to the file
    policy = judge_lib.load_policy(policy_path)
    started = time.time()

    data = prepare_data(cfg, preset, workdir, policy_path, policy.content_hash)
    _say(f"data: {'cached' if data.cached else f'{data.seconds:.0f}s'} ({data.path})")
    stages: dict[str, StageOutput] = {}
    experiments = {}
    for name in cfg.stages:
        stages[name] = run_stage(cfg, name, base_dir, workdir, preset, data, policy_path,
                                 policy.content_hash, stages)
        experiments[name] = stages[name].experiment
        _say(f"{name}: {'cached' if stages[name].cached else f'{stages[name].seconds:.0f}s'} "
             f"({stages[name].path})")

    eval_key = digest({"stages": {n: s.key for n, s in stages.items()},
                       "version": EVALUATION_VERSION,
                       "evaluate": cfg.evaluate.model_dump(),
                       "data": data.key})
    eval_dir = workdir / "evaluation" / eval_key
    outputs = {n: {"key": s.key, "cached": s.cached, "path": str(s.path)}
               for n, s in [("data", data), *stages.items()]}
    outputs["evaluation"] = {"key": eval_key, "cached": _done(eval_dir), "path": str(eval_dir)}
    if not evaluate:
        return {"stages": outputs, "seconds": time.time() - started}
    if _done(eval_dir):
        summary = json.loads((eval_dir / "evaluation.json").read_text())
        _say("evaluation: cached")
    else:
        summary = evaluate_models(cfg, data, stages, experiments, eval_dir,
                                  experiments[cfg.main_student].data.action_names)
        _mark_done(eval_dir, {"key": eval_key})
    summary["stages"] = outputs
    summary["seconds"] = time.time() - started
    _print_summary(summary)
    return summary


def _print_summary(summary: Mapping[str, Any]) -> None:
    print("\nHeadline metrics (held-out test split; kappa on the golden set)")
    for key, value in summary["headline"].items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<40} {text}")
    print("\nTargets")
    for t in summary["targets"]:
        status = "met" if t["met"] else "MISSED"
        print(f"  {status:<7} {t['name']}: {t['value']:.4g} (goal {t['target']})")
    print(f"\nReport: {summary['report']}")
    print(f"Pipeline time: {summary['seconds']:.0f}s")


def main(config: str, preset: str = "laptop", workdir: str | None = None) -> int:
    run(config, preset, workdir)
    return 0
