"""cache-teacher --top-k: an lm teacher's top-k over chat records, read back into the batch
(unpacked and packed), trained from by sparse_token_kl, refused where misused, and written
sharded by two local processes exactly as one process writes it."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import cache
from jaxdistill import config as config_lib
from jaxdistill.config import ConfigError
from jaxdistill.data import sources, topk_store
from jaxdistill.data.batches import split_batches
from jaxdistill.data.tokenizer import load_tokenizer
from jaxdistill.distill import losses
from jaxdistill.distill.objectives import compute_objective
from jaxdistill.models.model import ModelConfig, functional

K, MAX_LEN, TEMPERATURE = 8, 32, 2.0
WORDS = "hello python job remote data engineer nurse doc mail text prize".split()


def chat_records(n, offset):
    rng = np.random.default_rng(offset)
    return [{"messages": [
        {"role": "user", "content": " ".join(rng.choice(WORDS, 2 + i % 4))},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS, 1 + (i * 3) % 7))}]}
        for i in range(n)]


@pytest.fixture(scope="module")
def vocab():
    return len(load_tokenizer("builtin:wordpiece"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return sources.write_dataset({"train": chat_records(10, 0), "validation": chat_records(5, 1)},
                                 "chat", tmp_path_factory.mktemp("chat") / "data")


def teacher_cfg(vocab, heads=None) -> ModelConfig:
    return ModelConfig(
        backbone={"type": "decoder", "vocab_size": vocab, "hidden": 16, "layers": 1, "heads": 2,
                  "kv_heads": 1, "head_dim": 8, "mlp": 32, "dtype": "float32",
                  "param_dtype": "float32", "remat": "none"},
        heads=heads or {"lm": {"type": "lm"}})


def experiment(data_dir, vocab, *, offline=None, term=None, teacher=None, **data):
    model = teacher_cfg(vocab)
    source = f"offline:{offline}" if offline else "run:unused"
    return config_lib.validate({
        "name": "chat_cache",
        "model": {"backbone": model.backbone.model_dump(), "heads": {"lm": {"type": "lm"}}},
        "teachers": {"accuracy": teacher or {"source": source, "dtype": "float32"}},
        "objective": [{"name": "accuracy", "loss": "sparse_token_kl", "student": "lm",
                       "teacher": "accuracy", "mask": "next_loss_mask",
                       "hparams": {"temperature": TEMPERATURE}, **(term or {})}],
        "data": {"path": str(offline or data_dir), "kind": "chat",
                 "tokenizer": "builtin:wordpiece", "max_len": MAX_LEN, "batch_size": 4,
                 "shuffle": False, **data},
    }, source="chat_cache")


@pytest.fixture(scope="module")
def topk_cache(data_dir, vocab, tmp_path_factory):
    """The accuracy teacher's top-k cache (float32 log-probs), its report and the teacher."""
    out = tmp_path_factory.mktemp("topk") / "cache"
    params = functional(teacher_cfg(vocab)).init(1)
    report = cache.cache_outputs(experiment(data_dir, vocab), "accuracy", teacher_cfg(vocab),
                                 params, out, top_k=K, temperature=TEMPERATURE,
                                 logprob_dtype="float32")
    return out, report, params


