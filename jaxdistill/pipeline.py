"""The job-search pipeline: workload -> judge -> teachers -> students -> calibration ->
evaluation -> report.

Longer than ~400 lines because it is one recipe end to end: data, judge, teachers and students
as cached stages, then scoring, calibration, evaluation and the report.

The judge stage fine-tunes a judge model on the golden set's annotated pairs and relabels the
teachers' pairs with its grade distributions (`judge: oracle` keeps the rule oracle's labels).

Each stage's output lives in `<workdir>/<stage>/<key>/` and is reused while its key is
unchanged. A key hashes the stage's resolved config (with every input replaced by that input's
key), the policy document's hash and the data's key, so editing the engagement teacher's config
re-runs the engagement teacher and everything that reads it (students, evaluation), never the
relevance teacher; editing the policy changes the labels and so every key downstream of them.
A stage interrupted half-way resumes from its last checkpoint on the next run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jaxdistill import config as config_lib
from jaxdistill import judge as judge_lib

DATA_FORMAT_VERSION = 6  # bump when the workload's records or their encoding change
EVALUATION_VERSION = 3  # bump when evaluation changes what it measures
EVAL_SPLITS = ("validation", "test", "golden")
JUDGE = "judge"  # the judge's stage name
# What a judge model relabels: the pairs teachers train on. Validation, test and golden keep
# the simulation's ground truth: evaluation fits grade thresholds and calibrates on validation
# and measures on test, so a judge's bias there would be calibrated in and then scored.
JUDGE_LABELLED_SPLITS = ("train",)
THROUGHPUT_CALLS = 5  # timed scoring calls per model; items/s is the fastest one's


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSpec(_Strict):
    config: str
    teachers: dict[str, str] = Field(default_factory=dict, description="teacher name -> stage")
    warm_start: str | None = Field(default=None, description="stage whose model seeds this one")
    set: list[str] = Field(default_factory=list, description="this stage's own KEY=VALUE "
                           "overrides, applied after the preset's (ablation variants use them)")


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
    throughput_queries: int = Field(default=32, ge=1, description="queries per timed call: "
                                    "enough items that per-call overhead does not dominate")
    disagreements: int = Field(default=10, ge=0, description="student-vs-policy pairs shown")


class PipelineConfig(_Strict):
    name: str
    judge: StageSpec | Literal["oracle"] = Field(
        default="oracle", description="a judge model stage fine-tuned on the golden set, or "
        "'oracle': the policy's rules label the data directly")
    workdir: str = "runs/job_search"
    policy: str
    tokenizer_vocab_size: int = Field(default=1000, ge=64)
    main_student: str
    stages: dict[str, StageSpec]
    presets: dict[str, PresetSpec]
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    # Read by `--ablations` only (jaxdistill.ablations validates it), so a pipeline run
    # never depends on it.
    ablations: dict[str, Any] = Field(default_factory=dict)


@dataclasses.dataclass
class StageOutput:
    name: str
    key: str
    path: Path
    cached: bool
    seconds: float
    experiment: config_lib.Experiment | None = None


def read_pipeline(path: Path, schema: type[BaseModel]):
    """A pipeline YAML (its `base:` merged) validated by `schema`; errors name file and key."""
    data = config_lib.read_yaml(path)
    try:
        return schema.model_validate(data)
    except Exception as err:  # pydantic.ValidationError
        if hasattr(err, "errors"):
            raise config_lib.ConfigError(config_lib.format_errors(err, data, str(path), schema)) from None
        raise


def load_pipeline(path: str | Path) -> tuple[PipelineConfig, Path]:
    path = Path(path)
    cfg = read_pipeline(path, PipelineConfig)
    for name, stage in cfg.stages.items():
        unknown = [s for s in [*stage.teachers.values(), stage.warm_start]
                   if s and s not in cfg.stages and s != JUDGE]
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
                     *, for_key: bool, probe: bool = True) -> config_lib.Experiment:
    """A stage's Experiment with the pipeline's inputs filled in.

    With `for_key`, every input is named by its key instead of its path, so the resolved
    config is the stage's cache key material. An action head with `pooled_prior: []` starts at
    a linear probe of the warm-start model (`linear_probe`); the key leaves it unfitted (a
    function of the warm start, the data and the head, all keyed), and so does `probe=False`.
    """
    from jaxdistill.data.tokenizer import load_tokenizer, yes_no_token_ids

    stage = _stage_spec(cfg, name)
    where = (lambda out: out.key) if for_key else (lambda out: str(out.path))  # noqa: E731
    tokenizer = load_tokenizer(data.path / "tokenizer")
    yes_id, no_id = yes_no_token_ids(tokenizer)
    overrides = list(preset.set)
    overrides += preset.student_set if stage.teachers else preset.teacher_set
    overrides += stage.set
    overrides += [
        f"data.path={data.key if for_key else data.path / 'records'}",
        f"data.tokenizer={data.key if for_key else data.path / 'tokenizer'}",
        f"model.backbone.vocab_size={len(tokenizer)}",
        f"policy={policy_path}",
        "trainer.progress=true",
    ]
    raw = config_lib.apply_overrides(config_lib.read_yaml(base_dir / stage.config), overrides)
    probed = {}  # heads that start at a linear probe of the warm start
    for head_name, head in raw.get("model", {}).get("heads", {}).items():
        if head.get("type") == "token_score":
            head["token_ids"] = [no_id, yes_id]
        if head.get("type") == "actions" and head.get("pooled_prior") == []:
            if stage.warm_start in upstream:
                probed[head_name] = head
                continue  # below, once the stage's data config is resolved
            head["pooled_prior"] = None  # nothing to probe (`judge: oracle`): the logs' fit
        if head.get("type") == "actions" and head.get("feature_prior") == []:
            head["position_prior"], head["feature_prior"] = logged_action_fit(
                data.path / "records", head["names"], head["position_buckets"])
        elif head.get("type") == "actions" and head.get("position_prior") == []:
            head["position_prior"] = logged_position_rates(
                data.path / "records", head["names"], head["position_buckets"])
    # An offline teacher is the labeller whose outputs the records carry (the judge's
    # per-dimension grades): it reads the stage's own data.
    for teacher in raw.get("teachers") or {}:
        entry = raw["teachers"][teacher]
        if entry and str(entry.get("source", "")).startswith("offline:"):
            entry["source"] = f"offline:{data.key if for_key else data.path / 'records'}"
    for teacher, source_stage in stage.teachers.items():
        raw.setdefault("teachers", {}).setdefault(teacher, {})
        raw["teachers"][teacher]["source"] = f"run:{where(upstream[source_stage])}"
        raw["teachers"][teacher]["dtype"] = preset.teacher_dtype
    # `warm_start: judge` starts from the fine-tuned judge's weights (its dimension heads
    # included); with `judge: oracle` there is no judge model and the stage starts from scratch.
    if stage.warm_start and stage.warm_start in upstream:
        raw["model"]["warm_start"] = f"run:{where(upstream[stage.warm_start])}"
    elif stage.warm_start and stage.warm_start != JUDGE:
        raise config_lib.ConfigError(f"stage {name}: warm_start {stage.warm_start!r} has not run")
    experiment = config_lib.validate(raw, source=str(base_dir / stage.config))
    if not probed or for_key or not probe:
        return experiment
    for head_name, head in probed.items():
        # The probe fits what the head's loss counts: a rare action given its precondition.
        given = {a: p for term in experiment.objective if term.student == head_name
                 for a, p in term.given.items()}
        head["position_prior"], head["feature_prior"], head["pooled_prior"] = linear_probe(
            upstream[stage.warm_start], experiment, head["names"], head["position_buckets"],
            given=given)
    return config_lib.validate(raw, source=str(base_dir / stage.config))


@functools.lru_cache(maxsize=8)
def _logged_position_rates(records_dir: str, names: tuple[str, ...],
                           buckets: int) -> list[list[float]]:
    from jaxdistill import evaluate

    records = _read_split(Path(records_dir), "train")
    positions = [min(c["position"], buckets - 1) for r in records for c in r["candidates"]]
    rates = []
    for name in names:
        labels = [c["actions"].get(name, 0) for r in records for c in r["candidates"]]
        mask = [name in c["actions"] for r in records for c in r["candidates"]]
        rates_P = evaluate.position_rates(positions, labels, mask)
        rates_P = np.pad(rates_P, (0, buckets - len(rates_P)), mode="edge")
        rates.append(np.clip(rates_P, 1e-4, 1 - 1e-4).round(5).tolist())
    return rates


def logged_position_rates(records_dir: Path, names: Sequence[str],
                          buckets: int) -> list[list[float]]:
    """Each action's rate at each logged position (the last bucket holds the positions past
    it) on the train split: an action head's `position_prior`, the position-only baseline it
    starts from."""
    return _logged_position_rates(str(records_dir), tuple(names), buckets)


@functools.lru_cache(maxsize=8)
def _logged_action_fit(records_dir: str, names: tuple[str, ...],
                       buckets: int) -> tuple[list[list[float]], list[list[float]]]:
    from sklearn.linear_model import LogisticRegression

    records = _read_split(Path(records_dir), "train")
    rows = [(min(c["position"], buckets - 1), r["member_features"], c["actions"])
            for r in records for c in r["candidates"]]
    positions = np.array([p for p, _, _ in rows], np.int64)
    features = np.array([f for _, f, _ in rows], np.float64).reshape(len(rows), -1)
    x_NxI = np.concatenate([np.eye(buckets)[positions], features], axis=1)
    rates, weights = [], []
    for name in names:
        known = np.array([name in actions for _, _, actions in rows])
        labels = np.array([actions.get(name, 0) for _, _, actions in rows])[known]
        fit = LogisticRegression(C=10.0, fit_intercept=False, max_iter=2000).fit(
            x_NxI[known], labels)
        rates.append(_position_rates(fit.coef_[0, :buckets], positions[known]).round(5).tolist())
        weights.append(fit.coef_[0, buckets:].round(5).tolist())
    return rates, weights


def _position_rates(logits_P: np.ndarray, positions_N: np.ndarray) -> np.ndarray:
    """A fit's position logits as rates; a bucket no logged candidate reached takes the
    nearest reached one's, as the counted rates do."""
    seen = np.flatnonzero(np.bincount(positions_N, minlength=len(logits_P)))
    logits_P = logits_P[seen[np.abs(np.arange(len(logits_P))[:, None] - seen).argmin(1)]]
    return np.clip(1 / (1 + np.exp(-logits_P)), 1e-4, 1 - 1e-4)


