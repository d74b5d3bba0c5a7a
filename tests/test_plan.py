"""Memory planning: per-device bytes of a config's fused step from abstract arrays, checked
against arrays really placed by the same rules, XLA's compiled figures, and the CLI."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxdistill import cli, config as config_lib, parallel, plan
from jaxdistill.distill.step import Distiller, init_sharded_state, make_optimizer
from jaxdistill.models.model import count_params, functional

# Buffer assignment runs before LLVM, so cutting LLVM's optimisation leaves every figure as is
# and makes the compile of three models' step on 8 devices about a third faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
BACKBONE = {"type": "decoder", "family": "qwen3", "vocab_size": 256, "hidden": 64, "layers": 1,
            "heads": 4, "kv_heads": 2, "head_dim": 16, "mlp": 128, "dtype": "float32",
            "param_dtype": "float32", "remat": "none"}
HF_CONFIG = {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64,
             "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
             "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}
RELEVANCE = {"type": "token_score", "token_ids": [5, 6]}
PLAN = plan.plan
ACTIONS = {"type": "actions", "names": ["click", "apply"]}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """An experiment with an hf: teacher (config.json only), an int8 run: teacher (config.yaml
    only) and an offline teacher: no weights anywhere."""
    root = tmp_path_factory.mktemp("plan")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps(HF_CONFIG))
    (root / "run").mkdir()
    (root / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"backbone": BACKBONE, "heads": {"actions": ACTIONS, "relevance": RELEVANCE},
                   "init": "scratch"}}))
    experiment = {
        "name": "plan-test",
        "teachers": {
            "relevance": {"source": f"hf:{root / 'hf'}", "heads": {"relevance": RELEVANCE}},
            "engagement": {"source": f"run:{root / 'run'}", "heads": {"actions": ACTIONS},
                           "quantize": "int8"},
            "cached": {"source": f"offline:{root / 'cache'}"}},
        "model": {"backbone": BACKBONE, "heads": {"relevance": RELEVANCE, "actions": ACTIONS}},
        "objective": [
            {"name": "rel", "loss": "forward_kl", "teacher": "relevance", "student": "relevance"},
            {"name": "eng", "loss": "soft_bce", "teacher": "engagement", "student": "actions",
             "mask": "action_mask"},
            {"name": "cached_rel", "loss": "forward_kl", "teacher": "cached",
             "student": "relevance"},
            {"name": "grades", "loss": "bce", "student": "actions", "label": "actions"}],
        "data": {"path": str(root / "data"), "kind": "pointwise", "tokenizer": "builtin:wordpiece",
                 "max_len": 16, "batch_size": 8, "action_names": ["click", "apply"],
                 "member_features_dim": 3},
        "mesh": {"shape": [1, 8, 1]},
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def _held_per_device(tree) -> int:
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    assert len(set(held.values())) == 1, held
    return next(iter(held.values()))


def test_fsdp_plan_matches_placed_arrays_and_compiled_arguments(config_file):
    cfg = config_lib.load_config(config_file)
    report = plan.plan(cfg, device_memory=plan.parse_bytes("1GiB"), compiler_options=FAST_COMPILE)
    assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    # The student state the trainer really creates, placed by the same rules: same bytes.
    student = functional(config_lib.ModelConfig(backbone=cfg.model.backbone,
                                                heads=cfg.model.heads))
    optimizer, schedule = make_optimizer(cfg.optimizer)
    distiller = Distiller(student=student, teachers={}, terms=tuple(cfg.objective),
                          optimizer=optimizer, schedule=schedule)
    mesh = parallel.make_mesh(cfg.mesh.shape)
    host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), student.shapes)
    state = init_sharded_state(distiller, 0, mesh, cfg.mesh.rules, params=host)
    assert report.student_params == _held_per_device(state["params"])
    assert report.optimizer_state == _held_per_device(state["opt_state"])
    total = count_params(student.shapes) * 4
    assert total / 8 <= report.student_params <= total / 8 * 1.05
    # Teachers in bf16 (their default dtype), the hf one 2 layers with mlp 256.
    assert set(report.teachers) == {"relevance", "engagement"}  # `cached` is offline
    assert report.teachers["relevance"] > report.teachers["engagement"]
    # XLA's arguments are what the declared shardings say each device holds (less the batch
    # keys this objective never reads: jit prunes unused arguments).
    args = report.student_params + report.optimizer_state + sum(report.teachers.values())
    assert args < report.compiled["argument"] <= args + report.batch
    # Donated: the new state reuses the old state's buffers (with the step and skip counters).
    assert report.compiled["alias"] == report.student_params + report.optimizer_state + 2 * 4
    c = report.compiled
    assert c["temp"] > 0 and report.peak == c["argument"] + c["output"] - c["alias"] + c["temp"]
    assert report.fits is True
    text = report.format()
    assert "8 devices (data 1 x fsdp 8 x tensor 1)" in text and "fits in 1.00 GiB" in text


def test_cli_plan_data_parallel_json(config_file, capsys, monkeypatch):
    fast = lambda cfg, memory: PLAN(cfg, memory, compiler_options=FAST_COMPILE)  # noqa: E731
    monkeypatch.setattr(plan, "plan", fast)
    assert cli.main(["plan", str(config_file), "--set", "mesh.shape=[8,1,1]",
                     "--device-memory", "64KiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    student = functional(config_lib.ModelConfig(backbone=BACKBONE,
                                                heads={"relevance": RELEVANCE, "actions": ACTIONS}))
    # Data parallel: every device holds everything (fp32 student, Adam mu + nu, scalars).
    assert report["student_params"] == count_params(student.shapes) * 4
    assert 2 * report["student_params"] <= report["optimizer_state"] <= (
        2 * report["student_params"] + 64)
    teacher = functional(config_lib.ModelConfig(
        backbone={**BACKBONE, "mlp": 256, "layers": 2}, heads={"relevance": RELEVANCE}))
    assert report["teachers"]["relevance"] == count_params(teacher.shapes) * 2  # bf16
    # The int8 engagement teacher: projection kernels 1 byte per weight plus a bf16 scale per
    # output channel; everything else bf16.
    engagement = functional(config_lib.ModelConfig(backbone=BACKBONE, heads={"actions": ACTIONS}))
    d, q, kv, f = 64, 4 * 16, 2 * 16, 128
    kernels = d * q * 2 + d * kv * 2 + 3 * d * f
    scales = q + kv + kv + d + f + f + d
    assert report["teachers"]["engagement"] == (
        (count_params(engagement.shapes) - kernels) * 2 + kernels + scales * 2)
    assert report["fits"] is False and report["device_memory"] == 64 * 1024


@pytest.mark.parametrize("text, expected", [
    ("80GiB", 80 * 2**30), ("141GB", 141e9), ("24e9", 24e9), ("512 MiB", 512 * 2**20),
    ("1.5kb", 1500), ("7", 7)])
def test_parse_bytes(text, expected):
    assert plan.parse_bytes(text) == int(expected)


def test_parse_bytes_error():
    with pytest.raises(ValueError, match=r"device memory '80 gigs': expected a number with an "
                                         r"optional unit"):
        plan.parse_bytes("80 gigs")


def test_missing_teacher_directory(config_file, tmp_path):
    cfg = config_lib.load_config(config_file, [f"teachers.relevance.source=hf:{tmp_path}/nope"])
    with pytest.raises(FileNotFoundError, match=r"teachers.relevance.source 'hf:.*nope': "
                                                r"directory .* not found"):
        plan.plan(cfg)


def test_plan_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: jaxdistill plan" in out and "--device-memory" in out and "examples:" in out


def test_linkedin_config_teachers_are_read_without_weights(monkeypatch):
    from jaxdistill.models import decoder

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the sources are repo-relative
    cfg = config_lib.load_config("configs/bench/linkedin.yaml")
    example = plan.abstract_batch(cfg)
    assert example["input_ids"].shape == (16, 512)
    teachers = {name: plan.teacher_model(name, section, example)
                for name, section in cfg.teachers.items()}
    reference = functional(config_lib.ModelConfig(
        backbone=decoder.qwen3_1_7b(dtype="bfloat16", param_dtype="bfloat16", remat="none"),
        heads={"relevance": RELEVANCE | {"token_ids": [2753, 9454]}}))
    assert teachers["relevance_teacher"].shapes == reference.shapes
    assert count_params(teachers["engagement_teacher"].shapes) == pytest.approx(1.7206e9, rel=1e-4)
    assert count_params(functional(config_lib.ModelConfig(
        backbone=cfg.model.backbone, heads=cfg.model.heads)).shapes) == pytest.approx(
        0.5961e9, rel=1e-4)


def test_abstract_batch_is_the_pipelines_batch(tmp_path):
    """The plan compiles for the batches training really feeds: same keys, shapes, dtypes."""
    import random

    from jaxdistill.data import sources
    from jaxdistill.data.batches import split_batches
    from jaxdistill.data.tokenizer import load_tokenizer
    from test_train import experiment, listwise_records

    tokenizer = load_tokenizer("builtin:wordpiece")
    data_dir = sources.write_dataset({"train": listwise_records(8, 0, random.Random(0))},
                                     "listwise", tmp_path / "data")
    cfg = experiment(data_dir, tokenizer, "contract", data={"shuffle": False})
    real = next(iter(split_batches(cfg, "train", train=True)))
    shapes = lambda tree: jax.tree.map(lambda x: (np.shape(x), np.dtype(x.dtype)), tree)  # noqa
    # The records carry one member feature; the pipeline reads the width off the data, the plan
    # off the config (data.member_features_dim, else the action heads' `features`).
    assert shapes(dict(real))["member_features"] == ((8, 1), np.dtype(np.float32))
    assert shapes(plan.abstract_batch(cfg))["member_features"] == ((8, 0), np.dtype(np.float32))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"member_features_dim": 1})})
    assert shapes(plan.abstract_batch(cfg)) == shapes(dict(real))
    heads = {**cfg.model.heads, "actions": {"type": "actions", "names": ["click"], "features": 3}}
    cfg = experiment(data_dir, tokenizer, "contract", model={"heads": heads})
    assert shapes(plan.abstract_batch(cfg))["member_features"] == ((8, 3), np.dtype(np.float32))
