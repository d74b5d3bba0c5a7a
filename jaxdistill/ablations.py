"""Ablations of the job-search pipeline: each claim of the method as variants x seeds, one table.

`jaxdistill pipeline PIPELINE.yaml --ablations [--seeds N]` reads the pipeline file's
`ablations:` section: studies, each a set of variants of the main pipeline (per-stage
overrides: `set:` KEY=VALUE lines, `warm_start:`), the stage whose model a study measures and
the metrics it is about. Every (variant, seed) runs through the pipeline's own stage cache, so a
stage whose resolved config is the same in two variants (the data, the judge, the teachers a
student study does not touch) trains once, and a variant that only changes evaluation
(calibration) trains nothing. A seed re-runs only the stages a study names in `seeded`
(default: the measured one) with `seed=N` (model init and data order); every other stage keeps
the main pipeline's seed. Results are written after each run to `ablations.json` and
`ablations.md` beside the stages: per variant the mean ± std (ddof=1) over seeds of each metric,
the baseline marked and each variant's delta against it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxdistill import config as config_lib
from jaxdistill import pipeline

# The metrics a study may ask for; `rate_gap_A[_given_B]` is |mean predicted P(A) - observed
# rate of A| on test (among candidates where B happened), `ece_H` the expected calibration
# error of head H after calibration fitted on validation.
METRIC_PATTERNS = ("ndcg_at_10", "poor_match_rate_at_10", "kappa", "combined_score",
                   r"auroc_(\w+)", r"rate_gap_([a-z]+)(?:_given_([a-z]+))?", r"ece_(\w+)")
REFERENCE_STAGES = {"ndcg_at_10": "relevance_teacher", "auroc_click": "engagement_teacher"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantStage(_Strict):
    """How a variant changes one stage: extra KEY=VALUE overrides, another warm start."""

    set: list[str] = Field(default_factory=list)
    warm_start: str | None = Field(default=None, description="null: train from scratch")


class Variant(_Strict):
    baseline: bool = False
    measure: str | None = Field(default=None, description="stage measured (default: the study's)")
    stages: dict[str, VariantStage] = Field(default_factory=dict)
    calibration: Literal["position_aware", "global"] = Field(
        default="position_aware", description="how ece_* metrics calibrate the action heads "
        "(an evaluation-only change: nothing retrains)")


class Study(_Strict):
    about: str = Field(description="the claim, one line (the table's caption)")
    measure: str = Field(description="the stage whose model the metrics are of")
    metrics: list[str] = Field(min_length=1)
    seeded: list[str] | None = Field(default=None, description="stages a seed re-runs "
                                     "(default: each variant's measured stage)")
    variants: dict[str, Variant] = Field(min_length=2)

    @model_validator(mode="after")
    def _one_baseline(self):
        baselines = [n for n, v in self.variants.items() if v.baseline]
        if len(baselines) != 1:
            raise ValueError(f"expected exactly one variant with baseline: true, found "
                             f"{baselines or 'none'}")
        return self

    @property
    def baseline(self) -> str:
        return next(n for n, v in self.variants.items() if v.baseline)


class AblationsSpec(_Strict):
    seeds: int = Field(default=3, ge=1)
    studies: dict[str, Study] = Field(min_length=1)


def load_ablations(cfg: pipeline.PipelineConfig, path: Path) -> AblationsSpec:
    """The pipeline's `ablations:` section, checked against its stages (errors name the file,
    the key, what was expected and what was found)."""
    if not cfg.ablations:
        raise config_lib.ConfigError(f"{path}: --ablations needs an `ablations:` section "
                                     "(studies of variants; see configs/job_search/pipeline.yaml)")
    try:
        spec = AblationsSpec.model_validate(cfg.ablations)
    except Exception as err:  # pydantic.ValidationError
        if hasattr(err, "errors"):
            raise config_lib.ConfigError(config_lib.format_errors(
                err, cfg.ablations, f"{path} (ablations)")) from None
        raise
    stages = sorted(cfg.stages)
    for s_name, study in spec.studies.items():
        where = f"{path}: ablations.studies.{s_name}"
        for metric in study.metrics:
            if not any(re.fullmatch(p, metric) for p in METRIC_PATTERNS):
                raise config_lib.ConfigError(
                    f"{where}.metrics: unknown metric {metric!r}; expected one of "
                    f"{list(METRIC_PATTERNS)} (patterns)")
        named = [("measure", study.measure), *(("seeded", s) for s in study.seeded or ())]
        for v_name, variant in study.variants.items():
            named += [(f"variants.{v_name}.measure", variant.measure or study.measure)]
            named += [(f"variants.{v_name}.stages", s) for s in variant.stages]
            named += [(f"variants.{v_name}.stages.{s}.warm_start", v.warm_start)
                      for s, v in variant.stages.items() if v.warm_start]
        for key, stage in named:
            if stage not in cfg.stages and not (key.endswith("warm_start") and
                                                stage == pipeline.JUDGE):
                raise config_lib.ConfigError(f"{where}.{key}: unknown stage {stage!r}; expected "
                                             f"one of the pipeline's stages {stages}")
    return spec


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass
class Run:
    """One (study, variant, seed): the variant's pipeline config and what it measures."""

    study: str
    variant: str
    seed: int
    cfg: pipeline.PipelineConfig
    measure: str
    needed: list[str]  # the stages to run, in the pipeline's order
    calibration: str
    metrics: list[str]