def logged_action_fit(records_dir: Path, names: Sequence[str],
                      buckets: int) -> tuple[list[list[float]], list[list[float]]]:
    """A logistic fit of each action on the train split's logged position (one-hot, the last
    bucket holding the positions past it) and member features: (`position_prior`, each
    position's probability at zero features; `feature_prior`, the features' weights), an
    action head's start as a personalised position model."""
    return _logged_action_fit(str(records_dir), tuple(names), buckets)


PROBE_C = (0.03, 0.1, 0.3, 1.0)  # inverse L2 strengths a linear probe chooses among
PROBE_PAIRS = 50_000  # logged pairs per split a probe reads at most (the laptop's train: 8000)
_probes: dict[tuple, tuple[list[list[float]], ...]] = {}


def linear_probe(warm: StageOutput, experiment: config_lib.Experiment, names: Sequence[str],
                 buckets: int, *, given: Mapping[str, str] | None = None
                 ) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """A logistic fit of each action on the warm-start model's pooled state, the logged
    position (one-hot, the last bucket holding the positions past it) and member features, on
    the train split, its L2 strength chosen on validation AUROC: an action head's start
    (`position_prior`, `feature_prior`, `pooled_prior`), so fine-tuning starts from the probe.
    `given` {action: precondition}: that action is fitted where its precondition happened, as
    a loss with rare-action masking counts it.

    A head started at the position fit alone learned next to nothing from the text in 90
    steps, while a probe of the same pooled states adds 0.009 click AUROC (linear probing then
    fine-tuning, Kumar et al. 2022).
    """
    given = dict(given or {})
    memo = (str(warm.path), experiment.data.path, tuple(names), buckets,
            tuple(sorted(given.items())))
    if memo in _probes:
        return _probes[memo]
    _say(f"linear probe of {warm.name} for actions {list(names)}")
    _, params, evaluator = _stage_model(warm, experiment)
    (x, y, known_QxNxK, positions_QxN, width), (vx, vy, vknown_QxNxK, _, _) = (
        _probe_design(evaluator, params, experiment, split, buckets)
        for split in ("train", "validation"))
    rates, weights, pooled = [], [], []
    for k, name in enumerate(names):
        known, vknown = known_QxNxK[..., k], vknown_QxNxK[..., k]
        if name in given:
            precondition = list(names).index(given[name])
            known = known & (y[..., precondition] > 0.5)
            vknown = vknown & (vy[..., precondition] > 0.5)
        coef, intercept = _probe_fit(x[known], y[..., k][known], vx[vknown], vy[..., k][vknown])
        rates.append(_position_rates(coef[:buckets] + intercept,
                                     positions_QxN[known]).round(6).tolist())
        weights.append(coef[buckets:-width].round(6).tolist())
        pooled.append(coef[-width:].round(6).tolist())
    _probes[memo] = rates, weights, pooled
    return _probes[memo]