def test_topk_cache_is_the_live_teachers_and_trains_as_it(data_dir, vocab, topk_cache):
    model = functional(teacher_cfg(vocab))
    out, report, params = topk_cache
    manifest = cache.read_manifest(out)["accuracy"]
    assert manifest["bytes_per_token"] == 4 + K * (4 + 4) + 4 == report["bytes_per_token"]
    assert (manifest["top_k"], manifest["temperature"], manifest["logprob_dtype"]) == (
        K, TEMPERATURE, "float32")
    assert sources.dataset_info(out)["splits"] == {"train": 10, "validation": 5}
    cfg = experiment(data_dir, vocab, offline=out)
    cache.check_offline_sources(cfg)

    batch = next(iter(split_batches(cfg, "train", train=False)))
    cached = batch["offline"]["accuracy"]["lm"]
    assert cached["topk_ids"].shape == (4, MAX_LEN, K) and cached["topk_ids"].dtype == np.int32
    assert cached["topk_logprobs"].dtype == np.float32
    assert manifest["stored_tokens"] == sum(
        int(np.sum(b["next_loss_mask"])) for split in ("train", "validation")
        for b in split_batches(cfg, split, train=False))
    inputs = {k: v for k, v in batch.items() if k != "offline"}
    student = functional(teacher_cfg(vocab))

    @jax.jit
    def live_and_loss(params, student_params, inputs, cached_batch):
        hidden, unembed = model.apply(params, inputs)["lm"]
        live = losses.topk_teacher(hidden, unembed, K, inputs["next_loss_mask"],
                                   temperature=TEMPERATURE)
        student_out = student.apply(student_params, inputs)
        _, from_cache = compute_objective(tuple(cfg.objective), student_out, {}, cached_batch,
                                          jnp.asarray(0))
        expected = losses.sparse_token_kl(*student_out["lm"], live, inputs["next_loss_mask"],
                                          temperature=TEMPERATURE)
        return live, from_cache["loss/accuracy"], expected

    live, from_cache, expected = live_and_loss(params, student.init(7), inputs, batch)
    # Stored exactly where the next token is a response token, shifted as the masks are.
    np.testing.assert_array_equal(cached["topk_ids"][..., 0] >= 0, batch["next_loss_mask"] == 1)
    np.testing.assert_array_equal(cached["topk_ids"], live["topk_ids"])
    # The cache came from the evaluator's program on 8 devices, `live` from one forward.
    np.testing.assert_allclose(cached["topk_logprobs"], live["topk_logprobs"], rtol=1e-5)
    np.testing.assert_allclose(cached["tail_logprob"], live["tail_logprob"], rtol=1e-5, atol=1e-6)

    # The first step's loss from the cache is the live teacher's sparse KL.
    np.testing.assert_allclose(from_cache, expected, rtol=1e-4)
    assert float(expected) > 0

    # Packed rows carry the same distributions, packed like the masks (-1 ids on padding).
    packed = next(iter(split_batches(experiment(data_dir, vocab, offline=out, pack=True),
                                     "train", train=False)))
    ids = packed["offline"]["accuracy"]["lm"]["topk_ids"]
    np.testing.assert_array_equal(ids[..., 0] >= 0, packed["next_loss_mask"] == 1)
    first = packed["segment_ids"][0] == 1  # the first record opens the first row
    length = int(first.sum())
    np.testing.assert_array_equal(ids[0][first], cached["topk_ids"][0, :length])
    assert np.all(ids[packed["segment_ids"] == 0] == -1)