def variant_pipeline(cfg: pipeline.PipelineConfig, study: Study, variant: Variant,
                     seed: int) -> pipeline.PipelineConfig:
    """The main pipeline with a variant's stage overrides and the seed on the seeded stages."""
    measure = variant.measure or study.measure
    seeded = set(study.seeded or [measure])
    stages = {}
    for name, spec in cfg.stages.items():
        change = variant.stages.get(name)
        update: dict[str, Any] = {}
        if change is not None:
            update["set"] = [*spec.set, *change.set]
            if "warm_start" in change.model_fields_set:
                update["warm_start"] = change.warm_start
        if name in seeded:
            update["set"] = [*update.get("set", spec.set), f"seed={seed}"]
        stages[name] = spec.model_copy(update=update) if update else spec
    return cfg.model_copy(update={"stages": stages})


def _closure(cfg: pipeline.PipelineConfig, names: Sequence[str]) -> list[str]:
    """`names` and every stage they read (teachers, warm starts), in the pipeline's order."""
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in wanted or name not in cfg.stages:
            continue
        wanted.add(name)
        spec = cfg.stages[name]
        todo += [*spec.teachers.values(), *([spec.warm_start] if spec.warm_start else [])]
    return [n for n in cfg.stages if n in wanted]


def plan_runs(cfg: pipeline.PipelineConfig, spec: AblationsSpec, seeds: int) -> list[Run]:
    """Every (study, variant, seed), seeds outermost: a run cut short still has each variant."""
    runs = []
    for seed in range(seeds):
        for s_name, study in spec.studies.items():
            for v_name, variant in study.variants.items():
                measure = variant.measure or study.measure
                vcfg = variant_pipeline(cfg, study, variant, seed)
                extra = (list(REFERENCE_STAGES.values()) if "combined_score" in study.metrics
                         else [])
                runs.append(Run(s_name, v_name, seed, vcfg, measure,
                                _closure(vcfg, [measure, *extra]), variant.calibration,
                                list(study.metrics)))
    return runs


