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


def experiment(data_dir, vocab, *, offline=None, term=None, **data):
    model = teacher_cfg(vocab)
    source = f"offline:{offline}" if offline else "run:unused"
    return config_lib.validate({
        "name": "chat_cache",
        "model": {"backbone": model.backbone.model_dump(), "heads": {"lm": {"type": "lm"}}},
        "teachers": {"accuracy": {"source": source, "dtype": "float32"}},
        "objective": [{"name": "accuracy", "loss": "sparse_token_kl", "student": "lm",
                       "teacher": "accuracy", "mask": "next_loss_mask",
                       "hparams": {"temperature": TEMPERATURE}, **(term or {})}],
        "data": {"path": str(offline or data_dir), "kind": "chat",
                 "tokenizer": "builtin:wordpiece", "max_len": MAX_LEN, "batch_size": 4,
                 "shuffle": False, **data},
    }, source="chat_cache")


def test_topk_cache_is_the_live_teachers_and_trains_as_it(data_dir, vocab, tmp_path):
    model = functional(teacher_cfg(vocab))
    params = model.init(1)
    out = tmp_path / "cache"
    report = cache.cache_outputs(experiment(data_dir, vocab), "accuracy", teacher_cfg(vocab),
                                 params, out, top_k=K, temperature=TEMPERATURE,
                                 logprob_dtype="float32")
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
    hidden, unembed = model.apply(params, inputs)["lm"]
    live = losses.topk_teacher(hidden, unembed, K, inputs["next_loss_mask"],
                               temperature=TEMPERATURE)
    # Stored exactly where the next token is a response token, shifted as the masks are.
    np.testing.assert_array_equal(cached["topk_ids"][..., 0] >= 0, batch["next_loss_mask"] == 1)
    np.testing.assert_array_equal(cached["topk_ids"], live["topk_ids"])
    # The cache came from the evaluator's program on 8 devices, `live` from one forward.
    np.testing.assert_allclose(cached["topk_logprobs"], live["topk_logprobs"], rtol=1e-5)
    np.testing.assert_allclose(cached["tail_logprob"], live["tail_logprob"], rtol=1e-5, atol=1e-6)

    # The first step's loss from the cache is the live teacher's sparse KL.
    student = functional(teacher_cfg(vocab))
    student_out = student.apply(student.init(7), inputs)
    _, from_cache = compute_objective(tuple(cfg.objective), student_out, {}, batch,
                                      jnp.asarray(0))
    expected = losses.sparse_token_kl(*student_out["lm"], live, inputs["next_loss_mask"],
                                      temperature=TEMPERATURE)
    np.testing.assert_allclose(from_cache["loss/accuracy"], expected, rtol=1e-4)
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


def test_topk_misuse_is_refused_naming_the_key(data_dir, vocab, tmp_path):
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
    assert not any((tmp_path / name).exists() for name in "abcd")

    out = tmp_path / "cache"
    cache.cache_outputs(cfg, "accuracy", teacher_cfg(vocab), params, out, top_k=K,
                        temperature=TEMPERATURE)
    assert cache.read_manifest(out)["accuracy"]["bytes_per_token"] == 4 + K * (4 + 2) + 4
    blob = sources.open_source(out, "train").stored_topk()[("accuracy", "lm")][0]
    assert topk_store.unpack_topk(blob)[2].dtype == np.float16  # the default storage
    with pytest.raises(ConfigError, match="hparams.temperature is 1.0 but .* temperature 2.0"):
        cache.check_offline_sources(experiment(data_dir, vocab, offline=out,
                                               term={"hparams": {}}))
    with pytest.raises(ConfigError, match="its loss must be 'sparse_token_kl', found 'token_kl'"):
        cache.check_offline_sources(experiment(data_dir, vocab, offline=out, term={
            "loss": "token_kl", "hparams": {"temperature": TEMPERATURE}}))
    with pytest.raises(ConfigError, match="at max_len 32; data.tokenizer is .* data.max_len 16"):
        cache.check_offline_sources(experiment(data_dir, vocab, offline=out, max_len=16))


# One process of a 2-process cache (1 CPU device each): caches the accuracy teacher's top-k.
CHILD = textwrap.dedent("""
    import json, os, sys
    config_path, out, address, process_id, processes = sys.argv[1:6]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxdistill import cache, config as config_lib, parallel
    from jaxdistill.models.model import ModelConfig, functional

    parallel.initialize_distributed(address, num_processes=int(processes),
                                    process_id=int(process_id))
    cfg = config_lib.load_config(config_path)
    model_cfg = ModelConfig(backbone=cfg.model.backbone, heads=cfg.model.heads)
    report = cache.cache_outputs(cfg, "accuracy", model_cfg, functional(model_cfg).init(1), out,
                                 top_k=%d, temperature=%r)
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
def test_two_process_cache_reads_back_as_one_process(data_dir, vocab, tmp_path):
    from test_multihost import free_port

    cfg = experiment(data_dir, vocab)
    one = tmp_path / "one"
    cache.cache_outputs(cfg, "accuracy", teacher_cfg(vocab), functional(teacher_cfg(vocab)).init(1),
                        one, top_k=K, temperature=TEMPERATURE)
    config_path, child = tmp_path / "cfg.yaml", tmp_path / "child.py"
    config_path.write_text(config_lib.resolved_yaml(cfg))
    child.write_text(CHILD)
    two, address = tmp_path / "two", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    children = [subprocess.Popen([sys.executable, str(child), str(config_path), str(two), address,
                                  str(i), "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for i in range(2)]
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
            # One process ran on 8 devices, the two on one each: float16 may round apart.
            np.testing.assert_allclose(lp_a.astype(np.float32), lp_b.astype(np.float32),
                                       atol=1e-2)
            np.testing.assert_allclose(tail_a, tail_b, rtol=1e-5, atol=1e-6)