def test_topk_bytes_round_trip():
    rng = np.random.default_rng(0)
    positions, ids = np.array([2, 3, 7]), rng.integers(0, 500, (3, K))
    logprobs, tail = -rng.random((3, K)) * 12, np.array([-0.5, -np.inf, -3.0])
    for dtype, itemsize in (("float16", 2), ("float32", 4)):
        blob = topk_store.pack_topk(positions, ids, logprobs, tail, dtype)
        assert len(blob) == 12 + 3 * topk_store.bytes_per_token(K, dtype)
        assert topk_store.bytes_per_token(K, dtype) == 4 + K * (4 + itemsize) + 4
        dense = topk_store.dense_topk(blob, 9)
        assert dense["topk_logprobs"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(dense["topk_ids"][positions], ids)
        assert np.all(dense["topk_ids"][[0, 1, 4, 5, 6, 8]] == -1)
        np.testing.assert_array_equal(dense["tail_logprob"][positions], tail.astype(np.float32))
        # float16: within half a unit in the last place (2**-7 at [-16, -8)) of each log-prob.
        np.testing.assert_allclose(dense["topk_logprobs"][positions], logprobs,
                                   atol=2.0**-8 if dtype == "float16" else 1e-6)


def test_topk_misuse_is_refused_naming_the_key(data_dir, vocab, topk_cache, tmp_path):
    cfg = experiment(data_dir, vocab)
    params = functional(teacher_cfg(vocab)).init(1)
    with pytest.raises(ConfigError, match=r"--top-k must be an integer in \[1, "):
        cache.cache_outputs(cfg, "accuracy", teacher_cfg(vocab), params, tmp_path / "a",
                            top_k=vocab + 1)
    scorer = teacher_cfg(vocab, {"score": {"type": "classifier", "classes": 2}})
    with pytest.raises(ConfigError, match="--top-k caches one lm head.*no lm head"):
        cache.cache_outputs(cfg, "accuracy", scorer, params, tmp_path / "b", top_k=K)
    pointwise = cfg.model_copy(update={"data": cfg.data.model_copy(update={"kind": "pointwise"})})
    with pytest.raises(ConfigError, match="--top-k: data.kind is 'pointwise'"):
        cache.cache_outputs(pointwise, "accuracy", teacher_cfg(vocab), params, tmp_path / "c",
                            top_k=K)
    with pytest.raises(ConfigError, match="with --top-k"):
        cache.cache_outputs(cfg, "accuracy", teacher_cfg(vocab), params, tmp_path / "d")
    with pytest.raises(ConfigError, match="--logprob-dtype must be one of"):
        cache.cache_outputs(cfg, "accuracy", teacher_cfg(vocab), params, tmp_path / "e",
                            top_k=K, logprob_dtype="bfloat16")
    assert not any((tmp_path / name).exists() for name in "abcde")

    out = topk_cache[0]
    with pytest.raises(ConfigError, match="hparams.temperature is 1.0 but .* temperature 2.0"):
        cache.check_offline_sources(experiment(data_dir, vocab, offline=out,
                                               term={"hparams": {}}))
    with pytest.raises(ConfigError, match="its loss must be 'sparse_token_kl', found 'token_kl'"):
        cache.check_offline_sources(experiment(data_dir, vocab, offline=out, term={
            "loss": "token_kl", "hparams": {"temperature": TEMPERATURE}}))
    with pytest.raises(ConfigError, match="at max_len 32; data.tokenizer is .* data.max_len 16"):
        cache.check_offline_sources(experiment(data_dir, vocab, offline=out, max_len=16))


# ~10 s on two cores: one compile of the sharded fused step.
@pytest.mark.slow
def test_fused_step_mixes_the_cached_and_a_live_teacher(data_dir, vocab, topk_cache):
    from jaxdistill import parallel
    from jaxdistill.distill.objectives import Term
    from jaxdistill.distill.step import (Distiller, OptimizerConfig, compile_step,
                                         init_sharded_state, make_optimizer)

    cfg = experiment(data_dir, vocab, offline=topk_cache[0])
    batch = next(iter(split_batches(cfg, "train", train=False)))
    batch = {k: v for k, v in batch.items() if k != "record_index"}
    student, tone = functional(teacher_cfg(vocab)), functional(teacher_cfg(vocab))
    student_params, tone_params = student.init(7), tone.init(3)
    terms = (*cfg.objective, Term(name="tone", loss="token_kl", student="lm", teacher="tone",
                                  mask="next_loss_mask", hparams={"kind": "reverse"},
                                  weight=0.5))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                                         total_steps=10))
    distiller = Distiller(student=student, teachers={"tone": tone}, terms=terms,
                          optimizer=optimizer, schedule=schedule)
    expected = compute_objective(terms, student.apply(student_params, batch),
                                 {"tone": tone.apply(tone_params, batch)}, batch,
                                 jnp.asarray(0))[1]
    mesh, rules = parallel.make_mesh((2, 1, 4)), parallel.DEFAULT_RULES
    state = init_sharded_state(distiller, 0, mesh, rules, params=student_params)
    teacher_params = {"tone": jax.device_put(tone_params, tone.shardings(mesh, rules))}
    step = compile_step(distiller, mesh, rules, state, teacher_params, batch)
    # As in test_chat_step: the same program, compiled faster.
    step = step.lower(state, teacher_params, batch).compile(
        {"xla_backend_optimization_level": 0})
    state, metrics = step(state, teacher_params, batch)
    for key in ("loss/accuracy", "loss/tone", "loss/total"):
        np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert float(metrics["loss/accuracy"]) > 0 and float(metrics["loss/tone"]) > 0


