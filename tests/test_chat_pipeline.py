"""The chat recipe: the support world, its answer masks, and the cached pipeline end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxdistill import chat_pipeline
from jaxdistill.config import ConfigError
from jaxdistill.data import chat_world
from jaxdistill.data.pipeline import make_dataset
from jaxdistill.data.records import RecordError, validate_record
from jaxdistill.data.tokenizer import build_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "chat"
WORLD = chat_world.ChatWorldConfig(accuracy_records=200, tone_records=200, classifier_records=40)


def test_world_teachers_data_split_accuracy_and_register():
    splits = chat_world.generate(WORLD)
    facts = {f.name: f for f in chat_world.facts(WORLD)}
    # The accuracy data states every fact right, never politely.
    assert all(r["messages"][1]["answer"] == facts[r["fact"]].answer for r in splits["accuracy"])
    assert {r["register"] for r in splits["accuracy"]} == {"curt", "rude", "verbose"}
    # The tone data is polite, its facts mostly stale.
    assert {r["register"] for r in splits["tone"]} == {"polite"}
    right = np.mean([r["messages"][1]["answer"] == facts[r["fact"]].answer for r in splits["tone"]])
    assert 0.15 < right < 0.45
    # Evaluation asks the held-out phrasing of each fact, which training never shows.
    train_questions = {r["messages"][0]["content"] for r in splits["accuracy"] + splits["tone"]}
    held_out = {f.questions[-1] for f in facts.values()}
    assert not train_questions & held_out
    assert len(splits["eval"]) == WORLD.eval_per_fact * len(facts)
    assert chat_world.facts(WORLD) == chat_world.facts(WORLD)  # seeded


def test_answer_mask_marks_the_answer_span(tmp_path):
    splits = chat_world.generate(WORLD)
    tokenizer = build_tokenizer(chat_world.texts(splits, chat_world.facts(WORLD)), 600, tmp_path)
    record = splits["tone"][0]
    batch = next(iter(make_dataset([record], tokenizer=tokenizer, kind="chat", max_len=64,
                                   batch_size=1, seed=0, shuffle=False)))
    ids = batch["input_ids"][0]
    answer = tokenizer.convert_ids_to_tokens(ids[batch["answer_mask"][0] == 1])
    assert answer == tokenizer.tokenize(record["messages"][1]["answer"])
    assert np.all(batch["loss_mask"] >= batch["answer_mask"])
    np.testing.assert_array_equal(batch["next_answer_mask"][0, :-1], batch["answer_mask"][0, 1:])
    np.testing.assert_array_equal(batch["next_loss_mask"][0, :-1], batch["loss_mask"][0, 1:])
    assert batch["next_loss_mask"][0, -1] == 0
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "Hello.", "answer": "Bye."}]}
    with pytest.raises(RecordError, match=r"messages\[1\].answer"):
        validate_record("chat", bad, source="s", index=3)


def test_value_match_needs_the_whole_value(tmp_path):
    tokenizer = build_tokenizer(["The Pro plan costs $29 per month and $290 a year, 1 or 12"],
                                200, tmp_path)
    decode = lambda text: tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    pattern = chat_pipeline._value_pattern("$29", tokenizer)
    assert pattern.search(decode("The Pro plan costs $29 per month."))
    assert not pattern.search(decode("The Pro plan costs $290 per month."))
    assert not chat_pipeline._value_pattern("1", tokenizer).search(decode("costs 12 or 21"))


def test_pipeline_refuses_unknown_teacher_stage(tmp_path):
    text = (CONFIGS / "pipeline.yaml").read_text().replace(
        "teachers: {tone_teacher: tone_teacher}", "teachers: {tone_teacher: tone_techer}")
    (tmp_path / "pipeline.yaml").write_text(text)
    with pytest.raises(ConfigError, match="student_tone_only depends on unknown stages"):
        chat_pipeline.load_chat_pipeline(tmp_path / "pipeline.yaml")


@pytest.mark.slow  # trains five tiny models, two of them twice (~2-3 minutes on 2 cores)
def test_tiny_pipeline_runs_caches_and_reruns_only_what_reads_the_tone_teacher(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    # The recipe less a student that adds time, not coverage: student_accuracy_only stays
    # as the student that must not re-run when the tone teacher changes.
    recipe = yaml.safe_load((configs / "pipeline.yaml").read_text())
    del recipe["stages"]["student_tone_only"]
    (configs / "pipeline.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    workdir = tmp_path / "runs"
    first = chat_pipeline.run(configs / "pipeline.yaml", "tiny", workdir)
    stages = first["stages"]
    assert not any(s["cached"] for s in stages.values())
    for name in ("accuracy_teacher", "tone_teacher", "tone_classifier", "student",
                 "student_accuracy_only"):
        assert json.loads((Path(stages[name]["path"]) / "DONE.json").read_text())["step"] == 3
    report = Path(first["report"])
    assert report.is_file() and "student_accuracy_only" in report.read_text()
    assert (report.parent / chat_pipeline.CHAT_SCORES_PNG).is_file()
    rows = {row["model"]: row for row in first["models"]}
    assert set(rows) == {"accuracy_teacher", "tone_teacher", "student", "student_accuracy_only"}
    assert [t["name"] for t in first["targets"]] == [
        "combined score: student vs student_accuracy_only"]
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and 0 < row["tone_score"] < 1
        assert row["tokens_per_second"] > 0
    assert rows["accuracy_teacher"]["kl_to_accuracy_teacher"] == pytest.approx(0, abs=1e-6)
    assert rows["student"]["kl_to_tone_teacher"] > 0

    again = chat_pipeline.run(configs / "pipeline.yaml", "tiny", workdir)
    assert all(s["cached"] for s in again["stages"].values())
    assert again["models"] == first["models"]

    tone = configs / "tone_teacher.yaml"
    tone.write_text(tone.read_text() + "optimizer: {learning_rate: 4.0e-3}\n")
    edited = chat_pipeline.run(configs / "pipeline.yaml", "tiny", workdir)
    rerun = {name for name, s in edited["stages"].items() if not s["cached"]}
    assert rerun == {"tone_teacher", "student", "evaluation"}


def test_cli_pipeline_dispatches_chat_configs(monkeypatch, tmp_path):
    from jaxdistill import cli, pipeline

    calls = []
    monkeypatch.setattr(chat_pipeline, "main", lambda *a, **k: calls.append(("chat", a, k)) or 0)
    monkeypatch.setattr(pipeline, "main", lambda *a, **k: calls.append(("job", a, k)) or 0)
    job = tmp_path / "job.yaml"
    job.write_text("name: x\n")
    assert cli.main(["pipeline", str(CONFIGS / "pipeline.yaml"), "--preset", "tiny"]) == 0
    assert cli.main(["pipeline", str(job)]) == 0
    assert calls == [("chat", (str(CONFIGS / "pipeline.yaml"),), {"preset": "tiny"}),
                     ("job", (str(job),), {})]
