"""The job-search pipeline's stage cache: what re-runs after an edit, and what does not."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxdistill import judge as judge_lib
from jaxdistill import pipeline

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "job_search"

TINY_MODEL = [
    "model.backbone.hidden=16", "model.backbone.layers=1", "model.backbone.heads=2",
    "model.backbone.kv_heads=1", "model.backbone.head_dim=8", "model.backbone.mlp=32",
]


def tiny_pipeline(tmp_path: Path) -> Path:
    """The real stage configs and policy, with a tiny preset and three stages."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO_CONFIGS, configs)
    spec = yaml.safe_load((configs / "pipeline.yaml").read_text())
    spec["stages"] = {k: spec["stages"][k]
                      for k in ("relevance_teacher", "engagement_teacher", "student")}
    spec["tokenizer_vocab_size"] = 200
    spec["evaluate"] = {"list_size": 4, "batch_size": 3, "throughput_queries": 2}
    spec["presets"] = {"tiny": {
        "workload": {"preset": "laptop", "n_members": 120, "n_jobs": 120, "train_queries": 24,
                     "validation_queries": 4, "test_queries": 4, "golden_queries": 4,
                     "golden_train_queries": 4, "list_size": 4},
        "set": ["trainer.steps=1", "optimizer.total_steps=1", "optimizer.warmup_steps=0",
                "trainer.log_every=1", "trainer.eval_every=1", "trainer.eval_batches=1",
                "checkpoint.every=1", "data.max_len=24", "data.list_size=4",
                "data.batch_size=8", "trainer.progress=false", "logging.tensorboard=false",
                *TINY_MODEL],
    }}
    (configs / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    return configs / "pipeline.yaml"


def prepared_tiny_pipeline(tmp_path: Path):
    """(cfg, base_dir, tiny preset, policy path, its data stage) of `tiny_pipeline`."""
    cfg, base_dir = pipeline.load_pipeline(tiny_pipeline(tmp_path))
    preset = cfg.presets["tiny"]
    policy_path = Path(cfg.policy).resolve()
    policy_hash = judge_lib.load_policy(policy_path).content_hash
    data = pipeline.prepare_data(cfg, preset, tmp_path / "runs", policy_path, policy_hash)
    return cfg, base_dir, preset, policy_path, data


def _row(summary, model):
    return next(row for row in summary["models"] if row["model"] == model)


def rerun(path: Path, workdir: Path) -> dict[str, tuple[str, bool]]:
    """{stage: (key, reused from cache)}; evaluation is not run, only keyed."""
    stages = pipeline.run(path, "tiny", workdir, evaluate=False)["stages"]
    return {name: (out["key"], out["cached"]) for name, out in stages.items()}


@pytest.mark.slow
def test_editing_a_stage_reruns_only_what_depends_on_it(tmp_path):
    path, workdir = tiny_pipeline(tmp_path), tmp_path / "runs"
    first = rerun(path, workdir)
    assert not any(cached for _, cached in first.values())

    again = rerun(path, workdir)  # nothing changed: the same keys, every stage reused
    assert {n: k for n, (k, _) in again.items()} == {n: k for n, (k, _) in first.items()}
    assert all(cached for name, (_, cached) in again.items() if name != "evaluation")

    assert set(first) == {"data", "judge", "relevance_teacher", "engagement_teacher", "student",
                          "evaluation"}

    engagement = path.parent / "engagement_teacher.yaml"
    edit = engagement.read_text().replace("learning_rate: 3.0e-5", "learning_rate: 4.0e-5")
    assert edit != engagement.read_text()
    engagement.write_text(edit)
    edited = rerun(path, workdir)
    changed = {name for name in edited if edited[name][0] != first[name][0]}
    assert changed == {"engagement_teacher", "student", "evaluation"}
    assert edited["relevance_teacher"][1] and edited["data"][1] and edited["judge"][1]  # reused
    assert not edited["engagement_teacher"][1] and not edited["student"][1]  # retrained

    relevance = path.parent / "relevance_teacher.yaml"  # a teacher never re-runs the judge
    relevance.write_text(relevance.read_text().replace("weight: 0.5", "weight: 0.4"))
    edited_relevance = rerun(path, workdir)
    changed = {n for n in edited_relevance if edited_relevance[n][0] != edited[n][0]}
    assert changed == {"relevance_teacher", "student", "evaluation"}
    assert edited_relevance["judge"][1]

    spec = yaml.safe_load(path.read_text())  # a bigger golden set: a new judge, new labels
    spec["presets"]["tiny"]["workload"]["golden_train_queries"] = 6
    path.write_text(yaml.safe_dump(spec))
    regolden = rerun(path, workdir)
    assert all(regolden[n][0] != edited_relevance[n][0] for n in regolden)
    edited = regolden

    policy = path.parent / "policy.md"
    policy.write_text(policy.read_text().replace("thresholds: [1.0, 1.9, 2.7, 3.5]",
                                                 "thresholds: [1.0, 2.0, 2.7, 3.5]"))
    relabelled = rerun(path, workdir)
    assert all(relabelled[n][0] != edited[n][0] for n in relabelled)
    assert not any(cached for _, cached in relabelled.values())

    # Evaluation and report on the trained stages (4 test queries in batches of 3, so the
    # short last batch is scored too): the targets judged, the report written, then reused.
    summary = pipeline.run(path, "tiny", workdir)
    student = next(row for row in summary["models"] if row["model"] == "student")
    assert 0 <= student["ndcg_at_10"] <= 1 and 0 <= student["auroc_click"] <= 1
    assert {t["name"] for t in summary["targets"]} >= {"student params / teacher params"}
    report_dir = Path(summary["report"]).parent
    assert (report_dir / "report.md").read_text().startswith("# Job search")
    assert all((report_dir / png).stat().st_size > 1000 for png in
               ("training_curves.png", "models_vs_metrics.png", "calibration.png"))
    evaluation = json.loads((report_dir / "evaluation.json").read_text())
    assert evaluation["headline"]["student NDCG@10"] == student["ndcg_at_10"]
    # The judge that labelled the teachers' data, with its held-out kappa per dimension.
    assert evaluation["judge"]["judge"].startswith("judge (fine-tuned decoder")
    assert set(evaluation["judge"]["kappa"]) == {"overall", *judge_lib.DIMENSIONS}
    baseline = next(r for r in summary["models"] if r["model"] == "position-only baseline")
    assert 0 <= baseline["auroc_click"] <= 1
    assert student["combined_score"] == pytest.approx(0.5 * (
        student["ndcg_at_10"] / _row(summary, "relevance_teacher")["ndcg_at_10"]
        + student["auroc_click"] / _row(summary, "engagement_teacher")["auroc_click"]))
    assert student["forward_flops_per_item"] > 0
    report_md = (report_dir / "report.md").read_text()
    assert "position-only baseline" in report_md and "disagree most" in report_md
    assert len(evaluation["disagreements"]) == 10
    assert pipeline.run(path, "tiny", workdir)["stages"]["evaluation"]["cached"]


def test_unknown_preset_and_stage_errors_name_the_file(tmp_path):
    path = tiny_pipeline(tmp_path)
    with pytest.raises(Exception, match="unknown preset 'huge'"):
        pipeline.run(path, "huge", tmp_path / "runs", evaluate=False)
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["student"]["warm_start"] = "nonexistent"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(Exception, match=r"pipeline.yaml: stages.student depends on unknown"):
        pipeline.load_pipeline(path)
    spec["stages"]["student"]["warm_start"] = "relevance_teacher"
    spec["evaluate"]["throughput_batches"] = 4  # the hint walks the pipeline's schema
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(Exception, match=r"evaluate.throughput_batches: unknown key; did you "
                                        r"mean 'throughput_queries'\?"):
        pipeline.load_pipeline(path)


def test_the_full_preset_resolves_every_stage_at_realistic_sizes(tmp_path):
    """`--preset full` needs an accelerator to run, so here each of its stages (the real
    pipeline.yaml and stage configs) is resolved, validated and built abstractly: the judge
    and teachers at the preset's teacher size, the students at its student size and at most a
    quarter of a teacher's weights (the report's target), every stage at the preset's steps
    and numerics, the students reading both teachers in the preset's teacher dtype."""
    from jaxdistill.loader import model_config
    from jaxdistill.models.model import count_params, functional

    *_, policy_path, data = prepared_tiny_pipeline(tmp_path)  # a tokenizer and logs to read
    cfg, base_dir = pipeline.load_pipeline(REPO_CONFIGS / "pipeline.yaml")
    preset = cfg.presets["full"]
    upstream = {name: pipeline.StageOutput(name, f"{name}-key", tmp_path / name, False, 0.0)
                for name in (pipeline.JUDGE, *cfg.stages)}
    params = {}
    for name in (pipeline.JUDGE, *cfg.stages):
        experiment = pipeline.stage_experiment(cfg, name, base_dir, preset, data, policy_path,
                                               upstream, for_key=True)
        backbone = experiment.model.backbone
        assert (experiment.trainer.steps, experiment.optimizer.total_steps) == (20000, 20000)
        assert (experiment.data.batch_size, experiment.data.max_len) == (64, 128)
        assert (backbone.dtype, backbone.remat) == ("bfloat16", "full")
        teacher_stage = name == pipeline.JUDGE or not cfg.stages[name].teachers
        assert backbone.hidden == (1024 if teacher_stage else 512), name
        assert backbone.layers == (16 if teacher_stage else 8), name
        for teacher in experiment.teachers.values():
            if str(teacher.source).startswith("run:"):
                assert teacher.dtype == "bfloat16"
        params[name] = count_params(functional(model_config(experiment.model)).shapes)
    assert params["relevance_teacher"] > 150e6  # 16 layers of 1024
    for student in ("student", "student_relevance_only", "student_engagement_only"):
        assert params[student] / params["relevance_teacher"] <= 0.25, student


def test_teachers_warm_start_from_the_judge_unless_the_oracle_labels(tmp_path):
    cfg, base_dir, preset, policy_path, data = prepared_tiny_pipeline(tmp_path)
    judge_run = pipeline.StageOutput("judge", "judgekey", tmp_path / "judge_run", False, 0.0)

    def experiment(upstream, for_key=False):
        return pipeline.stage_experiment(cfg, "relevance_teacher", base_dir, preset, data,
                                         policy_path, upstream, for_key=for_key)

    assert str(experiment({"judge": judge_run}).model.warm_start) == f"run:{judge_run.path}"
    assert str(experiment({"judge": judge_run}, for_key=True).model.warm_start) == "run:judgekey"
    # Its per-dimension labels are an offline teacher reading the stage's own records.
    assert str(experiment({}).teachers["judge"].source) == f"offline:{data.path / 'records'}"
    assert experiment({}).model.warm_start is None  # judge: oracle, no judge model


def test_action_heads_start_from_the_logged_position_rates(tmp_path):
    """The pipeline fills an action head's `position_prior` with each action's rate at each
    logged position of the train split (counted as the position-only baseline counts)."""
    from jaxdistill import evaluate

    cfg, base_dir, preset, policy_path, data = prepared_tiny_pipeline(tmp_path)
    # The relevance-only student: no engagement side, so no fit on the member features.
    cfg.stages["student_relevance_only"] = pipeline.StageSpec(
        config="student_relevance_only.yaml", teachers={"relevance_teacher": "relevance_teacher"})
    teachers = {"relevance_teacher": pipeline.StageOutput(
        "relevance_teacher", "key", tmp_path / "relevance_teacher", False, 0.0)}
    head = pipeline.stage_experiment(cfg, "student_relevance_only", base_dir, preset, data,
                                     policy_path, teachers, for_key=False).model.heads["actions"]
    assert head.feature_prior is None
    records = pipeline._read_split(data.path / "records", "train")
    candidates = [c for r in records for c in r["candidates"]]
    click = evaluate.position_rates([c["position"] for c in candidates],
                                    [c["actions"]["click"] for c in candidates])
    rates = np.asarray(head.position_prior)
    assert rates.shape == (3, head.position_buckets)  # apply, click, dismiss x 20 buckets
    # Lists of 4: positions past the last seen one take its rate.
    np.testing.assert_allclose(rates[1], np.clip(np.r_[click, [click[-1]] * 16], 1e-4, 1),
                               atol=1e-5)


def test_engagement_teacher_starts_from_a_logistic_fit_of_the_logs(tmp_path):
    """Without a warm start to probe (`judge: oracle`), `pooled_prior: []` has the pipeline fit
    each action on the train logs' position and member features: the head's starting logits
    fit the logs better than the position rates alone (log-loss on train), position_prior /
    feature_prior have the head's shapes, and the pooled state's rows start at zero."""
    cfg, base_dir, preset, policy_path, data = prepared_tiny_pipeline(tmp_path)
    head = pipeline.stage_experiment(cfg, "engagement_teacher", base_dir, preset, data,
                                     policy_path, {}, for_key=False).model.heads["actions"]
    counted = pipeline.logged_position_rates(data.path / "records", head.names,
                                             head.position_buckets)
    records = pipeline._read_split(data.path / "records", "train")
    rows = [(min(c["position"], head.position_buckets - 1), r["member_features"], c["actions"])
            for r in records for c in r["candidates"]]
    assert np.shape(head.feature_prior) == (3, head.features)
    assert head.pooled_prior is None
    log_odds = lambda p: np.log(np.asarray(p) / (1 - np.asarray(p)))  # noqa: E731
    for k, name in enumerate(head.names):
        y = np.array([actions[name] for _, _, actions in rows])
        positions = np.array([p for p, _, _ in rows])
        features = np.array([f for _, f, _ in rows])
        fit = log_odds(np.asarray(head.position_prior[k])[positions]) + features @ np.asarray(
            head.feature_prior[k])
        only = log_odds(np.asarray(counted[k])[positions])
        loss = lambda z: np.mean(np.logaddexp(0, z) - y * z)  # noqa: E731
        assert loss(fit) < loss(only), name


@pytest.mark.slow
def test_engagement_teacher_starts_at_a_linear_probe_of_the_judge(tmp_path, monkeypatch):
    """`pooled_prior: []` with a warm start: the pipeline fits each action on the judge's
    pooled states, the logged position and the member features (train split), and the stage's
    model starts at exactly that fit: its initial logits on the train lists are a sklearn
    logistic fit's decision function at one of the probe's L2 strengths. A stage that is
    already trained is reused without probing again."""
    from sklearn.linear_model import LogisticRegression

    from jaxdistill import loader, parallel
    from jaxdistill.data.batches import split_batches
    from jaxdistill.evaluator import Evaluator
    from jaxdistill.models.model import functional

    cfg, base_dir, preset, policy_path, data = prepared_tiny_pipeline(tmp_path)
    policy_hash = judge_lib.load_policy(policy_path).content_hash
    workdir = tmp_path / "runs"
    labelled = pipeline.run_judge(cfg, base_dir, workdir, preset, data, policy_path, policy_hash)
    upstream = {"judge": pipeline.StageOutput("judge", labelled.key, labelled.path.parent,
                                              False, 0.0)}
    experiment = pipeline.stage_experiment(cfg, "engagement_teacher", base_dir, preset,
                                           labelled, policy_path, upstream, for_key=False)
    head = experiment.model.heads["actions"]
    width = experiment.model.backbone.hidden
    assert np.shape(head.pooled_prior) == (3, width)

    mesh = parallel.make_mesh(experiment.mesh.shape)
    rules = dict(experiment.mesh.rules)
    model = functional(loader.model_config(experiment.model))
    start = loader.initial_params(experiment, model, mesh, rules)
    whole = pipeline._with_data(experiment, list_size=4)  # the tiny workload's lists

    def train_outputs(fn, params):
        return Evaluator(fn, mesh=mesh, rules=rules).run(
            params, {}, split_batches(whole, "train", train=False, shard=False))

    scores = train_outputs(model, start)
    judge_model, judge_params, _ = pipeline._stage_model(upstream["judge"], experiment)
    pooled = train_outputs(judge_model, judge_params).student["pooled"]
    np.testing.assert_allclose(scores.student["pooled"], pooled, atol=1e-5)  # warm-started
    f = scores.fields
    q, n = f["position"].shape
    x = np.concatenate([np.eye(head.position_buckets)[f["position"]],
                        np.broadcast_to(f["member_features"][:, None], (q, n, head.features)),
                        pooled.astype(np.float64)], -1)
    fitted = 0
    for k, name in enumerate(head.names):
        known = (f["action_mask"][..., k] > 0) & (f["candidate_mask"] > 0)
        labels, logits = f["actions"][..., k][known], scores.student["actions"][..., k][known]
        if len(np.unique(labels)) < 2:  # nothing to fit: the logged rate everywhere
            np.testing.assert_allclose(logits, logits[0], atol=1e-5)
            continue
        fits = [LogisticRegression(C=c, max_iter=3000).fit(x[known], labels).decision_function(
            x[known]) for c in pipeline.PROBE_C]
        assert min(np.abs(fit - logits).max() for fit in fits) < 1e-3, name
        fitted += 1
    assert fitted >= 1  # the tiny logs hold clicks
    # With rare-action masking the probe fits apply where a click happened: P(apply | click),
    # above the rate over every candidate (every apply follows a click).
    apply = head.names.index("apply")
    assert f["actions"][..., apply].sum() > 0
    masked = pipeline.linear_probe(upstream["judge"], experiment, head.names,
                                   head.position_buckets, given={"apply": "click"})
    assert np.mean(masked[0][apply]) > np.mean(head.position_prior[apply])

    pipeline.run_stage(cfg, "engagement_teacher", base_dir, workdir, preset, labelled,
                       policy_path, policy_hash, upstream)
    monkeypatch.setattr(pipeline, "linear_probe", lambda *a: pytest.fail("probed again"))
    again = pipeline.run_stage(cfg, "engagement_teacher", base_dir, workdir, preset, labelled,
                               policy_path, policy_hash, upstream)
    assert again.cached