def stage_keys(run: Run, base_dir: Path, preset: pipeline.PresetSpec,
               data: pipeline.StageOutput, policy_path: Path, policy_hash: str,
               path: Path) -> dict[str, str]:
    """The cache key of each stage a run needs, resolved without training anything (the
    data stage must exist: stage configs read its tokenizer). A bad override is reported with
    the ablation key that made it."""
    cfg = run.cfg
    upstream: dict[str, pipeline.StageOutput] = {}
    keys = {"data": data.key}
    labelled = data
    if isinstance(cfg.judge, pipeline.StageSpec):
        keyed = pipeline.stage_experiment(cfg, pipeline.JUDGE, base_dir, preset, data,
                                          policy_path, {}, for_key=True)
        keys[pipeline.JUDGE] = pipeline.stage_key(keyed, policy_hash, data.key)
        labelled = dataclasses.replace(data, name=pipeline.JUDGE, key=keys[pipeline.JUDGE])
        upstream[pipeline.JUDGE] = labelled
    for name in run.needed:
        try:
            keyed = pipeline.stage_experiment(cfg, name, base_dir, preset, labelled, policy_path,
                                              upstream, for_key=True)
        except config_lib.ConfigError as err:
            raise config_lib.ConfigError(
                f"{path}: ablations.studies.{run.study}.variants.{run.variant}: stage {name} "
                f"({cfg.stages[name].config}) with overrides {cfg.stages[name].set} is not a "
                f"valid config: {err}") from None
        keys[name] = pipeline.stage_key(keyed, policy_hash, labelled.key)
        upstream[name] = dataclasses.replace(data, name=name, key=keys[name])
    return keys


# ------------------------------------------------------------------------------ metrics


CALIBRATIONS = ("position_aware", "global")


def model_metrics(cfg: pipeline.PipelineConfig, stage: pipeline.StageOutput,
                  experiment: config_lib.Experiment) -> dict[str, Any]:
    """Every metric a study may ask of a trained stage's model, on the held-out splits (test;
    kappa on the golden set; grade thresholds and calibrators fitted on validation):
    {"metrics": {name: value}, "ece": {calibration: {"ece_<head>": value}}}. Computed once per
    stage (one forward over the splits) and cached in its directory, so every study and variant
    that measures a shared stage reads the same numbers."""
    from jaxdistill import calibration as calibration_lib
    from jaxdistill import evaluate

    request_key = pipeline.digest({"evaluate": cfg.evaluate.model_dump(),
                                   "version": pipeline.EVALUATION_VERSION, "ablations": 1})
    cache_path = stage.path / "ablation_metrics.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if request_key in cache:
        return cache[request_key]
    p = pipeline.predict_stage(stage, experiment, cfg.evaluate, main=True)
    action_names = list(experiment.data.action_names)
    test, val = p.outputs["test"], p.outputs["validation"]
    mask, val_mask = test["batch/candidate_mask"] > 0, val["batch/candidate_mask"] > 0
    out: dict[str, float] = {}
    if p.p_yes("test") is not None:
        p_yes, grades = p.p_yes("test"), test["batch/grade"]
        out["ndcg_at_10"] = evaluate.ndcg_at_k(p_yes, grades, mask, cfg.evaluate.k)
        out["poor_match_rate_at_10"] = evaluate.poor_match_rate_at_k(
            p_yes, grades, mask, cfg.evaluate.k, cfg.evaluate.poor_grade)
        thresholds = evaluate.fit_grade_thresholds(p.p_yes("validation"), val["batch/grade"],
                                                   mask=val_mask)
        golden = p.outputs["golden"]
        out["kappa"] = evaluate.kappa_by_dimension(
            evaluate.scores_to_grades(p.p_yes("golden"), thresholds), golden["batch/grade"],
            mask=golden["batch/candidate_mask"] > 0)["overall"]
    probs = p.actions("test")
    if probs is not None:
        labels = test["batch/actions"]
        for i, action in enumerate(action_names):
            valid = (test["batch/action_mask"][..., i] > 0) & mask
            out[f"auroc_{action}"] = evaluate.auroc(probs[..., i], labels[..., i], valid)
            out[f"rate_gap_{action}"] = abs(probs[..., i][valid].mean()
                                            - labels[..., i][valid].mean())
            for j, given in enumerate(action_names):
                where = valid & (labels[..., j] > 0.5)
                if j != i and where.any():
                    out[f"rate_gap_{action}_given_{given}"] = abs(
                        probs[..., i][where].mean() - labels[..., i][where].mean())

    def heads(split, outputs):
        scores, targets = {}, {}
        if p.p_yes(split) is not None:
            scores["relevance"] = p.p_yes(split)
            targets["relevance"] = (outputs["batch/grade"] >= 3).astype(np.float64)
        if p.actions(split) is not None:
            for i, action in enumerate(action_names):
                scores[action] = p.actions(split)[..., i]
                targets[action] = outputs["batch/actions"][..., i]
        return scores, targets

    ece = {}
    for calibration in CALIBRATIONS:
        scores, targets = heads("validation", val)
        aware = tuple(a for a in action_names if a in scores) if calibration == "position_aware" \
            else ()
        calibrators = calibration_lib.calibrate_heads(
            scores, targets, mask=val_mask, positions=val["batch/position"], position_aware=aware)
        scores, targets = heads("test", test)
        summary = calibration_lib.calibration_summary(
            calibrators, scores, targets, mask=mask, positions=test["batch/position"])
        ece[calibration] = {f"ece_{h}": float(s["ece_after"]) for h, s in summary.items()}
    result = {"metrics": {k: float(v) for k, v in out.items()}, "ece": ece}
    cache[request_key] = result
    cache_path.write_text(json.dumps(cache, indent=2))
    return result


