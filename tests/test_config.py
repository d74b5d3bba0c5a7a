"""Config loading: every error names the file, the key path, what was expected and what was found."""

from pathlib import Path

import pytest
import yaml

from jaxdistill.config import ConfigError, load_config, resolved_yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
STUDENT = EXAMPLES / "student.yaml"


def error(path=STUDENT, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_examples_load():
    for name in ("relevance_teacher", "engagement_teacher", "student"):
        cfg = load_config(EXAMPLES / f"{name}.yaml")
        assert cfg.name == name
        assert cfg.model.backbone.hidden == 32  # from base.yaml


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("override, expected", [
    ("nmae=x", "nmae: unknown key; did you mean 'name'?"),
    ("trainer.stepz=3", "trainer.stepz: unknown key; did you mean 'steps'?"),
    ("model.backbone.hiden=3", "model.backbone.hiden: unknown key; did you mean 'hidden'?"),
    ("model.heads.relevance.token_idz=[1]",
     "model.heads.relevance.token_idz: unknown key; did you mean 'token_ids'?"),
    ("model.heads.actions.featurs=2", "model.heads.actions.featurs: unknown key; did you mean 'features'?"),
    ("teachers.relevance.sorce=x", "teachers.relevance.sorce: unknown key; did you mean 'source'?"),
    ("objective.0.maks=candidate_mask", "objective[0].maks: unknown key; did you mean 'mask'?"),
    ("objective.0.weight={kind: linear, strt: 1}",
     "objective[0].weight.strt: unknown key; did you mean 'start'?"),
    ("trainer.zzzz=1", "trainer.zzzz: unknown key; valid keys: eval_batches, eval_every"),
])
def test_unknown_key_suggests_nearest(override, expected):
    message = error(overrides=[override])
    assert message.startswith(f"{STUDENT}: invalid config (1 error(s))")
    assert expected in message


def test_unknown_key_in_file_names_file(tmp_path):
    base = yaml.safe_load(STUDENT.read_text())
    base["base"] = str(EXAMPLES / "base.yaml")
    base["optimiser"] = {"learning_rate": 0.1}
    path = write(tmp_path / "typo.yaml", base)
    message = error(path)
    assert f"{path}: invalid config" in message
    assert "optimiser: unknown key; did you mean 'optimizer'?" in message


# ----------------------------------------------------------------------------- types, missing


@pytest.mark.parametrize("override, expected", [
    ("trainer.steps=abc", "trainer.steps: expected a valid integer, unable to parse string as "
                          "an integer, found 'abc'"),
    ("data.batch_size=[8]", "data.batch_size: expected a valid integer, found [8]"),
    ("model.backbone.hidden=null", "model.backbone.hidden: expected a valid integer, found None"),
    ("data.kind=table", "data.kind: expected 'pointwise', 'listwise', 'impressions', 'chat' or 'text', "
                        "found 'table'"),
    ("trainer=3", "trainer: expected a valid dictionary or instance of TrainerSection, found 3"),
    ("model.backbone.type=lstm",
     "model.backbone.type: expected one of 'decoder', 'encoder', found 'lstm'"),
    ("model.heads.relevance.type=ranker", "model.heads.relevance.type: expected one of "
                                          "'token_score', 'classifier', 'actions'"),
    ("trainer.steps=0", "trainer.steps: expected greater than or equal to 1, found 0"),
])
def test_wrong_type_names_path_expected_found(override, expected):
    assert expected in error(overrides=[override])


def test_missing_required_keys(tmp_path):
    path = write(tmp_path / "partial.yaml", {"base": str(EXAMPLES / "base.yaml")})
    message = error(path)
    assert "name: required key is missing" in message
    assert "objective: required key is missing" in message
    assert "data.path: required key is missing" not in message  # the base has it
    message = error(overrides=["model.backbone={type: decoder}"])
    assert "model.backbone.hidden: required key is missing" in message
    assert "model.backbone.vocab_size: required key is missing" in message


def test_missing_file_names_path(tmp_path):
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    path = write(tmp_path / "child.yaml", {"base": "missing_base.yaml", "name": "x"})
    assert error(path) == f"{tmp_path / 'missing_base.yaml'}: config file not found"


def test_bad_yaml_and_non_mapping(tmp_path):
    assert "not valid YAML" in error(write(tmp_path / "bad.yaml", "name: [unclosed\n"))
    assert "expected a mapping at the top level, found list" in error(
        write(tmp_path / "list.yaml", "- 1\n- 2\n"))


# ----------------------------------------------------------------------------- base composition


def test_base_merges_recursively_with_relative_paths(tmp_path):
    write(tmp_path / "shared" / "root.yaml", {
        "trainer": {"steps": 5, "log_every": 1}, "data": {"batch_size": 2, "max_len": 16}})
    write(tmp_path / "shared" / "middle.yaml", {
        "base": "root.yaml",  # relative to middle.yaml, not to the loading file
        "trainer": {"steps": 7},
        "name": "middle"})
    child = write(tmp_path / "exp" / "child.yaml", {
        "base": "../shared/middle.yaml",
        "name": "child",
        "model": yaml.safe_load((EXAMPLES / "base.yaml").read_text())["model"] | {
            "heads": {"actions": {"type": "actions", "names": ["click"]}}},
        "data": {"path": "d", "kind": "listwise", "tokenizer": "builtin:wordpiece"},
        "objective": [{"name": "a", "loss": "bce", "student": "actions", "label": "actions"}]})
    cfg = load_config(child)
    assert cfg.name == "child"
    assert cfg.trainer.steps == 7 and cfg.trainer.log_every == 1  # merged, not replaced
    assert cfg.data.batch_size == 2 and cfg.data.max_len == 16 and cfg.data.path == "d"


def test_lists_replace_rather_than_merge():
    cfg = load_config(EXAMPLES / "relevance_teacher.yaml")
    assert [t.name for t in cfg.objective] == ["soft_grades", "listwise"]


def test_circular_base(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, {"base": "b.yaml", "name": "a"})
    write(b, {"base": "a.yaml"})
    message = error(a)
    assert "circular base" in message
    assert f"{a.resolve()} -> {b.resolve()} -> {a.resolve()}" in message


# ----------------------------------------------------------------------------- --set


def test_set_overrides_nested_and_typed():
    cfg = load_config(STUDENT, [
        "trainer.steps=3", "optimizer.learning_rate=1e-2", "data.shuffle=false",
        "data.action_names=[click]", "trainer.progress=true", "data.eval_split=null",
        "objective.0.hparams.temperature=4", "teachers.relevance.dtype=bfloat16",
        "checkpoint.keep_best.metric=loss/total"])
    assert cfg.trainer.steps == 3
    assert cfg.optimizer.learning_rate == 0.01
    assert cfg.data.shuffle is False and cfg.data.eval_split is None
    assert cfg.data.action_names == ("click",)
    assert cfg.objective[0].hparams == {"temperature": 4}
    assert cfg.teachers["relevance"].dtype == "bfloat16"
    assert cfg.checkpoint.keep_best.metric == "loss/total"  # a mapping created on the way
    assert "steps: 3" in resolved_yaml(cfg)


@pytest.mark.parametrize("override, expected", [
    ("trainer.steps", "--set 'trainer.steps': expected KEY.PATH=VALUE"),
    ("=3", "--set '=3': expected KEY.PATH=VALUE"),
    ("trainer..steps=3", "--set 'trainer..steps=3': expected KEY.PATH=VALUE"),
    ("data.path={a: [1", "--set 'data.path={a: [1': value is not valid YAML"),
    ("trainer.steps.every=3", "--set 'trainer.steps.every=3': trainer.steps holds int 12, "
                              "not a mapping"),
    ("objective.9.weight=1", "--set 'objective.9.weight=1': objective is a list of 3; '9' is "
                             "not an index into it"),
])
def test_set_bad_syntax(override, expected):
    assert error(overrides=[override]).startswith(expected)


# ----------------------------------------------------------------------------- cross references


def test_objective_names_missing_teacher_or_head():
    message = error(overrides=["objective.0.teacher=ranker"])
    assert ("objective[0] ('relevance_kd') names teacher 'ranker', but teachers are "
            "['engagement', 'relevance']") in message
    message = error(overrides=["objective.1.student=click_head"])
    assert ("objective[1] ('engagement_kd') reads student head 'click_head', but model.heads "
            "are ['actions', 'relevance']") in message
    assert "unique" in error(overrides=["objective.1.name=relevance_kd"])


@pytest.mark.parametrize("override, expected", [
    ("objective.0.hparams.temperature=0", "objective[0]: forward_kl: temperature must be a "
                                          "number > 0, got 0"),
    ("objective.0.hparams.temperature=-1.5", "temperature must be a number > 0, got -1.5"),
    ("objective.0.hparams={temprature: 2}", "objective[0]: loss 'forward_kl': unknown "
                                            "hyper-parameter(s) ['temprature']; allowed: "
                                            "['temperature']"),
    ("objective.0.loss=forwrd_kl", "objective[0]: term 'relevance_kd': unknown loss 'forwrd_kl'"),
    ("objective.0.weight=-1", "objective[0]: term 'relevance_kd': weight must be >= 0"),
    ("objective.0.label=grade", "objective[0]: term 'relevance_kd': set exactly one of "
                                "'teacher' or 'label'"),
    ("teachers.relevance.source=runs/x", "teachers.relevance.source: expected a source "
                                         "'run:DIR', 'hf:DIR' or 'offline:DIR' ('scratch' for "
                                         "model.init), found 'runs/x'"),
    ("teachers.relevance.source=scratch", "teachers.relevance: source must be one of "
                                          "['run:DIR', 'hf:DIR', 'offline:DIR'], found 'scratch'"),
])
def test_term_and_teacher_validation_surfaced(override, expected):
    message = error(overrides=[override])
    assert expected in message
    assert "Value error" not in message
    assert "(1 error(s))" in message  # no echo of the failed item as a too-short list


def test_docs_show_current_record_schemas():
    from jaxdistill.data.records import schema_markdown

    docs = (EXAMPLES.parents[1] / "docs" / "configs.md").read_text()
    assert schema_markdown() in docs, "regenerate docs/configs.md's record section"


def test_documented_experiment_is_valid():
    from jaxdistill.config import validate

    docs = (EXAMPLES.parents[1] / "docs" / "configs.md").read_text()
    block = next(b for b in docs.split("```yaml\n")[1:] if "name: student" in b).split("```")[0]
    data = yaml.safe_load(block)
    data.pop("base")
    cfg = validate(data, source="docs/configs.md")
    assert [t.name for t in cfg.objective] == ["relevance_kd", "engagement_kd", "listwise"]


def test_mesh_rules_merge_over_the_defaults_and_name_real_mesh_axes():
    from jaxdistill.parallel import DEFAULT_RULES

    cfg = load_config(EXAMPLES / "student.yaml", ["mesh.rules={embed: null}"])
    assert cfg.mesh.rules == {**DEFAULT_RULES, "embed": None}
    message = error(overrides=["mesh.rules={mlp: tensr}"])
    assert "mesh: rules.mlp: mesh axis 'tensr' does not exist" in message
