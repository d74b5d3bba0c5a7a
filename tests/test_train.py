"""The training loop: metrics, eval, keep-best, teachers from runs, resume (exact, after SIGKILL),
SIGTERM, refusing other teachers, warm start, predict."""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill import loader, parallel, train
from jaxdistill.checkpoint import CHECKPOINT_SUBDIR, Checkpointer, load_params
from jaxdistill.data import sources
from jaxdistill.data.pipeline import make_dataset
from jaxdistill.data.tokenizer import load_tokenizer, yes_no_token_ids
from jaxdistill.evaluator import Evaluator, term_agreement
from jaxdistill.metrics import read_metrics
from jaxdistill.models.model import functional

WORDS = "python java data engineer remote senior nurse teacher london berlin".split()


def listwise_records(n, offset, rng):
    # member_features[0] is the record's id, so a test can see which examples a batch holds.
    return [{"query": f"{rng.choice(WORDS)} {rng.choice(WORDS)}", "member": "",
             "member_features": [float(offset + i)],
             "candidates": [{"document": " ".join(rng.choice(WORDS) for _ in range(4)),
                             "grade": rng.randrange(5)} for _ in range(3)]}
            for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:wordpiece")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("data") / "listwise"
    return sources.write_dataset({"train": listwise_records(48, 0, rng),
                                  "validation": listwise_records(16, 1000, rng)},
                                 "listwise", out)


def experiment(data_dir, tokenizer, name, *, teachers=None, **overrides):
    no, yes = yes_no_token_ids(tokenizer)[::-1]
    objective = [{"name": "grades", "loss": "listnet", "student": "relevance", "label": "grade",
                  "transform": "log_odds", "mask": "candidate_mask"}]
    for teacher in teachers or {}:
        objective.append({"name": f"distill_{teacher}", "loss": "listnet", "student": "relevance",
                          "teacher": teacher, "transform": "log_odds", "mask": "candidate_mask"})
    data = {
        "name": name,
        "model": {"backbone": {"type": "decoder", "vocab_size": len(tokenizer), "hidden": 32,
                               "layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 16, "mlp": 64,
                               "dtype": "float32", "remat": "none"},
                  "heads": {"relevance": {"type": "token_score", "token_ids": [no, yes]}}},
        "teachers": teachers or {},
        "objective": objective,
        "data": {"path": str(data_dir), "kind": "listwise", "tokenizer": "builtin:wordpiece",
                 "max_len": 16, "batch_size": 8, "list_size": 3},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1, "total_steps": 20},
        "trainer": {"steps": 6, "log_every": 2, "eval_every": 3, "eval_batches": 2,
                    "progress": False},
        "checkpoint": {"every": 3},
    }
    return config_lib.validate(config_lib.merge(data, overrides), source=name)


@pytest.fixture(scope="module")
def teacher_run(data_dir, tokenizer, tmp_path_factory):
    """A finished label-only run (the teacher of later tests), keeping its best checkpoint."""
    root = tmp_path_factory.mktemp("teacher")
    policy = root / "policy.md"
    policy.write_text("# Relevance policy\nGrade 4: perfect match.\n")
    cfg = experiment(data_dir, tokenizer, "teacher", policy=str(policy), trainer={
        "steps": 8, "log_every": 2, "eval_every": 2, "eval_batches": 2, "progress": False},
        checkpoint={"every": 2, "max_to_keep": 1,
                    "keep_best": {"metric": "eval/loss/total", "mode": "max"}})
    return train.run(cfg, root / "run"), policy


def test_run_writes_config_metrics_and_tensorboard(teacher_run):
    result, policy = teacher_run
    assert result.step == 8 and not result.preempted
    assert (result.run_dir / "config.yaml").is_file()
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["policy_sha256"] == config_lib.file_hash(policy)
    # FLOPs per step by model (6·N·tokens for a student with no teachers, attention on top).
    flops = info["flops_per_step"]
    student = flops["models"]["student"]
    assert flops["tokens"] == 8 * 3 * 16 and set(flops["models"]) == {"student"}
    assert student["flops"] >= 6 * student["non_embedding"] * flops["tokens"]
    lines = read_metrics(result.run_dir)
    train_steps = [line["step"] for line in lines if "loss/grades" in line]
    eval_steps = [line["step"] for line in lines if "eval/loss/grades" in line]
    assert train_steps == [2, 4, 6, 8] and eval_steps == [2, 4, 6, 8]
    assert all(np.isfinite(line["loss/grades"]) for line in lines if "loss/grades" in line)
    assert all(line["flops_per_second"] > 0 for line in lines if "loss/grades" in line)
    assert all("eval/agreement/grades" in line for line in lines if "eval/loss/grades" in line)
    assert any(p.name.startswith("events.out.tfevents") for p in (result.run_dir / "tb").iterdir())
    assert result.eval_metrics["eval/loss/grades"] == eval_lines(result)[-1]["eval/loss/grades"]


