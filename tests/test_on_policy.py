"""On-policy distillation in the loop: the per-step draw, the student's samples as the step's
batch (scored by the teachers as a dense KL would), fraction 0 = off-policy, exact resume."""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill import parallel, runs, train
from jaxdistill.checkpoint import load_params
from jaxdistill.data import sources
from jaxdistill.data.tokenizer import load_tokenizer
from jaxdistill.distill.step import init_sharded_state
from jaxdistill.generate import generate
from jaxdistill.metrics import read_metrics
from jaxdistill.models.hf import export_hf
from jaxdistill.models.model import ModelConfig, functional
from jaxdistill.on_policy import is_on_policy, on_policy_steps, prompt_mask
from tests.weights import random_params

WORDS = "python java data engineer remote senior nurse teacher london berlin".split()
MAX_LEN, NEW = 24, 8


def chat_records(n, rng):
    return [{"messages": [
        {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(4))}]}
        for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:wordpiece")


def backbone(tokenizer, hidden):
    return {"type": "decoder", "vocab_size": len(tokenizer), "hidden": hidden, "layers": 1,
            "heads": 2, "kv_heads": 1, "head_dim": 16, "mlp": 64, "dtype": "float32",
            "remat": "none"}


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory):
    """A chat dataset and a random teacher written as an HF directory (nothing trained)."""
    root = tmp_path_factory.mktemp("on_policy")
    rng = random.Random(0)
    data = sources.write_dataset({"train": chat_records(32, rng)}, "chat", root / "chat")
    cfg = ModelConfig(backbone=backbone(tokenizer, 48), heads={"lm": {"type": "lm"}})
    # Large weights: a peaked teacher, so its KL to the student is far from any other batch's.
    teacher = export_hf(cfg, random_params(functional(cfg), 1, stddev=0.5), root / "teacher")
    return data, teacher


def experiment(world, tokenizer, name, **overrides):
    data_dir, teacher_dir = world
    data = {
        "name": name,
        "model": {"backbone": backbone(tokenizer, 32), "heads": {"lm": {"type": "lm"}}},
        "teachers": {"tone": {"source": f"hf:{teacher_dir}", "heads": {"lm": {"type": "lm"}},
                              "dtype": "float32"}},
        # The same teacher on two masks: the whole response and the answer span.
        "objective": [
            {"name": "response", "loss": "token_kl", "student": "lm", "teacher": "tone",
             "mask": "next_loss_mask"},
            {"name": "answer", "loss": "token_kl", "student": "lm", "teacher": "tone",
             "mask": "next_answer_mask"}],
        "data": {"path": str(data_dir), "kind": "chat", "tokenizer": "builtin:wordpiece",
                 "max_len": MAX_LEN, "batch_size": 8, "eval_split": None},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1, "total_steps": 20},
        "trainer": {"steps": 4, "log_every": 1, "progress": False},
        "checkpoint": {"every": 100, "async_save": False},
        "logging": {"tensorboard": False},
    }
    return config_lib.validate(config_lib.merge(data, overrides), source=name)


def losses_of(run_dir):
    return [{k: v for k, v in line.items() if k.startswith("loss/")}
            for line in read_metrics(run_dir)]


def test_the_draw_depends_on_seed_and_step_only():
    assert not any(is_on_policy(0, step, 0.0) for step in range(50))
    assert all(is_on_policy(0, step, 1.0) for step in range(50))
    draws = [is_on_policy(3, step, 0.3) for step in range(2000)]
    assert draws == [is_on_policy(3, step, 0.3) for step in range(2000)]
    assert 0.27 < np.mean(draws) < 0.33
    assert draws != [is_on_policy(4, step, 0.3) for step in range(2000)]
    assert on_policy_steps(3, 100, 0.3) == sum(draws[:100])


