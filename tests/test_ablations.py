"""The ablation runner: its table's statistics, how variants resolve into stage configs and cache
keys (nothing trains here), and its errors for a bad ablations section."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from test_pipeline_stages import tiny_pipeline

from jaxdistill import ablations, cli, pipeline
from jaxdistill import judge as judge_lib

STUDIES = {
    "labels": {"about": "soft vs hard.", "measure": "relevance_teacher",
               "metrics": ["ndcg_at_10", "kappa"],
               "variants": {"soft": {"baseline": True},
                            "hard": {"stages": {"relevance_teacher": {"set": [
                                "objective.0.label_transform=grades_argmax_to_yes_no"]}}}}},
    "student": {"about": "warm vs scratch.", "measure": "student",
                "metrics": ["ndcg_at_10", "auroc_click", "combined_score"],
                "variants": {"warm": {"baseline": True},
                             "scratch": {"stages": {"student": {"warm_start": None}}},
                             "masked": {"stages": {"student": {"set": [
                                 "objective.1.given={apply: click}"]}}},
                             "global_calibration": {"calibration": "global"}}},
}


def with_ablations(path, studies, seeds=2, out=None):
    """`path` with an ablations section, written to `out` (default: over `path`)."""
    spec = yaml.safe_load(path.read_text())
    spec["ablations"] = {"seeds": seeds, "studies": studies}
    out = out or path
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """A tiny pipeline file with the ablations above, loaded (nothing prepared)."""
    tmp = tmp_path_factory.mktemp("ablate")
    path = with_ablations(tiny_pipeline(tmp), STUDIES)
    cfg, base_dir = pipeline.load_pipeline(path)
    return {"path": path, "cfg": cfg, "base_dir": base_dir, "preset": cfg.presets["tiny"],
            "tmp": tmp, "policy_path": Path(cfg.policy).resolve()}


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    """`tiny_cfg` with its data stage prepared: stage configs read the workload's tokenizer."""
    policy = judge_lib.load_policy(tiny_cfg["policy_path"])
    data = pipeline.prepare_data(tiny_cfg["cfg"], tiny_cfg["preset"],
                                 tiny_cfg["tmp"] / "runs" / "tiny", tiny_cfg["policy_path"],
                                 policy.content_hash)
    return {**tiny_cfg, "data": data, "policy_hash": policy.content_hash}


def test_aggregate_is_mean_and_sample_std_over_seeds():
    per_seed = {0: {"ndcg_at_10": 0.71, "kappa": 0.40}, 1: {"ndcg_at_10": 0.74, "kappa": 0.52},
                2: {"ndcg_at_10": 0.69}}  # a metric a seed lacks counts over the others
    stats = ablations.aggregate(per_seed)
    np.testing.assert_allclose(stats["ndcg_at_10"]["mean"], np.mean([0.71, 0.74, 0.69]))
    np.testing.assert_allclose(stats["ndcg_at_10"]["std"], np.std([0.71, 0.74, 0.69], ddof=1))
    np.testing.assert_allclose(stats["kappa"]["std"], np.std([0.40, 0.52], ddof=1))
    assert stats["kappa"]["n"] == 2 and stats["ndcg_at_10"]["values"] == [0.71, 0.74, 0.69]
    assert stats["kappa"]["seeds"] == [0, 1]
    assert np.isnan(ablations.aggregate({0: {"kappa": 0.5}})["kappa"]["std"])  # no spread