def select(measured: Mapping[str, Any], names: Sequence[str], calibration: str,
           stage: str) -> dict[str, float]:
    """The named metrics out of `model_metrics`' result (ece_* under `calibration`)."""
    available = {**measured["metrics"], **measured["ece"][calibration]}
    missing = [n for n in names if n not in available and n != "combined_score"]
    if missing:
        raise ValueError(f"stage {stage}: its model has no metric {missing} (its heads give "
                         f"{sorted(available)})")
    return {n: available[n] for n in names if n in available}


# ------------------------------------------------------------------------------- table


def aggregate(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """{metric: {mean, std (ddof=1; nan for one seed), n, values, seeds}} over the seeds'
    results ({seed: {metric: value}}; a metric a seed lacks counts over the others)."""
    metrics = sorted({k for r in per_seed.values() for k in r})
    out = {}
    for metric in metrics:
        seeds = sorted(s for s, r in per_seed.items() if metric in r)
        values = np.array([per_seed[s][metric] for s in seeds], np.float64)
        out[metric] = {"mean": float(values.mean()),
                       "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                       "n": int(len(values)), "values": values.tolist(), "seeds": seeds}
    return out


def delta_error(stats: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
    """The standard error of a variant's delta against its baseline. Seed N of a variant and
    of its baseline share model init and data order, so over the seeds both have (two or more)
    it is the paired one, std(per-seed differences) / sqrt(n); otherwise that of a difference
    of two independent means, sqrt(std_v^2 / n_v + std_b^2 / n_b). nan: no spread to measure."""
    shared = sorted(set(stats.get("seeds", ())) & set(baseline.get("seeds", ())))
    if len(shared) >= 2:
        by_v = dict(zip(stats["seeds"], stats["values"]))
        by_b = dict(zip(baseline["seeds"], baseline["values"]))
        differences = np.array([by_v[s] - by_b[s] for s in shared])
        return float(differences.std(ddof=1) / np.sqrt(len(shared)))
    return float(np.sqrt(stats["std"] ** 2 / stats["n"] + baseline["std"] ** 2 / baseline["n"]))


def _cell(stats: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None, is_baseline: bool
          ) -> str:
    if not stats:
        return "—"
    std = "" if np.isnan(stats["std"]) else f" ± {stats['std']:.4f}"
    text = f"{stats['mean']:.4f}{std}"
    if baseline and not is_baseline:
        delta = stats["mean"] - baseline["mean"]
        relative = f", {100 * delta / abs(baseline['mean']):+.1f}%" if baseline["mean"] else ""
        error = delta_error(stats, baseline)
        mark = " †" if np.isfinite(error) and abs(delta) > 2 * error else ""
        text += f" (Δ {delta:+.4f}{relative}{mark})"
    return text


def table_markdown(spec: AblationsSpec, results: Mapping[str, Any], *, seeds: int,
                   seconds: float, done: int, total: int) -> str:
    """ablations.md: one table per study, mean ± std over seeds, baseline marked, deltas."""
    from jaxdistill import report

    lines = ["# Ablations: the method's claims, measured", "",
             f"{done} of {total} (variant, seed) runs finished, {seeds} seeds requested; "
             f"{seconds / 60:.1f} min. Each cell: mean ± std over seeds (sample std, ddof=1), "
             "and for a variant its delta against the study's baseline (**bold**); † marks a "
             "delta larger than twice its standard error, i.e. beyond the seed-to-seed spread: "
             "paired by seed (seed N of a variant and of the baseline share model init and "
             "data order), std(per-seed differences)/sqrt(n); without two shared seeds, "
             "sqrt(std_v²/n_v + std_b²/n_b). Held-out "
             "test split; kappa on the golden set; calibration fitted on validation.", "",
             "Shared by every variant and seed: the workload (data) and the judge that labels "
             "it (one simulated world, one judge: a seed varies models, not the world). A seed "
             "re-runs only the stages a study lists as seeded (model init and data order via "
             "`seed=N`); every other stage keeps the main pipeline's seed 0 and is trained once "
             "for all variants that resolve it to the same config.", ""]
    for s_name, study in spec.studies.items():
        seeded = study.seeded or ["the measured stage"]
        lines += [f"## {s_name}", "", f"{study.about} Measured: `{study.measure}` unless a "
                  f"row says otherwise; seeded: {', '.join(seeded)}.", ""]
        study_results = results.get(s_name, {})
        base = study_results.get(study.baseline, {}).get("summary", {})
        rows = []
        order = [study.baseline, *(v for v in study.variants if v != study.baseline)]
        for v_name in order:
            variant = study.variants[v_name]
            entry = study_results.get(v_name, {})
            summary = entry.get("summary", {})
            label = f"**{v_name} (baseline)**" if variant.baseline else v_name
            if variant.measure and variant.measure != study.measure:
                label += f" [`{variant.measure}`]"
            failed = [f"seed {s}" for s, r in sorted(entry.get("seeds", {}).items())
                      if "error" in r]
            n = max((summary[m]["n"] for m in study.metrics if m in summary), default=0)
            rows.append([label, f"{n}/{seeds}" + (f" (failed: {', '.join(failed)})"
                                                  if failed else ""),
                         *(_cell(summary.get(m), base.get(m), variant.baseline)
                           for m in study.metrics)])
        lines += report.table_lines(["variant", "seeds", *study.metrics], rows) + [""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- run


def run_ablations(path: str | Path, preset_name: str = "laptop", workdir: str | Path | None = None,
                  seeds: int | None = None) -> int:
    """Runs every (study, variant, seed); writes ablations.json/.md after each. 0 when all
    ran, 1 when any failed (each failure is reported and the others still run)."""
    from jaxdistill import judge as judge_lib

    path = Path(path)
    cfg, base_dir = pipeline.load_pipeline(path)
    spec = load_ablations(cfg, path)
    if preset_name not in cfg.presets:
        raise config_lib.ConfigError(
            f"{path}: unknown preset {preset_name!r}; presets: {sorted(cfg.presets)}")
    seeds = seeds or spec.seeds
    if seeds < 1:
        raise config_lib.ConfigError(f"--seeds {seeds}: expected a positive number of seeds")
    preset = cfg.presets[preset_name]
    workdir = Path(workdir or cfg.workdir) / preset_name
    policy_path = Path(cfg.policy).resolve()
    policy = judge_lib.load_policy(policy_path)
    started = time.time()

    data = pipeline.prepare_data(cfg, preset, workdir, policy_path, policy.content_hash)
    runs = plan_runs(cfg, spec, seeds)
    for run in runs:  # every override checked before anything trains
        stage_keys(run, base_dir, preset, data, policy_path, policy.content_hash, path)
    labelled = pipeline.run_judge(cfg, base_dir, workdir, preset, data, policy_path,
                                  policy.content_hash)
    results: dict[str, Any] = {}
    json_path, md_path = workdir / "ablations.json", workdir / "ablations.md"
    failures = 0
    for i, run in enumerate(runs):
        run_start = time.time()
        entry = results.setdefault(run.study, {}).setdefault(run.variant, {"seeds": {}})
        try:
            entry["seeds"][run.seed] = _run_one(run, base_dir, workdir, preset, labelled,
                                                policy_path, policy.content_hash)
            status = ", ".join(f"{k} {v:.4f}" for k, v in entry["seeds"][run.seed].items()
                               if k in run.metrics)
        except (Exception, SystemExit) as err:  # one variant's failure is not the table's
            failures += 1
            entry["seeds"][run.seed] = {"error": f"{type(err).__name__}: {err}"}
            status = f"FAILED: {type(err).__name__}: {err}"
        entry["summary"] = aggregate({seed: {k: r[k] for k in run.metrics if k in r}
                                      for seed, r in entry["seeds"].items() if "error" not in r})
        elapsed = time.time() - started
        eta = elapsed / (i + 1) * (len(runs) - i - 1)
        print(f"[ablate] ({i + 1}/{len(runs)}) {run.study}/{run.variant} seed {run.seed}: "
              f"{time.time() - run_start:.0f}s, {status}; elapsed {elapsed / 60:.1f} min, "
              f"ETA {eta / 60:.1f} min", flush=True)
        _write(json_path, md_path, spec, results, seeds=seeds, started=started, done=i + 1,
               total=len(runs), preset=preset_name)
    print(f"\nAblations: {md_path} ({json_path}); {failures} of {len(runs)} runs failed; "
          f"{(time.time() - started) / 60:.1f} min")
    print(md_path.read_text())
    return 1 if failures else 0


def _run_one(run: Run, base_dir: Path, workdir: Path, preset: pipeline.PresetSpec,
             labelled: pipeline.StageOutput, policy_path: Path, policy_hash: str
             ) -> dict[str, float]:
    """Trains (or reuses) the stages a run needs and measures its model."""
    stages: dict[str, pipeline.StageOutput] = {}
    if labelled.name == pipeline.JUDGE:
        stages[pipeline.JUDGE] = dataclasses.replace(labelled, path=labelled.path.parent)
    for name in run.needed:
        stages[name] = pipeline.run_stage(run.cfg, name, base_dir, workdir, preset, labelled,
                                          policy_path, policy_hash, stages)
    measured = stages[run.measure]
    metrics = model_metrics(run.cfg, measured, measured.experiment)
    values = select(metrics, run.metrics, run.calibration, run.measure)
    if "combined_score" in run.metrics:
        from jaxdistill import evaluate

        references = {metric: select(model_metrics(run.cfg, stages[s], stages[s].experiment),
                                     [metric], run.calibration, s)[metric]
                      for metric, s in REFERENCE_STAGES.items()}
        values["combined_score"] = evaluate.relative_score(metrics["metrics"], references)
    values["stage_key"] = measured.key  # type: ignore[assignment]
    return values


def _write(json_path: Path, md_path: Path, spec: AblationsSpec, results: Mapping[str, Any], *,
           seeds: int, started: float, done: int, total: int, preset: str) -> None:
    seconds = time.time() - started
    payload = {"preset": preset, "seeds": seeds, "seconds": seconds, "done": done,
               "total": total, "studies": results,
               "baselines": {s: study.baseline for s, study in spec.studies.items()}}
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    md_path.write_text(table_markdown(spec, results, seeds=seeds, seconds=seconds, done=done,
                                      total=total))


def main(config: str, preset: str = "laptop", workdir: str | None = None,
         seeds: int | None = None) -> int:
    return run_ablations(config, preset, workdir, seeds)