def test_a_teacher_on_the_students_tokenizer_reads_the_students_ids(tokenizer, tmp_path):
    # On-policy samples exist in the student's ids only: a teacher trained on the same
    # tokenizer (saved elsewhere) must share them, and only another tokenizer gets a key.
    from jaxdistill import loader
    from jaxdistill.data.tokenizer import build_tokenizer

    tokenizer.save_pretrained(tmp_path / "same")
    build_tokenizer(["a small other vocabulary"], 40, tmp_path / "other")
    teachers = loader.Teachers(online={
        "same": loader.Teacher(None, None, str(tmp_path / "same")),
        "unknown": loader.Teacher(None, None, None),
        "other": loader.Teacher(None, None, str(tmp_path / "other"))}, offline=[], manifest={})
    keys = loader.tokenizer_keys("builtin:wordpiece", teachers)
    assert list(keys) == ["other"] and len(keys["other"]) == 16


def test_bad_on_policy_configs_name_the_key(world, tokenizer, tmp_path):
    with pytest.raises(config_lib.ConfigError,
                       match=r"on_policy.fraction: expected less than or equal to 1, found 1.5"):
        experiment(world, tokenizer, "bad", on_policy={"fraction": 1.5})
    with pytest.raises(config_lib.ConfigError, match=r"on_policy: max_new_tokens \(24\) must be "
                                                     r"below data.max_len \(24\)"):
        experiment(world, tokenizer, "bad", on_policy={"fraction": 0.5, "max_new_tokens": 24})
    listwise = experiment(world, tokenizer, "x").model_dump(mode="json")
    listwise.update(
        on_policy={"fraction": 0.5}, teachers={},
        model={**listwise["model"], "heads": {"relevance": {"type": "token_score",
                                                            "token_ids": [1, 2]}}},
        objective=[{"name": "grades", "loss": "listnet", "student": "relevance",
                    "label": "grade", "transform": "log_odds", "mask": "candidate_mask"}],
        data={**listwise["data"], "kind": "listwise", "list_size": 3})
    with pytest.raises(config_lib.ConfigError, match=r"on_policy: needs chat data .*found "
                       r"data.kind 'listwise'; the student samples its responses with an 'lm' "
                       r"head; model.heads has \['relevance'\]"):
        config_lib.validate(listwise, source="listwise.yaml")
    with pytest.raises(config_lib.ConfigError, match=r"on_policy: teachers \['tone'\] are cached"):
        experiment(world, tokenizer, "bad", on_policy={"fraction": 0.5, "max_new_tokens": NEW},
                   teachers={"tone": {"source": "offline:/nowhere", "heads": None}})
    # A teacher on another tokenizer cannot read the samples: refused at start-up.
    from jaxdistill.data.tokenizer import build_tokenizer

    other = build_tokenizer(["a small other vocabulary"], 40, tmp_path / "other")
    cfg = ModelConfig(backbone=backbone(tokenizer, 32), heads={"lm": {"type": "lm"}})
    foreign = export_hf(cfg, random_params(functional(cfg), 2), tmp_path / "foreign",
                        tokenizer_dir=tmp_path / "other")
    assert len(other) < len(tokenizer)
    with pytest.raises(config_lib.ConfigError, match=r"on_policy: teachers \['tone'\] read "
                                                     r"another tokenizer than the student's"):
        runs.setup(experiment(world, tokenizer, "bad", on_policy={"fraction": 0.5,
                                                                  "max_new_tokens": NEW},
                              teachers={"tone": {"source": f"hf:{foreign}"}}))
    # Unset, the section is not in the resolved config (older run configs read the same).
    import yaml

    assert "on_policy" not in yaml.safe_load(config_lib.resolved_yaml(
        experiment(world, tokenizer, "x")))