def test_table_marks_the_baseline_and_gives_each_variant_its_delta(tiny_cfg):
    spec = ablations.load_ablations(tiny_cfg["cfg"], tiny_cfg["path"])
    results = {"labels": {
        "soft": {"seeds": {0: {}, 1: {}},
                 "summary": ablations.aggregate({0: {"ndcg_at_10": 0.5, "kappa": 0.4},
                                                 1: {"ndcg_at_10": 0.7, "kappa": 0.6}})},
        "hard": {"seeds": {0: {}, 1: {"error": "ValueError: boom"}},
                 "summary": ablations.aggregate({0: {"ndcg_at_10": 0.45, "kappa": 0.3}})}}}
    text = ablations.table_markdown(spec, results, seeds=2, seconds=60, done=4, total=4)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1] == "| **soft (baseline)** | 2/2 | 0.6000 ± 0.1414 | 0.5000 ± 0.1414 |"
    assert rows[2] == ("| hard | 1/2 (failed: seed 1) | 0.4500 (Δ -0.1500, -25.0%) "
                       "| 0.3000 (Δ -0.2000, -40.0%) |")
    assert "| **warm (baseline)** | 0/2 | — | — | — |" in text  # not run yet

    def hard_row(per_seed):
        results["labels"]["hard"]["summary"] = ablations.aggregate(per_seed)
        return next(line for line in ablations.table_markdown(
            spec, results, seeds=2, seconds=60, done=4, total=4).splitlines()
            if line.startswith("| hard"))

    # Without two seeds in common, † where the delta exceeds twice the standard error of two
    # independent means: NDCG 0.2 ± 0.01 over 3 seeds vs 0.6 ± 0.1414 over 2 (error
    # sqrt(0.01**2 / 3 + 0.1414**2 / 2) = 0.1002, delta 0.4); kappa 0.45 ± 0.15 over 3 vs
    # 0.5 ± 0.1414 (error 0.1323, delta 0.05).
    row = hard_row({s: {"ndcg_at_10": n, "kappa": k}
                    for s, n, k in ((2, 0.19, 0.3), (3, 0.2, 0.45), (4, 0.21, 0.6))})
    assert "| 0.2000 ± 0.0100 (Δ -0.4000, -66.7% †) | 0.4500 ± 0.1500 (Δ -0.0500, -10.0%) |" \
        in row
    # Paired by seed: a variant 0.02 / 0.01 above the baseline on each of its seeds is beyond
    # the spread of the differences (std 0.0071 / sqrt 2), though far inside each one's own.
    row = hard_row({0: {"ndcg_at_10": 0.52, "kappa": 0.5}, 1: {"ndcg_at_10": 0.71, "kappa": 0.5}})
    assert "| 0.6150 ± 0.1344 (Δ +0.0150, +2.5% †) |" in row
    assert "| 0.5000 ± 0.0000 (Δ +0.0000, +0.0%) |" in row  # the differences' spread: 0.1
    np.testing.assert_allclose(ablations.delta_error(
        results["labels"]["hard"]["summary"]["ndcg_at_10"],
        results["labels"]["soft"]["summary"]["ndcg_at_10"]), np.std([0.02, 0.01], ddof=1) / 2**0.5)
    assert "Shared by every variant and seed: the workload (data) and the judge" in text


# Slow: the tiny workload's data stage is prepared once for the module (tfds writes, a
# tokenizer trained): ~20 s on a loaded 2-core machine. Nothing trains.
@pytest.mark.slow
def test_variants_resolve_into_stage_configs_and_share_cache_keys(tiny):
    cfg, spec = tiny["cfg"], ablations.load_ablations(tiny["cfg"], tiny["path"])
    runs = ablations.plan_runs(cfg, spec, 2)
    assert [(r.seed, r.study, r.variant) for r in runs[:3]] == [
        (0, "labels", "soft"), (0, "labels", "hard"), (0, "student", "warm")]  # seeds outermost
    by = {(r.study, r.variant, r.seed): r for r in runs}
    assert by["labels", "soft", 0].needed == ["relevance_teacher"]  # no student for a teacher
    assert sorted(by["student", "warm", 0].needed) == ["engagement_teacher",
                                                       "relevance_teacher", "student"]
    keys = {k: ablations.stage_keys(r, tiny["base_dir"], tiny["preset"], tiny["data"],
                                    tiny["policy_path"], tiny["policy_hash"], tiny["path"])
            for k, r in by.items()}

    def experiment(run, stage):
        upstream = {s: pipeline.StageOutput(s, keys[run][s], tiny["data"].path, False, 0.0)
                      for s in (*by[run].needed, pipeline.JUDGE)}
        labelled = upstream[pipeline.JUDGE]
        return pipeline.stage_experiment(by[run].cfg, stage, tiny["base_dir"], tiny["preset"],
                                         labelled, tiny["policy_path"], upstream, for_key=True)

    # The overrides land in the stage they name, and the seed in the seeded stage only.
    hard = experiment(("labels", "hard", 1), "relevance_teacher")
    assert hard.objective[0].label_transform == "grades_argmax_to_yes_no" and hard.seed == 1
    assert experiment(("labels", "soft", 1), "relevance_teacher").objective[0].label_transform \
        == "grades_to_yes_no"
    assert experiment(("student", "scratch", 0), "student").model.warm_start is None
    warm = experiment(("student", "warm", 1), "student")
    assert str(warm.model.warm_start).startswith("run:") and warm.seed == 1
    assert experiment(("student", "warm", 1), "relevance_teacher").seed == 0
    assert experiment(("student", "masked", 0), "student").objective[1].given_columns == ((0, 1),)

    # Shared stages: one key for every variant and seed; seeded stages: one per seed.
    for stage in ("data", "judge", "engagement_teacher"):
        assert len({k[stage] for k in keys.values() if stage in k}) == 1
    assert len({keys["student", v, 0]["relevance_teacher"] for v in
                ("warm", "scratch", "masked")}) == 1
    assert keys["student", "warm", 0]["relevance_teacher"] == keys["labels", "soft", 0][
        "relevance_teacher"]
    assert keys["labels", "hard", 0]["relevance_teacher"] != keys["labels", "soft", 0][
        "relevance_teacher"]
    assert keys["labels", "soft", 0]["relevance_teacher"] != keys["labels", "soft", 1][
        "relevance_teacher"]
    students = {(v, s): keys["student", v, s]["student"]
                for v in ("warm", "scratch", "masked") for s in (0, 1)}
    assert len(set(students.values())) == 6
    # An evaluation-only variant trains nothing new: the baseline's stages at every seed.
    for seed in (0, 1):
        assert keys["student", "global_calibration", seed] == keys["student", "warm", seed]
    # Seed 0 of the baseline is the main pipeline's own stages (the same keys as a plain run).
    main = ablations.Run("main", "main", 0, cfg, "student",
                         ["relevance_teacher", "engagement_teacher", "student"], "", [])
    assert ablations.stage_keys(main, tiny["base_dir"], tiny["preset"], tiny["data"],
                                tiny["policy_path"], tiny["policy_hash"], tiny["path"]) \
        == keys["student", "warm", 0]