# One process of a 2-process cache (1 CPU device each): caches the accuracy teacher's top-k.
CHILD = textwrap.dedent("""
    import json, os, sys
    config_path, params_path, out, address, process_id, processes = sys.argv[1:7]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import numpy as np
    from jaxdistill import cache, config as config_lib, parallel
    from jaxdistill.models.model import ModelConfig, functional

    parallel.initialize_distributed(address, num_processes=int(processes),
                                    process_id=int(process_id))
    cfg = config_lib.load_config(config_path)
    model_cfg = ModelConfig(backbone=cfg.model.backbone, heads=cfg.model.heads)
    leaves = np.load(params_path)  # the parent's teacher (no init program to compile here)
    params = jax.tree.unflatten(jax.tree.structure(functional(model_cfg).shapes),
                                [leaves[f"arr_{i}"] for i in range(len(leaves.files))])
    report = cache.cache_outputs(cfg, "accuracy", model_cfg, params, out,
                                 top_k=%d, temperature=%r, logprob_dtype="float32")
    print("REPORT", json.dumps(report), flush=True)
""" % (K, TEMPERATURE))


def _read_back(data_dir):
    out = {}
    for split in ("train", "validation"):
        source = sources.open_source(data_dir, split)
        (blobs,) = source.stored_topk().values()
        out[split] = ([source[i] for i in range(len(source))],
                      [topk_store.unpack_topk(blobs[i]) for i in range(len(source))])
    return out