def test_run_leaves_a_report_and_its_last_eval(teacher_run):
    """A plain `train` run ends with eval.json (metrics by head type: NDCG for a two-token
    score over lists) and report.md with its loss and eval-metric plots beside it."""
    result, _ = teacher_run
    last = json.loads((result.run_dir / "eval.json").read_text())
    assert last["step"] == 8 and last["split"] == "validation"
    assert 0 <= last["metrics"]["relevance/ndcg_at_10"] <= 1
    assert last["metrics"]["loss/grades"] == pytest.approx(result.eval_metrics["eval/loss/grades"])
    report = (result.run_dir / "report.md").read_text()
    for png in ("training_curves.png", "eval_curves.png"):
        assert f"]({png})" in report and (result.run_dir / png).stat().st_size > 1000
    assert "relevance/ndcg_at_10" in report


def eval_lines(result):
    return [line for line in read_metrics(result.run_dir) if "eval/loss/total" in line]


def test_eval_on_start_adds_a_step_0_eval_and_changes_nothing_else(data_dir, tokenizer,
                                                                    tmp_path):
    """`trainer.eval_on_start` evaluates the starting params once (step 0): the later evals
    and the trained params are those of a run without it, and a resumed run does not repeat
    it."""
    plain = train.run(experiment(data_dir, tokenizer, "plain"), tmp_path / "plain")
    short = experiment(data_dir, tokenizer, "start", trainer={"eval_on_start": True, "steps": 3})
    train.run(short, tmp_path / "start")
    started = train.run(experiment(data_dir, tokenizer, "start", trainer={
        "eval_on_start": True}), tmp_path / "start")  # resumes at step 3
    assert [line["step"] for line in eval_lines(started)] == [0, 3, 6]
    assert [line["step"] for line in eval_lines(plain)] == [3, 6]
    for with_start, without in zip(eval_lines(started)[1:], eval_lines(plain)):
        assert with_start["eval/loss/total"] == without["eval/loss/total"]
    first = eval_lines(started)[0]["eval/loss/total"]
    assert np.isfinite(first) and first != eval_lines(started)[1]["eval/loss/total"]
    for a, b in zip(jax.tree.leaves(load_params(started.run_dir)[1]),
                    jax.tree.leaves(load_params(plain.run_dir)[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keep_best_keeps_the_best_step_and_load_params_reads_it(teacher_run):
    result, _ = teacher_run
    best = max(eval_lines(result), key=lambda line: line["eval/loss/total"])["step"]
    checkpointer = Checkpointer(result.checkpoint_dir, read_only=True,
                                keep_best_metric="eval/loss/total", keep_best_mode="max")
    assert checkpointer.all_steps() == sorted({best, 8})
    assert checkpointer.best_step() == best
    model_cfg, params = load_params(result.run_dir)
    assert model_cfg.heads.keys() == {"relevance"}
    expected = checkpointer.restore_params(best)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert np.array_equal(a, b)


def test_distill_from_an_int8_teacher_records_its_output_error(teacher_run, data_dir, tokenizer,
                                                                tmp_path):
    """`teachers.X.quantize: int8`: the teacher runs quantized in the step; its output error
    against its own precision, measured on a training batch, is in the checkpoint's manifest."""
    teachers = {"relevance_teacher": {"source": f"run:{teacher_run[0].run_dir}",
                                      "dtype": "float32", "quantize": "int8"}}
    cfg = experiment(data_dir, tokenizer, "student", teachers=teachers,
                     trainer={"steps": 2, "eval_every": 2, "log_every": 1, "progress": False})
    result = train.run(cfg, tmp_path / "student", report=False)
    assert np.isfinite(result.metrics["loss/distill_relevance_teacher"])
    reader = Checkpointer(result.checkpoint_dir, read_only=True)
    manifest = reader.read_meta()["manifest"]["relevance_teacher"]
    reader.close()
    assert manifest["quantize"] == "int8"
    assert 0 <= manifest["quantize_error"]["relevance"]["kl_mean"] < 1e-2


@pytest.mark.slow
def test_distill_from_a_run_teacher_and_refuse_other_teachers(teacher_run, data_dir, tokenizer,
                                                               tmp_path):
    teacher_dir = teacher_run[0].run_dir
    teachers = {"relevance_teacher": {"source": f"run:{teacher_dir}", "dtype": "float32"}}
    cfg = experiment(data_dir, tokenizer, "student", teachers=teachers)
    result = train.run(cfg, tmp_path / "student")
    assert result.step == 6
    assert {"loss/distill_relevance_teacher", "loss/grades"} <= result.metrics.keys()
    assert {"eval/agreement/distill_relevance_teacher",
            "eval/teacher/relevance_teacher"} <= result.eval_metrics.keys()

    renamed = {"ranking_teacher": teachers["relevance_teacher"]}
    longer = {"steps": 8, "log_every": 2, "eval_every": 4, "eval_batches": 1, "progress": False}
    other = experiment(data_dir, tokenizer, "student", teachers=renamed, trainer=longer)
    with pytest.raises(train.TeacherMismatchError, match="relevance_teacher") as err:
        train.run(other, tmp_path / "student")
    assert "ranking_teacher" in str(err.value)
    forced = train.run(other, tmp_path / "student", force_teachers=True)
    assert forced.step == 8


def test_load_model_names_a_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"run:{tmp_path}/nope"):
        loader.load_model(f"run:{tmp_path}/nope")


def test_evaluator_concatenates_heads_and_labels(teacher_run, data_dir, tokenizer):
    """Every record is scored (the short last batch padded and trimmed back), the same as one
    forward over the whole split at once."""
    model_cfg, params = load_params(teacher_run[0].run_dir)
    dataset = make_dataset(sources.open_source(data_dir, "validation"), tokenizer=tokenizer,
                           max_len=16, batch_size=6, list_size=3, seed=0, shuffle=False,
                           num_epochs=1, drop_remainder=False)
    mesh = parallel.make_mesh((-1, 1, 1))
    evaluator = Evaluator(functional(model_cfg), mesh=mesh, rules=parallel.DEFAULT_RULES)
    scores = evaluator.run(params, {}, iter(dataset))
    out = scores.student
    assert out["relevance"].shape == (16, 3, 2) and out["pooled"].shape == (16, 3, 32)
    assert scores.fields["grade"].shape == (16, 3) and scores.rows == 16
    np.testing.assert_array_equal(scores.fields["candidate_mask"], np.ones((16, 3)))
    whole = next(iter(make_dataset(sources.open_source(data_dir, "validation"),
                                   tokenizer=tokenizer, max_len=16, batch_size=16, list_size=3,
                                   seed=0, shuffle=False, num_epochs=1)))
    direct = functional(model_cfg).apply(params, {k: v for k, v in whole.items()
                                                  if k != "batch_malformed"})
    np.testing.assert_allclose(out["relevance"], direct["relevance"], rtol=1e-5, atol=1e-6)
    assert evaluator.run(params, {}, iter(dataset),
                         max_batches=1).student["relevance"].shape == (6, 3, 2)


def test_warm_start_copies_slices_and_spaces_layers(caplog):
    f32 = jnp.float32
    source = {
        "embed": jnp.arange(12, dtype=f32).reshape(4, 3),
        "layers": {"w": jnp.arange(5 * 2 * 3, dtype=f32).reshape(5, 2, 3)},
        "norm": jnp.ones(3, f32),
        "head": jnp.ones((3, 2), f32),
        "unused": jnp.zeros(1, f32),
    }
    target = {
        "embed": jax.ShapeDtypeStruct((4, 2), f32),  # narrower: leading slice
        "layers": {"w": jax.ShapeDtypeStruct((3, 2, 3), f32)},  # fewer layers: 0, 2, 4
        "norm": jax.ShapeDtypeStruct((3,), jnp.bfloat16),  # identical shape, cast
        "head": jax.ShapeDtypeStruct((3, 4), f32),  # wider than the source: kept from init
        "extra": jax.ShapeDtypeStruct((2,), f32),  # not in the source: kept from init
    }
    fallback = {"embed": jnp.zeros((4, 2)), "layers": {"w": jnp.zeros((3, 2, 3))},
                "norm": jnp.zeros(3), "head": jnp.full((3, 4), 7.0), "extra": jnp.full(2, 9.0)}
    with caplog.at_level(logging.INFO, logger="jaxdistill.loader"):
        out = loader.warm_start(target, source, fallback=fallback)
    np.testing.assert_array_equal(out["embed"], source["embed"][:, :2])
    np.testing.assert_array_equal(out["layers"]["w"], source["layers"]["w"][np.array([0, 2, 4])])
    assert out["norm"].dtype == jnp.bfloat16 and np.all(np.asarray(out["norm"]) == 1)
    np.testing.assert_array_equal(out["head"], fallback["head"])
    np.testing.assert_array_equal(out["extra"], fallback["extra"])
    assert "copied 1 weights, adapted 2, skipped 2, source-only 1" in caplog.text
    with pytest.raises(ValueError, match="no fallback"):
        loader.warm_start(target, source)


# ------------------------------------------------------------------ subprocess (kill) tests

CHILD = textwrap.dedent("""
    import json, os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    config_path, run_dir, log_path, delay = sys.argv[1:5]
    from jaxdistill import config as config_lib, train

    to_device = train._to_device

    def logged(batch, mesh, rules):  # records which examples each step consumed
        with open(log_path, "a") as f:
            f.write(json.dumps([float(x) for x in batch["member_features"][:, 0]]) + "\\n")
        time.sleep(float(delay))
        return to_device(batch, mesh, rules)

    train._to_device = logged
    result = train.run(config_lib.load_config(config_path), run_dir)
    print("RESULT", result.step, result.preempted, flush=True)
""")


def child_run(tmp_path, cfg, name, *, delay=0.0):
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(config_lib.resolved_yaml(cfg))
    (tmp_path / "child.py").write_text(CHILD)
    log_path = tmp_path / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(config_path), str(tmp_path / name),
         str(log_path), str(delay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    return process, log_path


def logged_batches(log_path):
    return [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"child exited early:\n{process.communicate()[1][-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


def finished(process):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def final_params(run_dir):
    return jax.tree.leaves(load_params(run_dir)[1])


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(data_dir, tokenizer, tmp_path):
    cfg = experiment(data_dir, tokenizer, "resume", data={"eval_split": None},
                     trainer={"steps": 12, "log_every": 4, "progress": False},
                     checkpoint={"every": 3})
    reference, reference_log = child_run(tmp_path, cfg, "reference")
    killed, killed_log = child_run(tmp_path, cfg, "killed", delay=0.3)
    step3 = tmp_path / "killed" / CHECKPOINT_SUBDIR / "3"
    # Kill mid-way through later steps, once a checkpoint is complete.
    wait_for(lambda: step3.is_dir() and len(logged_batches(killed_log)) >= 5, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before_kill = logged_batches(killed_log)
    killed_log.rename(tmp_path / "killed-first.log")
    resumed, resumed_log = child_run(tmp_path, cfg, "killed")
    assert "RESULT 12 False" in finished(resumed)
    assert "RESULT 12 False" in finished(reference)

    start = json.loads((tmp_path / "killed" / "run.json").read_text())["resumed_from_step"]
    assert start is not None and 3 <= start < len(before_kill)
    # The data iterator continued at the exact next example.
    assert before_kill[:start] + logged_batches(resumed_log) == logged_batches(reference_log)
    for a, b in zip(final_params(tmp_path / "killed"), final_params(tmp_path / "reference"),
                    strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(data_dir, tokenizer, tmp_path):
    cfg = experiment(data_dir, tokenizer, "sigterm", data={"eval_split": None},
                     trainer={"steps": 500, "log_every": 100, "progress": False},
                     checkpoint={"every": 1000})
    process, log_path = child_run(tmp_path, cfg, "sigterm", delay=0.2)
    wait_for(lambda: len(logged_batches(log_path)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    stdout = finished(process)
    step = int(stdout.split("RESULT ")[1].split()[0])
    assert "True" in stdout.split("RESULT ")[1] and 3 <= step < 500
    assert len(logged_batches(log_path)) == step  # saved at the step reached, none skipped
    reader = Checkpointer(tmp_path / "sigterm" / CHECKPOINT_SUBDIR, read_only=True)
    assert reader.all_steps() == [step]


def test_agreement_per_loss_kind():
    from jaxdistill.distill.objectives import Term

    scores = {"relevance": jnp.array([[0.1, 0.9, 5.0], [2.0, 0.0, 1.0]])}
    teacher = {"t": {"relevance": jnp.array([[0.0, 1.0, -9.0], [3.0, 1.0, 0.0]])}}
    batch = {"candidate_mask": jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
             "grade": jnp.array([1, 2])}
    listnet = Term(name="d", loss="listnet", student="relevance", teacher="t",
                   mask="candidate_mask")
    # Row 0: the masked third candidate is ignored, both pick index 1; row 1: both pick 0.
    assert float(term_agreement(listnet, scores, teacher, batch)) == 1.0
    ce = Term(name="c", loss="cross_entropy", student="relevance", label="grade")
    assert float(term_agreement(ce, scores, teacher, batch)) == 0.0  # argmax 2, 0 vs 1, 2
    bce = Term(name="b", loss="soft_bce", student="relevance", teacher="t")
    assert float(term_agreement(bce, scores, teacher, batch)) == pytest.approx(2 / 6)


def test_teacher_starts_from_an_hf_directory_by_config(data_dir, tokenizer, tmp_path):
    """`model.init: hf:DIR` trains from a transformers checkpoint whose weights really load;
    a backbone that does not describe the checkpoint is refused, naming the field."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    hf_config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    hf_dir = tmp_path / "qwen3"
    transformers.Qwen3ForCausalLM(hf_config).save_pretrained(hf_dir)

    from jaxdistill.models import hf

    rope_theta = hf.config_from_hf(hf_dir).rope_theta
    with pytest.raises(config_lib.ConfigError,
                       match=r"model.backbone does not describe.*rope_theta: config 10001.0"):
        experiment(data_dir, tokenizer, "from_hf",
                   model={"init": f"hf:{hf_dir}", "backbone": {"rope_theta": rope_theta + 1}})
    # Without a backbone the checkpoint's own config fills it; numerics may still be set.
    base = experiment(data_dir, tokenizer, "x").model_dump(mode="json")
    filled = config_lib.validate({**base, "model": {
        "init": f"hf:{hf_dir}", "backbone": {"remat": "dots"}, "heads": base["model"]["heads"]}},
        source="filled")
    assert filled.model.backbone == hf.config_from_hf(hf_dir, remat="dots")

    cfg = experiment(data_dir, tokenizer, "from_hf",
                     model={"init": f"hf:{hf_dir}", "backbone": {"rope_theta": rope_theta}},
                     trainer={"steps": 1, "eval_every": 1, "log_every": 1})
    initial = loader.initial_params(cfg, functional(loader.model_config(cfg.model)), None, None)
    embedding = np.asarray(initial["backbone"]["embed"]["embedding"])
    hf_embedding = transformers.Qwen3ForCausalLM.from_pretrained(hf_dir).get_input_embeddings()
    np.testing.assert_array_equal(embedding, hf_embedding.weight.detach().numpy())

    result = train.run(cfg, tmp_path / "run")
    assert result.step == 1 and np.isfinite(result.metrics["loss/total"])


def test_config_differences_reads_a_copied_file_as_the_same_input(tmp_path):
    """A resumed run's config is compared key by key; a file-valued key (the policy) that names
    a copy with the same content is not a difference, one with other content is."""
    policy, copy, edited = tmp_path / "policy.md", tmp_path / "copy.md", tmp_path / "edited.md"
    policy.write_text("# rubric\n")
    copy.write_text("# rubric\n")
    edited.write_text("# rubric, edited\n")

    def differences(now: Path, steps: int = 10):
        return train.config_differences(f"policy: {policy}\ntrainer: {{steps: 10}}\n",
                                        f"policy: {now}\ntrainer: {{steps: {steps}}}\n")

    assert differences(copy) == []
    assert differences(edited) == [f'policy: checkpoint "{policy}", now "{edited}"']
    assert differences(tmp_path / "missing.md") != []
    assert differences(copy, steps=20) == []  # trainer.steps may change on resume