def _probe_design(evaluator, params, experiment: config_lib.Experiment, split: str,
                  buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(inputs [Q, N, buckets + features + width]: the position one-hot, member features and
    pooled state; actions [Q, N, K]; known [Q, N, K]; positions [Q, N]; width) of a split's
    whole logged lists (training reads a few candidates of each, the probe every one, every
    position included), its first PROBE_PAIRS pairs' queries."""
    from jaxdistill.data.batches import split_batches
    from jaxdistill.data.sources import open_source

    source = open_source(Path(experiment.data.path), split)
    records, pairs = [], 0
    while len(records) < len(source) and pairs < PROBE_PAIRS:
        records.append(source[len(records)])
        pairs += len(records[-1]["candidates"])
    if not records:
        raise ValueError(f"{experiment.data.path}: the {split} split is empty; a linear probe "
                         "fits on train and chooses its L2 strength on validation")
    scores = evaluator.run(params, {}, split_batches(
        experiment, split, train=False, records=records, shard=False,
        list_size=max(len(r["candidates"]) for r in records)))
    f = scores.fields
    pooled_QxNxD = scores.student["pooled"].astype(np.float64)
    q, n, width = pooled_QxNxD.shape
    positions_QxN = np.minimum(f["position"], buckets - 1)
    features_QxNxF = f.get("member_features", np.zeros((q, 0)))[:, None, :]
    x = np.concatenate([np.eye(buckets)[positions_QxN],
                        np.broadcast_to(features_QxNxF, (q, n, features_QxNxF.shape[-1])),
                        pooled_QxNxD], -1)
    known_QxNxK = (f["action_mask"] > 0) & (f["candidate_mask"] > 0)[..., None]
    return x, f["actions"], known_QxNxK, positions_QxN, width


def _probe_fit(x_NxI: np.ndarray, y_N: np.ndarray, val_x_NxI: np.ndarray,
               val_y_N: np.ndarray) -> tuple[np.ndarray, float]:
    """(coefficients, intercept) of one action's logistic fit, at the PROBE_C with the best
    validation AUROC (C = 1 without both classes on validation); an action never (or always)
    logged keeps its rate and no weights."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_N)) < 2:
        rate = y_N.mean() if y_N.size else 0.5
        return np.zeros(x_NxI.shape[-1]), float(np.log((rate + 1e-4) / (1 - rate + 1e-4)))
    choices = PROBE_C if len(np.unique(val_y_N)) == 2 else (1.0,)
    best = None
    for c in choices:
        # The intercept is not penalised (lbfgs): it keeps a rare action's base rate while a
        # strong penalty shrinks the position one-hot's weights.
        fit = LogisticRegression(C=c, max_iter=3000).fit(x_NxI, y_N)
        score = roc_auc_score(val_y_N, fit.decision_function(val_x_NxI)) if len(choices) > 1 \
            else 0.0
        if best is None or score > best[0]:
            best = (score, fit)
    return best[1].coef_[0], float(best[1].intercept_[0])


def _stage_spec(cfg: PipelineConfig, name: str) -> StageSpec:
    if name == JUDGE:
        if not isinstance(cfg.judge, StageSpec):
            raise config_lib.ConfigError(f"pipeline {cfg.name}: judge is {cfg.judge!r}, not a stage")
        return cfg.judge
    return cfg.stages[name]


def run_stage(cfg: PipelineConfig, name: str, base_dir: Path, workdir: Path, preset: PresetSpec,
              data: StageOutput, policy_path: Path, policy_hash: str,
              upstream: Mapping[str, StageOutput]) -> StageOutput:
    keyed = stage_experiment(cfg, name, base_dir, preset, data, policy_path, upstream, for_key=True)
    # A linear probe costs a forward pass over the train and validation splits: only a stage
    # that will train needs its head's start.
    cached = _done(workdir / name / stage_key(keyed, policy_hash, data.key))
    experiment = stage_experiment(cfg, name, base_dir, preset, data, policy_path, upstream,
                                  for_key=False, probe=not cached)
    return train_stage(name, keyed, experiment, workdir, policy_hash, data)


def stage_key(keyed: config_lib.Experiment, policy_hash: str, data_key: str) -> str:
    """A stage's cache key: its config as keyed, the policy's hash and the data's key."""
    payload = keyed.model_dump(mode="json")
    payload.pop("policy")  # a path; its content is in the key through policy_hash
    return digest({"experiment": payload, "policy": policy_hash, "data": data_key})


def train_stage(name: str, keyed: config_lib.Experiment, experiment: config_lib.Experiment,
                workdir: Path, policy_hash: str, data: StageOutput) -> StageOutput:
    """Trains a stage's experiment in `workdir/name/<key>`, or reuses it while its key (the
    config as keyed, with inputs replaced by their keys; the policy's hash; the data's key) is
    unchanged. A stage stopped half-way resumes from its checkpoint on the next run."""
    from jaxdistill import train

    key = stage_key(keyed, policy_hash, data.key)
    out = workdir / name / key
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


# ------------------------------------------------------------------------------- judge


def run_judge(cfg: PipelineConfig, base_dir: Path, workdir: Path, preset: PresetSpec,
              data: StageOutput, policy_path: Path, policy_hash: str) -> StageOutput:
    """The judge stage: fine-tune the judge on golden_train, then relabel the teachers' pairs.

    Returns the data every later stage reads: with `judge: oracle`, the workload as generated
    (labelled by the rule oracle); otherwise `<judge run>/labelled/` (records whose train and
    validation pairs carry the judge's grades, grade distributions and per-dimension
    distributions, and the workload's tokenizer), keyed by the judge's key so that a new
    judge re-keys every stage after it.
    """
    if not isinstance(cfg.judge, StageSpec):
        return data
    judge = run_stage(cfg, JUDGE, base_dir, workdir, preset, data, policy_path, policy_hash, {})
    out = judge.path / "labelled"
    labelled = StageOutput(JUDGE, judge.key, out, cached=judge.cached, seconds=judge.seconds,
                           experiment=judge.experiment)
    if _done(out):
        return labelled
    start = time.time()
    _say(f"judge: labelling {', '.join(JUDGE_LABELLED_SPLITS)} -> {out}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    from jaxdistill import logs

    with logs.to_file(out / "log.txt", capture_output=True):  # tfds' prints and bars
        info = label_with_judge(judge, data.path / "records", out / "records")
    shutil.copytree(data.path / "tokenizer", out / "tokenizer")
    seconds = time.time() - start
    _mark_done(out, {"key": judge.key, "seconds": seconds, "judge_info": info})
    labelled.seconds += seconds
    labelled.cached = False
    return labelled


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def label_with_judge(judge: StageOutput, records_dir: Path, out_dir: Path, *,
                     batch_size: int = 8) -> dict[str, Any]:
    """Writes `records_dir` to `out_dir` with JUDGE_LABELLED_SPLITS relabelled by the judge.

    Each candidate of those splits gets grade = the judge's most likely grade, grade_probs =
    its grade distribution, and offline["judge"][dimension] = its per-dimension log-probs
    (what a teacher's dimension heads distil). Returns {"judge", "kappa": the judge's kappa
    against the held-out golden annotators, overall and per dimension (its dimension heads),
    "oracle_kappa": the rule oracle's clean grades against the same annotators, "agreement":
    the judge's kappa against the oracle's clean grades on each relabelled split}.
    """
    from jaxdistill.data.batches import split_batches
    from jaxdistill.data.sources import dataset_info, open_source, write_dataset

    experiment = judge.experiment
    _, params, evaluator = _stage_model(judge, experiment)
    splits, agreement = {}, {}
    info: dict[str, Any] = {"judge": f"{experiment.name} (fine-tuned "
                            f"{experiment.model.backbone.type}, "
                            f"init {experiment.model.init})"}
    for split in dataset_info(records_dir)["splits"]:
        source = open_source(records_dir, split)
        records = [source[i] for i in range(len(source))]
        splits[split] = records
        if split not in (*JUDGE_LABELLED_SPLITS, "golden") or not records:
            continue
        list_size = max(len(r["candidates"]) for r in records)
        labelling = _with_data(experiment, list_size=list_size, batch_size=batch_size,
                               path=str(records_dir))
        outputs = evaluator.run(params, {}, split_batches(labelling, split, train=False,
                                                          shard=False)).student
        probs_QxNx5 = _softmax(outputs["grade"].astype(np.float64))
        dims = {d: np.log(np.clip(_softmax(outputs[d].astype(np.float64)), 1e-4, 1.0))
                for d in judge_lib.DIMENSIONS if d in outputs}
        if split == "golden":
            info["kappa"], info["oracle_kappa"] = _judge_kappa(records, probs_QxNx5, dims)
            continue
        ours, oracle = [], []
        for q, record in enumerate(records):
            for n, candidate in enumerate(record["candidates"]):
                candidate["grade"] = int(np.argmax(probs_QxNx5[q, n]))
                candidate["grade_probs"] = probs_QxNx5[q, n].round(5).tolist()
                candidate["offline"] = {"judge": {d: lp[q, n].round(4).tolist()
                                                  for d, lp in dims.items()}}
                ours.append(candidate["grade"])
                oracle.append(candidate["hidden"]["oracle_grade"])
        agreement[f"kappa_vs_oracle/{split}"] = judge_lib.weighted_kappa(ours, oracle)
    write_dataset(splits, "listwise", out_dir)
    info["agreement"] = agreement
    return info


def _judge_kappa(records: Sequence[Mapping[str, Any]], probs_QxNx5: np.ndarray,
                 dim_log_probs: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(judge, rule oracle) kappa against golden annotators, overall and per dimension."""
    from jaxdistill import evaluate

    def column(get):
        return np.array([[get(c) for c in r["candidates"]] for r in records])

    golden_QxN = column(lambda c: c["grade"])
    dims = {d: column(lambda c, d=d: c["hidden"]["dimension_grades"][d])
            for d in judge_lib.DIMENSIONS}
    n = golden_QxN.shape[1]
    predicted = {"overall": np.argmax(probs_QxNx5[:, :n], -1),
                 **{d: np.argmax(lp[:, :n], -1) for d, lp in dim_log_probs.items()}}
    oracle = column(lambda c: c["hidden"]["oracle_grade"])
    return (evaluate.kappa_by_dimension(predicted, golden_QxN, dims),
            evaluate.kappa_by_dimension({"overall": oracle, **dims}, golden_QxN, dims))


def _judge_info(labelled: StageOutput) -> dict[str, Any]:
    """What the report says about the judge that labelled the teachers' data."""
    if labelled.name != JUDGE:
        return {"judge": "rule_oracle (the policy's rules over the simulation's facts)"}
    return json.loads((labelled.path / "DONE.json").read_text())["judge_info"]


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

    def dimension_grades(self, split: str) -> dict[str, np.ndarray]:
        """{dimension: argmax grade [Q, N]} for the policy dimensions this model has heads for."""
        out = self.outputs[split]
        return {d: np.argmax(out[d], axis=-1) for d in judge_lib.DIMENSIONS if d in out}

    def actions(self, split: str) -> np.ndarray | None:
        logits = self.outputs[split].get("actions")
        return None if logits is None else _sigmoid(logits)


def _stage_model(stage: StageOutput, experiment: config_lib.Experiment):
    """(Functional, params, evaluator, mesh, rules) of a finished stage, loaded once."""
    from jaxdistill import loader, parallel
    from jaxdistill.config import Source
    from jaxdistill.evaluator import Evaluator
    from jaxdistill.models.model import functional

    mesh = parallel.make_mesh(experiment.mesh.shape)
    rules = dict(experiment.mesh.rules)
    model_cfg, params = loader.load_model(Source("run", stage.path), mesh=mesh, rules=rules)
    model = functional(model_cfg)
    return model, params, Evaluator(model, mesh=mesh, rules=rules)


def _with_data(experiment: config_lib.Experiment, **update) -> config_lib.Experiment:
    return experiment.model_copy(update={"data": experiment.data.model_copy(update=update)})


def predict_stage(stage: StageOutput, experiment: config_lib.Experiment,
                  spec: EvaluateSpec, *, main: bool = False) -> Predictions:
    """A stage's model over the evaluation splits: every query, through the shared evaluator
    (its scoring rate is `measure_items_per_second`'s)."""
    from jaxdistill.data.batches import split_batches
    from jaxdistill.models.model import count_params

    experiment = _with_data(experiment, list_size=spec.list_size, batch_size=spec.batch_size)
    model, params, evaluator = _stage_model(stage, experiment)
    # A model without a relevance head (other than the main student, which is calibrated)
    # needs the test split only.
    splits = EVAL_SPLITS if "relevance" in model.cfg.heads or main else ("test",)
    outputs = {}
    for split in splits:
        scores = evaluator.run(params, {}, split_batches(experiment, split, train=False,
                                                         shard=False))
        outputs[split] = {**scores.student,
                          **{f"batch/{k}": v for k, v in scores.fields.items()}}
    return Predictions(stage.name, count_params(params), outputs, float("nan"))


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


def measure_items_per_second(stage: StageOutput, experiment: config_lib.Experiment,
                             spec: EvaluateSpec) -> tuple[float, float]:
    """(items/s, forward FLOPs per item) of a stage's model scoring `spec.throughput_queries`
    test queries per call (the evaluator's forward on device-resident inputs, the best of
    THROUGHPUT_CALLS timed calls: on a shared machine the fastest call is the model's rate,
    the others carry other processes' load)."""
    import jax

    from jaxdistill import evaluate
    from jaxdistill.data.batches import split_batches
    from jaxdistill.models.model import count_params

    experiment = _with_data(experiment, list_size=spec.list_size,
                            batch_size=spec.throughput_queries)
    model, params, evaluator = _stage_model(stage, experiment)
    batch = next(iter(split_batches(experiment, "test", train=False, shard=False)))
    inputs = jax.device_put({k: v for k, v in batch.items() if k != "batch_malformed"})
    items = int(np.prod(batch["input_ids"].shape[:-1]))
    forward = jax.jit(evaluator.predict_fns()["student"])

    def score(batch):
        return jax.block_until_ready(forward(params, batch))

    rate = max(evaluate.measure_throughput(score, [inputs], warmup=1 if i == 0 else 0,
                                           items_per_batch=[items])
               for i in range(THROUGHPUT_CALLS))
    backbone = model.cfg.backbone
    width = backbone.heads * getattr(backbone, "head_dim", backbone.hidden // backbone.heads)
    flops = evaluate.forward_flops_per_item(count_params(params, exclude_embeddings=True),
                                            backbone.layers, width, experiment.data.max_len)
    return rate, flops


def _read_split(records_dir: Path, split: str) -> list[dict[str, Any]]:
    from jaxdistill.data.sources import open_source

    source = open_source(records_dir, split)
    return [source[i] for i in range(len(source))]


def position_baseline(train_records: Sequence[Mapping[str, Any]], test: Mapping[str, np.ndarray],
                      action_names: Sequence[str]) -> dict[str, Any]:
    """A row for the models table: each action's empirical rate per logged position on train,
    scored on test. An engagement model earns its keep by the AUROC it adds over this."""
    from jaxdistill import evaluate

    positions = [c["position"] for r in train_records for c in r["candidates"]]
    mask = (test["batch/candidate_mask"] > 0)
    row: dict[str, Any] = {"model": "position-only baseline", "params": 0}
    for i, action in enumerate(action_names):
        rates_P = evaluate.position_rates(
            positions, [c["actions"][action] for r in train_records for c in r["candidates"]])
        scores = evaluate.score_by_position(rates_P, test["batch/position"])
        row[f"auroc_{action}"] = evaluate.auroc(
            scores, test["batch/actions"][..., i], (test["batch/action_mask"][..., i] > 0) & mask)
    return row


def disagreements(p_yes_QxN: np.ndarray, thresholds: Sequence[float],
                  records: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """The `n` pairs where a model's grade (its p(Yes) through `thresholds`) is furthest from
    the policy's (ties: the larger p(Yes) gap), with what a reviewer needs to judge them."""
    from jaxdistill import evaluate

    grade_QxN = np.array([[c["hidden"]["oracle_grade"] for c in r["candidates"][:p_yes_QxN.shape[1]]]
                          for r in records])
    predicted_QxN = evaluate.scores_to_grades(p_yes_QxN, thresholds)
    gap_QxN = np.abs(predicted_QxN - grade_QxN) + np.abs(p_yes_QxN - grade_QxN / 4.0)
    worst = np.argsort(-gap_QxN, axis=None, kind="stable")[:n]
    pairs = []
    for q, c in zip(*np.unravel_index(worst, gap_QxN.shape)):
        record, candidate = records[q], records[q]["candidates"][c]
        pairs.append({"query": record["query"], "profile": record["member"],
                      "job": candidate["document"], "policy_grade": int(grade_QxN[q, c]),
                      "dimension_grades": dict(candidate["hidden"]["dimension_grades"]),
                      "student_p_yes": float(p_yes_QxN[q, c]),
                      "student_grade": int(predicted_QxN[q, c])})
    return pairs


def _profile_summary(member: str) -> str:
    """The profile's first sentence (title, level, years) and its city."""
    sentences = member.split(". ")
    city = next((x for x in sentences if x.startswith("Based in")), "")
    return ". ".join(x for x in (sentences[0], city) if x).rstrip(".") + "."


def evaluate_models(cfg: PipelineConfig, data: StageOutput, stages: Mapping[str, StageOutput],
                    experiments: Mapping[str, config_lib.Experiment], out: Path,
                    action_names: Sequence[str],
                    judge_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Scores every stage on the held-out splits and writes the report. `judge_info`: what
    the judge stage recorded (which judge labelled the data, its held-out kappa)."""
    from jaxdistill import calibration, evaluate, report

    ev = cfg.evaluate
    preds, speed = {}, {}
    for name, stage in stages.items():
        _say(f"evaluate: scoring {name}")
        preds[name] = predict_stage(stage, experiments[name], ev, main=name == cfg.main_student)
        speed[name] = measure_items_per_second(stage, experiments[name], ev)
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
                               "items_per_second": speed[name][0],
                               "forward_flops_per_item": speed[name][1]}
        p_yes = p.p_yes("test")
        if p_yes is not None:
            row["ndcg_at_10"] = evaluate.ndcg_at_k(p_yes, grades, mask, ev.k)
            row["poor_match_rate_at_10"] = evaluate.poor_match_rate_at_k(
                p_yes, grades, mask, ev.k, ev.poor_grade)
            thresholds = evaluate.fit_grade_thresholds(
                p.p_yes("validation"), validation["batch/grade"],
                mask=validation["batch/candidate_mask"] > 0)
            # A model with per-dimension heads is judged on each dimension by its own head.
            predicted = {"overall": evaluate.scores_to_grades(p.p_yes("golden"), thresholds),
                         **p.dimension_grades("golden")}
            kappa[name] = evaluate.kappa_by_dimension(
                predicted, golden["batch/grade"], golden_dims, golden["batch/candidate_mask"] > 0)
            row["kappa"] = kappa[name]["overall"]
        probs = p.actions("test")
        if probs is not None:
            for i, action in enumerate(action_names):
                row[f"auroc_{action}"] = evaluate.auroc(
                    probs[..., i], labels[..., i], (action_mask[..., i] > 0) & mask)
        rows.append(row)
    by_name = {r["model"]: r for r in rows}
    # Combined score: each model's NDCG@10 as a fraction of the relevance teacher's and its
    # click AUROC as a fraction of the engagement teacher's, averaged (1.0 = both teachers).
    references = {"ndcg_at_10": by_name["relevance_teacher"]["ndcg_at_10"],
                  "auroc_click": by_name["engagement_teacher"]["auroc_click"]}
    for row in rows:
        row["combined_score"] = evaluate.relative_score(row, references)
    train_records = _read_split(data.path / "records", "train")
    baseline = position_baseline(train_records, test, action_names)
    rows.append(baseline)

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
        _target("engagement teacher click AUROC - position-only baseline's",
                by_name["engagement_teacher"]["auroc_click"] - baseline["auroc_click"], 0.0, ">"),
    ]
    for single in singles:
        targets.append(_target(f"combined score: student vs {single}",
                               s["combined_score"], by_name[single]["combined_score"], ">"))
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
        "teacher/student forward FLOPs per item": by_name["relevance_teacher"][
            "forward_flops_per_item"] / s["forward_flops_per_item"],
        "student combined score": s["combined_score"],
        "student-teacher relevance spearman": agreement.get("relevance", {}).get("spearman"),
        "student-teacher click spearman": agreement.get("click", {}).get("spearman"),
    }
    curves = {}  # per stage: its loss terms, train and eval
    for name, stage in stages.items():
        if (stage.path / "metrics.jsonl").is_file():
            metrics = report.read_metrics_jsonl(stage.path / "metrics.jsonl")
            curves[name] = {k: v for k, v in metrics.items() if "loss/" in k}
    out.mkdir(parents=True, exist_ok=True)
    thresholds = evaluate.fit_grade_thresholds(
        student.p_yes("validation"), validation["batch/grade"],
        mask=validation["batch/candidate_mask"] > 0)
    worst = disagreements(student.p_yes("test"), thresholds,
                          _read_split(data.path / "records", "test"), ev.disagreements)
    sections = _report_sections(cfg, judge_info, baseline, by_name, worst, action_names)
    report_path = report.write_report(
        out, headline=headline, models_table=rows, curves=curves, calibration=calib_summary,
        kappa_by_dimension=kappa, targets=targets, title="Job search: multi-teacher distillation",
        sections=sections)
    summary = {"headline": headline, "models": rows, "agreement": agreement, "targets": targets,
               "judge": judge_info, "disagreements": worst, "report": str(report_path)}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=_json_number))
    return summary


def _report_sections(cfg: PipelineConfig, judge_info: Mapping[str, Any] | None,
                     baseline: Mapping[str, Any], by_name: Mapping[str, Mapping[str, Any]],
                     worst: Sequence[Mapping[str, Any]], action_names: Sequence[str]
                     ) -> list[tuple[str, list[str]]]:
    """The report's job-search sections: the judge, the engagement baseline, the combined
    score, throughput, and the pairs where the student and the policy disagree most."""
    from jaxdistill import report

    sections = []
    info = dict(judge_info or {"judge": "rule_oracle"})
    lines = [f"Training pairs were labelled by **{info['judge']}**."]
    if "kappa" in info:
        lines += ["The judge was fine-tuned on the golden set's annotated pairs and is measured "
                  "on held-out golden pairs (quadratic weighted kappa; its dimension heads for "
                  "the dimensions). The rule oracle's clean grades against the same annotators "
                  "are the ceiling the annotators' noise allows.", ""]
        names = list(info["kappa"])
        lines += report.table_lines(
            ["judge", *names],
            [[info["judge"], *(info["kappa"][d] for d in names)],
             ["rule oracle (ceiling)", *(info["oracle_kappa"].get(d) for d in names)]])
        lines += ["", "Kappa of the judge's labels against the oracle's clean grades: " +
                  ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in info["agreement"].items())]
    sections.append(("Judge", lines))

    engagement = by_name["engagement_teacher"]
    sections.append(("Engagement against a position-only baseline", [
        "The baseline scores every candidate by its action's empirical rate at its logged "
        "position on train: position bias alone. An engagement model is worth its cost by the "
        "AUROC it adds over it.", "",
        *report.table_lines(["action", "position-only AUROC", "engagement teacher AUROC"],
                            [[a, baseline[f"auroc_{a}"], engagement.get(f"auroc_{a}")]
                             for a in action_names]),
        "", "Dismissals follow examination (position) and a poor fit, and are logged only "
        "for examined candidates that were not clicked: a model must score them high for "
        "poor matches, the opposite of clicks and applies."]))

    sections.append(("Reading the combined score and throughput", [
        "Combined score = mean of (NDCG@10 / the relevance teacher's) and (click AUROC / the "
        "engagement teacher's); 1.0 means a model matches both teachers. A model without "
        "a trained head for one of them loses that half.",
        "Items/s is measured with device-resident inputs at "
        f"{cfg.evaluate.throughput_queries} queries x {cfg.evaluate.list_size} candidates per "
        "call; forward FLOPs per item (2·N·T + 4·L·T²·A, N non-embedding parameters) is "
        "what the ratio would follow if matmuls ran at one rate whatever their size."]))

    if worst:
        rows = [[i + 1, w["query"], _profile_summary(w["profile"]), w["job"], w["policy_grade"],
                 ", ".join(f"{d} {g}" for d, g in w["dimension_grades"].items()),
                 w["student_p_yes"], w["student_grade"]] for i, w in enumerate(worst)]
        sections.append((f"Where the student and the policy disagree most ({len(worst)} test pairs)", [
            "Policy grade: the rule oracle's (the simulation's ground truth). Student grade: its "
            "p(Yes) mapped to grades by thresholds fitted on validation.", "",
            *report.table_lines(["#", "query", "profile", "job", "policy grade",
                                 "policy grade by dimension", "student p(Yes)", "student grade"],
                                rows)]))
    return sections


def _json_number(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _target(name: str, value: float, goal: float, op: str) -> dict[str, Any]:
    met = {">=": value >= goal, "<=": value <= goal, "<": value < goal, ">": value > goal}[op]
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
    labelled = run_judge(cfg, base_dir, workdir, preset, data, policy_path, policy.content_hash)
    stages: dict[str, StageOutput] = {}
    if labelled is not data:
        _say(f"judge: {'cached' if labelled.cached else f'{labelled.seconds:.0f}s'} "
             f"({labelled.path})")
        # Stages may warm-start from the judge's run (the labelled data lives inside it).
        stages[JUDGE] = dataclasses.replace(labelled, path=labelled.path.parent)
    experiments = {}
    for name in cfg.stages:
        stages[name] = run_stage(cfg, name, base_dir, workdir, preset, labelled, policy_path,
                                 policy.content_hash, stages)
        experiments[name] = stages[name].experiment
        _say(f"{name}: {'cached' if stages[name].cached else f'{stages[name].seconds:.0f}s'} "
             f"({stages[name].path})")
    stages.pop(JUDGE, None)  # evaluated through what it labelled, not as a ranker

    eval_key = digest({"stages": {n: s.key for n, s in stages.items()},
                       "version": EVALUATION_VERSION,
                       "evaluate": cfg.evaluate.model_dump(),
                       "data": data.key})
    eval_dir = workdir / "evaluation" / eval_key
    outputs = {n: {"key": s.key, "cached": s.cached, "path": str(s.path)}
               for n, s in [("data", data), *([(JUDGE, labelled)] if labelled is not data else []),
                            *stages.items()]}
    outputs["evaluation"] = {"key": eval_key, "cached": _done(eval_dir), "path": str(eval_dir)}
    if not evaluate:
        return {"stages": outputs, "seconds": time.time() - started}
    if _done(eval_dir):
        summary = json.loads((eval_dir / "evaluation.json").read_text())
        _say("evaluation: cached")
    else:
        summary = evaluate_models(cfg, data, stages, experiments, eval_dir,
                                  experiments[cfg.main_student].data.action_names,
                                  judge_info=_judge_info(labelled))
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