@pytest.mark.slow  # two fresh JAX processes start (~15 s on two busy cores)
def test_two_process_cache_reads_back_as_one_process(data_dir, vocab, topk_cache, tmp_path):
    from test_multihost import free_port

    cfg = experiment(data_dir, vocab)
    one = topk_cache[0]
    config_path, child = tmp_path / "cfg.yaml", tmp_path / "child.py"
    config_path.write_text(config_lib.resolved_yaml(cfg))
    params_path = tmp_path / "teacher.npz"
    np.savez(params_path, *jax.tree.leaves(jax.device_get(topk_cache[2])))
    child.write_text(CHILD)
    two, address = tmp_path / "two", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    children = [subprocess.Popen([sys.executable, str(child), str(config_path), str(params_path),
                                  str(two), address, str(i), "2"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        outputs = [c.communicate(timeout=120) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    for i, (c, (stdout, stderr)) in enumerate(zip(children, outputs)):
        assert c.returncode == 0, f"process {i} failed:\n{stderr[-3000:]}"
    report = json.loads(outputs[0][0].split("REPORT ", 1)[1])
    assert report["processes"] == 2 and report["splits"] == {"train": 10, "validation": 5}

    # Each process wrote its own shards; process 0 joined them and wrote the manifest.
    assert sorted(p.name for p in (two / "offline/accuracy/lm").iterdir()) == [
        f"{split}.array_record-0000{i}-of-00002" for split in ("train", "validation")
        for i in range(2)]
    assert len(list(two.glob("*-train.array_record-*-of-00002"))) == 2
    assert not list(tmp_path.glob(".two*"))  # no part left behind
    assert cache.read_manifest(two) == cache.read_manifest(one)
    info_one, info_two = sources.dataset_info(one), sources.dataset_info(two)
    assert info_two["splits"] == info_one["splits"]
    assert info_two["content_sha256"] == info_one["content_sha256"]
    read_one, read_two = _read_back(one), _read_back(two)
    for split, (records, topk) in read_one.items():
        assert read_two[split][0] == records
        for (pos_a, ids_a, lp_a, tail_a), (pos_b, ids_b, lp_b, tail_b) in zip(
                topk, read_two[split][1]):
            np.testing.assert_array_equal(pos_a, pos_b)
            np.testing.assert_array_equal(ids_a, ids_b)
            # One process ran on 8 devices, the two on one each: float32 rounding apart.
            np.testing.assert_allclose(lp_a, lp_b, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(tail_a, tail_b, rtol=1e-5, atol=1e-6)


# ~10 s on two cores: `plan` compiles the fused step (abstract arrays only).
@pytest.mark.slow
def test_plan_reads_the_top_k_cache_shapes(data_dir, vocab, topk_cache):
    from jaxdistill import plan as plan_lib

    cfg = experiment(data_dir, vocab, offline=topk_cache[0], batch_size=8)
    result = plan_lib.plan(cfg)
    tokens = 8 * MAX_LEN
    masks = (2 + 5) * tokens * 4 + 8 * 4  # input_ids, attention_mask, 5 masks; record_index
    cached = tokens * K * (4 + 4) + tokens * 4  # ids, float32 log-probs, tail
    assert result.batch * 8 == masks + cached  # every array split over the 8 devices' rows


# ~15 s on two cores: torch, a transformers model and the loader's hf: path.
@pytest.mark.slow
def test_cli_caches_an_hf_teacher_as_transformers_computes_it(data_dir, vocab, tmp_path):
    """`jaxdistill cache-teacher --top-k` on an hf: Qwen3 teacher: its cached top-k are those of
    transformers' PyTorch model, at the positions predicting each response token."""
    import torch
    import transformers

    from jaxdistill import cli

    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))  # peaked distributions, not near-uniform ones
    model.save_pretrained(hf_dir)
    load_tokenizer("builtin:wordpiece").save_pretrained(hf_dir)
    cfg = experiment(data_dir, vocab, teacher={"source": f"hf:{hf_dir}", "dtype": "float32",
                                               "heads": {"lm": {"type": "lm"}}})
    config_path, out = tmp_path / "cfg.yaml", tmp_path / "cache"
    config_path.write_text(config_lib.resolved_yaml(cfg))
    assert cli.main(["cache-teacher", str(config_path), "--teacher", "accuracy", "--out",
                     str(out), "--top-k", str(K), "--logprob-dtype", "float32"]) == 0
    # The temperature comes from the config's sparse_token_kl term on this teacher.
    assert cache.read_manifest(out)["accuracy"]["temperature"] == TEMPERATURE
    batch = next(iter(split_batches(experiment(data_dir, vocab, offline=out), "train",
                                    train=False)))
    cached = batch["offline"]["accuracy"]["lm"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                       attention_mask=torch.tensor(batch["attention_mask"])).logits
    log_p = torch.log_softmax(logits.double() / TEMPERATURE, -1)
    logprobs, ids = log_p.topk(K, -1)
    where = batch["next_loss_mask"] == 1
    np.testing.assert_array_equal(cached["topk_ids"][where], ids.numpy()[where])
    np.testing.assert_allclose(cached["topk_logprobs"][where], logprobs.numpy()[where],
                               rtol=1e-4, atol=1e-5)
    tail = np.log1p(-np.exp(logprobs.numpy()).sum(-1))
    np.testing.assert_allclose(cached["tail_logprob"][where], tail[where], rtol=1e-4, atol=1e-5)


# ~10 s on two busy cores: the evaluator's sharded program and the reference both compile.
@pytest.mark.slow
def test_evaluator_scores_the_cached_term_and_keeps_the_cache_on_device(data_dir, vocab,
                                                                        topk_cache):
    from jaxdistill import parallel
    from jaxdistill.evaluator import Evaluator

    cfg = experiment(data_dir, vocab, offline=topk_cache[0])
    student = functional(teacher_cfg(vocab))
    params = student.init(7)
    evaluator = Evaluator(student, {}, mesh=parallel.make_mesh((-1, 1, 1)),
                          rules=parallel.DEFAULT_RULES, terms=cfg.objective)
    batches = list(split_batches(cfg, "train", train=False, drop_remainder=True))
    scores = evaluator.run(params, {}, batches)
    assert not [key for key in scores.fields if key.startswith("offline/")]
    term = jax.jit(lambda params, batch: compute_objective(
        tuple(cfg.objective), student.apply(params, batch), {}, batch,
        jnp.asarray(0))[1]["loss/accuracy"])
    expected = np.mean([term(params, batch) for batch in batches])
    # A KL near 0 (a random student against a random teacher): float32 sums in another order.
    np.testing.assert_allclose(scores.terms["loss/accuracy"], expected, rtol=1e-3)
    assert expected > 0
