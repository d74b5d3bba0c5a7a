"""Checkpointer: round trip, restore onto another mesh, half-written steps, keep-best, SIGTERM."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdistill import parallel
from jaxdistill.checkpoint import CheckpointError, Checkpointer
from jaxdistill.distill.objectives import Term
from jaxdistill.distill.step import Distiller, OptimizerConfig, init_sharded_state, make_optimizer
from jaxdistill.models.decoder import DecoderConfig
from jaxdistill.models.model import ModelConfig, functional

MANIFEST = {"relevance_teacher": {"source": "run:/runs/rel", "content_hash": "ab12"}}


def tiny_distiller():
    cfg = ModelConfig(
        backbone=DecoderConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2,
                               head_dim=8, mlp=64, dtype="float32", remat="none"),
        heads={"relevance": {"type": "token_score", "token_ids": [1, 2]}})
    optimizer, schedule = make_optimizer(OptimizerConfig())
    term = Term(name="grades", loss="listnet", student="relevance", label="grade",
                transform="log_odds")
    return Distiller(student=functional(cfg), teachers={}, terms=(term,), optimizer=optimizer,
                     schedule=schedule)


def make_state(mesh):
    rules = dict(parallel.DEFAULT_RULES)
    distiller = tiny_distiller()
    state = init_sharded_state(distiller, 0, mesh, rules)
    # Distinct values in the optimizer moments, so a swapped leaf would show.
    bump = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    state["opt_state"] = jax.jit(bump)(state["opt_state"])
    return distiller, state


def assert_trees_equal(a, b):
    paths_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(paths_a) == len(leaves_b)
    for (path, x), y in zip(paths_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def state8():
    # fsdp over 8 devices: the weights really are split 8 ways.
    return make_state(parallel.make_mesh((1, 8, 1)))[1]


def test_round_trip_onto_a_smaller_mesh(tmp_path, state8):
    state = state8
    checkpointer = Checkpointer(tmp_path, config_yaml="name: x\n", manifest=MANIFEST)
    assert checkpointer.save(3, state, {"next_index": 24}, force=True)
    checkpointer.close()

    mesh4 = parallel.make_mesh((1, 4, 1), jax.devices()[:4])
    _, target = make_state(mesh4)
    shardings = jax.tree.map(lambda x: x.sharding, target)
    reader = Checkpointer(tmp_path)
    restored, iterator, manifest = reader.restore(target_state_shardings=shardings)
    assert reader.latest_step() == 3 and iterator == {"next_index": 24} and manifest == MANIFEST
    assert reader.read_meta()["config_yaml"] == "name: x\n"
    assert_trees_equal(state, restored)
    embed = restored["params"]["backbone"]["embed"]["embedding"]
    assert embed.sharding.mesh.devices.size == 4
    assert embed.sharding.spec == shardings["params"]["backbone"]["embed"]["embedding"].spec
    params = reader.restore_params()
    assert_trees_equal(state["params"], params)
    reader.close()


def test_half_written_step_is_ignored_and_cleaned(tmp_path, state8):
    state = state8
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(2, state, {"i": 2}, force=True)
    checkpointer.close()
    # What a crash in the middle of saving step 4 leaves: orbax's tmp directory, not finalised.
    half = tmp_path / "4.orbax-checkpoint-tmp-1712345678"
    (half / "state").mkdir(parents=True)
    (half / "state" / "garbage").write_bytes(b"\0" * 10)
    reopened = Checkpointer(tmp_path)
    assert reopened.latest_step() == 2 and reopened.all_steps() == [2]
    shardings = jax.tree.map(lambda x: x.sharding, state)
    restored, iterator, _ = reopened.restore(target_state_shardings=shardings)
    assert iterator == {"i": 2}
    assert_trees_equal(state, restored)
    reopened.wait()
    reopened.save(4, restored, {"i": 4}, force=True)  # the step is free to be written again
    reopened.close()
    assert not half.exists()
    assert Checkpointer(tmp_path, read_only=True).all_steps() == [2, 4]


def test_restore_errors_name_the_directory(tmp_path):
    checkpointer = Checkpointer(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpointer.restore(target_state_shardings={})
    checkpointer.close()


def test_keep_best_keeps_latest_and_best(tmp_path):
    mesh = parallel.make_mesh((-1, 1, 1))
    sharding = NamedSharding(mesh, PartitionSpec())
    checkpointer = Checkpointer(tmp_path, max_to_keep=1, keep_best_metric="loss/total",
                                keep_best_mode="min", async_save=False)
    losses = {2: 0.9, 4: 0.3, 6: 0.5, 8: 0.7}
    for step, loss in losses.items():
        state = {"params": {"w": jax.device_put(jnp.full((4,), step, jnp.float32), sharding)}}
        checkpointer.save(step, state, {}, metrics={"eval/loss/total": loss}, force=True)
    checkpointer.save(9, state, {}, force=True)  # a save without eval metrics (e.g. SIGTERM)
    assert checkpointer.all_steps() == [4, 9]
    assert checkpointer.best_step() == 4
    checkpointer.close()


def test_keep_best_requires_its_metric(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_best_metric="eval/ndcg_at_10", keep_best_mode="max")
    with pytest.raises(KeyError, match="ndcg_at_10"):
        checkpointer.save(1, {"w": jnp.zeros(2)}, {}, metrics={"eval/loss/total": 1.0})
    checkpointer.close()


def test_sigterm_sets_the_stop_flag(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    previous = signal.getsignal(signal.SIGTERM)
    checkpointer.install_sigterm_handler()
    assert not checkpointer.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpointer.should_stop(2)
    checkpointer.close()
    assert signal.getsignal(signal.SIGTERM) == previous