@pytest.mark.slow  # ~15 s on two cores: two short runs
def test_fraction_zero_is_the_off_policy_trajectory(world, tokenizer, tmp_path):
    off = train.run(experiment(world, tokenizer, "off"), tmp_path / "off", report=False)
    zero = train.run(experiment(world, tokenizer, "zero",
                                on_policy={"fraction": 0.0, "max_new_tokens": NEW}),
                     tmp_path / "zero", report=False)
    assert losses_of(off.run_dir) == losses_of(zero.run_dir)
    assert losses_of(off.run_dir)[0]["loss/response"] != losses_of(off.run_dir)[0]["loss/answer"]
    for a, b in zip(jax.tree.leaves(load_params(off.run_dir)[1]),
                    jax.tree.leaves(load_params(zero.run_dir)[1]), strict=True):
        assert np.array_equal(a, b)
    assert json.loads((zero.run_dir / "run.json").read_text())["on_policy"]["fraction"] == 0.0
    assert read_metrics(zero.run_dir)[-1]["on_policy/fraction"] == 0.0


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow  # ~15 s on two cores: a run, then its first sampled batch rebuilt
def test_fraction_one_trains_on_the_students_samples_scored_by_the_teacher(world, tokenizer,
                                                                           tmp_path):
    cfg = experiment(world, tokenizer, "one", trainer={"steps": 1},
                     on_policy={"fraction": 1.0, "max_new_tokens": NEW})
    result = train.run(cfg, tmp_path / "one", report=False)
    (logged,) = read_metrics(result.run_dir)
    assert logged["on_policy/fraction"] == 1.0

    # What step 0 received: the first batch's prompts continued by the initial student.
    s = runs.setup(cfg)
    params = init_sharded_state(s.distiller, cfg.seed, s.mesh, s.rules)["params"]
    batch = dict(next(iter(s.batches(cfg.data.train_split, train=True))))
    device_batch = parallel.shard_batch(batch, s.mesh, s.rules)
    sampler = s.sampler()
    sampled, length = sampler.compile(s.mesh, s.rules, params, device_batch)(
        params, device_batch, jnp.zeros((), jnp.int32))
    assert sampled["input_ids"].sharding == device_batch["input_ids"].sharding
    sampled = {k: np.asarray(v) for k, v in sampled.items()}
    prompt = np.asarray(prompt_mask(batch))
    tokens, emitted = map(np.asarray, generate(
        s.distiller.student, params, batch["input_ids"], prompt, max_new_tokens=NEW,
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, temperature=1.0,
        rng=jax.random.fold_in(jax.random.key(cfg.seed), 0)))
    for row in range(len(prompt)):
        n_prompt = int(prompt[row].sum())
        response = tokens[row][emitted[row] == 1][:MAX_LEN - n_prompt]
        width = n_prompt + len(response)
        np.testing.assert_array_equal(sampled["input_ids"][row, :width],
                                      np.concatenate([batch["input_ids"][row, :n_prompt],
                                                      response]))
        np.testing.assert_array_equal(sampled["loss_mask"][row],
                                      (np.arange(MAX_LEN) >= n_prompt) & (np.arange(MAX_LEN)
                                                                          < width))
        assert sampled["attention_mask"][row].sum() == width
    assert not np.array_equal(sampled["input_ids"], batch["input_ids"])
    assert logged["on_policy/sampled_tokens"] == pytest.approx(
        sampled["loss_mask"].sum(-1).mean(), rel=1e-6) == pytest.approx(float(length))
    # answer_span none: no answer tokens in a sample; the rest of the reply is all style.
    assert not sampled["answer_mask"].any()
    np.testing.assert_array_equal(sampled["next_style_mask"], sampled["next_loss_mask"])
    np.testing.assert_array_equal(sampled["record_index"], batch["record_index"])

    # The teacher's KL on those tokens, as a plain dense loss over the full vocabulary.
    def log_probs(model, model_params):
        hidden, unembed = model.apply(model_params, sampled)["lm"]
        return _log_softmax(np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64))

    log_t = log_probs(s.teachers.models["tone"], s.teachers.params["tone"])
    log_s = log_probs(s.distiller.student, params)
    kl_BxT = np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)
    weight = sampled["next_loss_mask"].astype(np.float64)
    dense_kl = float(np.sum(kl_BxT * weight) / weight.sum())
    assert logged["loss/response"] == pytest.approx(dense_kl, rel=1e-4)
    assert logged["loss/answer"] == 0.0  # the term on the answer span sat the step out