@pytest.mark.parametrize("studies, expected", [
    ({"x": {"about": ".", "measure": "student", "metrics": ["ndcg_at_10"],
            "variants": {"a": {"baseline": True},
                         "b": {"stages": {"studnet": {"set": ["seed=1"]}}}}}},
     "ablations.studies.x.variants.b.stages: unknown stage 'studnet'; expected one of the "
     "pipeline's stages ['engagement_teacher', 'relevance_teacher', 'student']"),
    ({"x": {"about": ".", "measure": "student", "metrics": ["ndcg_at_11"],
            "variants": {"a": {"baseline": True}, "b": {}}}},
     "ablations.studies.x.metrics: unknown metric 'ndcg_at_11'"),
    ({"x": {"about": ".", "measure": "student", "metrics": ["kappa"],
            "variants": {"a": {}, "b": {}}}},
     "expected exactly one variant with baseline: true"),
])
def test_a_bad_ablation_exits_2_naming_the_file_and_the_key(tiny_cfg, capsys, studies, expected):
    assert _bad_ablation(tiny_cfg, studies, capsys) == 2
    err = capsys.readouterr().err
    assert str(tiny_cfg["path"].with_name("bad.yaml")) in err and expected in err


def _bad_ablation(tiny_cfg, studies, capsys):
    path = with_ablations(tiny_cfg["path"], studies, out=tiny_cfg["path"].with_name("bad.yaml"))
    return cli.main(["pipeline", str(path), "--preset", "tiny", "--ablations",
                     "--workdir", str(tiny_cfg["tmp"] / "runs")])


@pytest.mark.slow  # the module's data stage (see above); nothing trains
def test_a_bad_override_exits_2_before_anything_trains(tiny, capsys):
    studies = {"x": {"about": ".", "measure": "student", "metrics": ["kappa"],
                     "variants": {"a": {"baseline": True}, "b": {"stages": {"student": {
                         "set": ["objective.0.wieght=0.3"]}}}}}}
    assert _bad_ablation(tiny, studies, capsys) == 2
    err = capsys.readouterr().err
    assert str(tiny["path"].with_name("bad.yaml")) in err
    assert ("ablations.studies.x.variants.b: stage student (student.yaml) with overrides "
            "['objective.0.wieght=0.3', 'seed=0'] is not a valid config") in err
    assert "objective[0].wieght: unknown key; did you mean 'weight'?" in err  # the stage's own
    assert not (tiny["tmp"] / "runs" / "tiny" / "judge").exists()  # nothing trained


def test_seeds_without_ablations_is_refused(tiny_cfg, capsys):
    assert cli.main(["pipeline", str(tiny_cfg["path"]), "--preset", "tiny", "--seeds", "2"]) == 2
    assert "--seeds N is the number of seeds of --ablations" in capsys.readouterr().err


def test_select_reads_ece_under_the_variants_calibration_and_names_what_is_missing():
    measured = {"metrics": {"ndcg_at_10": 0.7, "auroc_click": 0.6},
                "ece": {"position_aware": {"ece_click": 0.01}, "global": {"ece_click": 0.03}}}
    assert ablations.select(measured, ["ece_click", "ndcg_at_10"], "global", "student") == {
        "ece_click": 0.03, "ndcg_at_10": 0.7}
    assert ablations.select(measured, ["ece_click"], "position_aware", "s")["ece_click"] == 0.01
    with pytest.raises(ValueError, match=r"stage student_engagement_only: its model has no "
                                         r"metric \['kappa'\]"):
        ablations.select(measured, ["kappa"], "global", "student_engagement_only")