@pytest.mark.slow  # ~20 s on two cores: three short runs
def test_resume_with_on_policy_is_bitwise_exact(world, tokenizer, tmp_path):
    on_policy = {"fraction": 0.5, "max_new_tokens": NEW}
    draws = [is_on_policy(0, step, 0.5) for step in range(4)]
    assert any(draws[2:]) and not all(draws)  # both kinds of step after the resume point
    full = train.run(experiment(world, tokenizer, "full", on_policy=on_policy),
                     tmp_path / "full", report=False)
    half = experiment(world, tokenizer, "split", on_policy=on_policy, trainer={"steps": 2})
    train.run(half, tmp_path / "split", report=False)
    resumed = train.run(experiment(world, tokenizer, "split", on_policy=on_policy),
                        tmp_path / "split", report=False)
    assert json.loads((resumed.run_dir / "run.json").read_text())["resumed_from_step"] == 2
    assert read_metrics(resumed.run_dir) == [
        {**line, "steps_per_second": line_b["steps_per_second"],
         "flops_per_second": line_b["flops_per_second"]}
        for line, line_b in zip(read_metrics(full.run_dir), read_metrics(resumed.run_dir),
                                strict=True)]
    assert [line["on_policy/fraction"] for line in read_metrics(full.run_dir)] == [
        sum(draws[:n]) / n for n in range(1, 5)]
    for a, b in zip(jax.tree.leaves(load_params(full.run_dir)[1]),
                    jax.tree.leaves(load_params(resumed.run_dir)[1]), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow  # ~10 s on two cores: the sampler compiled for two meshes
def test_sampling_on_a_sharded_mesh_draws_what_one_device_draws():
    # Vocabulary over `tensor`, weights over `fsdp`, rows over `data` and `fsdp`: the same
    # tokens as unsharded, and the batch comes back in the batch's sharding.
    from jaxdistill.on_policy import Sampler

    model = functional(ModelConfig(
        backbone={"type": "decoder", "vocab_size": 64, "hidden": 32, "layers": 1, "heads": 2,
                  "kv_heads": 2, "head_dim": 16, "mlp": 64, "dtype": "float32", "remat": "none"},
        heads={"lm": {"type": "lm"}}))
    params = random_params(model, 0, stddev=0.5)
    rng = np.random.default_rng(0)
    real = np.arange(16)[None] < rng.integers(8, 16, (8, 1))
    loss = (np.arange(16)[None] >= rng.integers(2, 6, (8, 1))) & real
    batch = {"input_ids": (rng.integers(2, 64, (8, 16)) * real).astype(np.int32),
             "attention_mask": real.astype(np.int32), "loss_mask": loss.astype(np.int32),
             "answer_mask": np.zeros((8, 16), np.int32),
             "next_style_mask": loss.astype(np.int32), "record_index": np.arange(8, dtype=np.int32)}
    sampler = Sampler(model, seed=0, max_new_tokens=6, eos_id=1, pad_id=0,
                      answer_span="response")
    drawn = []
    for mesh in (jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                                   parallel.MESH_AXES), parallel.make_mesh((2, 2, 2))):
        rules = dict(parallel.DEFAULT_RULES)
        sharded_params = jax.device_put(params, model.shardings(mesh, rules))
        device_batch = parallel.shard_batch(batch, mesh, rules)
        out, _ = sampler.compile(mesh, rules, sharded_params, device_batch)(
            sharded_params, device_batch, jnp.asarray(3, jnp.int32))
        assert all(out[k].sharding == device_batch[k].sharding for k in device_batch)
        drawn.append(jax.tree.map(np.asarray, out))
    assert set(drawn[0]) == set(batch)
    np.testing.assert_array_equal(drawn[0]["answer_mask"], drawn[0]["loss_mask"])
    assert not drawn[0]["next_style_mask"].any()
    np.testing.assert_array_equal(drawn[0]["record_index"], batch["record_index"])
    for key in drawn[0]:
        np.testing.assert_array_equal(drawn[0][key], drawn[1][key])
    # The prompts are kept and the responses are new tokens.
    prompt = np.asarray(prompt_mask(batch)).astype(bool)
    np.testing.assert_array_equal(drawn[0]["input_ids"][prompt], batch["input_ids"][prompt])
    assert not np.array_equal(drawn[0]["input_ids"], batch["input_ids"])
