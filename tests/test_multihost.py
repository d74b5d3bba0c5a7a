"""The multi-host path on two local processes (jax.distributed over gloo CPU collectives): each
process feeds its half of every global batch, one checkpoint is written, process 0 logs; and two
processes train exactly as one process does on the same global batches."""
import json
import os
import random
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill.checkpoint import CHECKPOINT_SUBDIR, Checkpointer, load_params
from jaxdistill.data import sources
from jaxdistill.data.tokenizer import load_tokenizer
from jaxdistill.metrics import read_metrics
from test_train import experiment, listwise_records

PROCESSES = 2
STEPS = 4

# One process of the run, with DEVICES CPU devices: two processes of 2 devices each span the
# [-1, 1, 1] mesh over 4 devices, as one process of 4 devices does. Prints the record ids
# (member_features[0]) of its rows of the first global batch.
CHILD = textwrap.dedent("""
    import json, os, sys
    config_path, run_dir, address, process_id, processes, devices = sys.argv[1:7]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxdistill import config as config_lib, parallel, train

    parallel.initialize_distributed(address, num_processes=int(processes),
                                    process_id=int(process_id))
    to_device, seen = train._to_device, []

    def logged(batch, mesh, rules):
        if not seen:  # the first call is the first training batch
            seen.append(1)
            ids = [int(x) for x in batch["member_features"][:, 0]]
            print("FIRST_BATCH", json.dumps(ids), flush=True)
        return to_device(batch, mesh, rules)

    train._to_device = logged
    result = train.run(config_lib.load_config(config_path), run_dir)
    print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), result.step,
          result.preempted, flush=True)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dataset(tmp_path):
    rng = random.Random(0)
    return sources.write_dataset({"train": listwise_records(48, 0, rng),
                                  "validation": listwise_records(16, 1000, rng)},
                                 "listwise", tmp_path / "data")


def _launch(tmp_path, cfg, run_dir, processes: int, devices: int) -> list[str]:
    """Runs `cfg` in `processes` local processes of `devices` CPU devices each; their stdouts."""
    config_path = tmp_path / f"{run_dir.name}.yaml"
    config_path.write_text(config_lib.resolved_yaml(cfg))
    (tmp_path / "child.py").write_text(CHILD)
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    children = [subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(config_path), str(run_dir), address,
         str(i), str(processes), str(devices)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(processes)]
    outputs = []
    try:
        for i, child in enumerate(children):
            stdout, stderr = child.communicate(timeout=240)
            assert child.returncode == 0, f"process {i} failed:\n{stderr[-3000:]}"
            outputs.append(stdout)
    finally:
        for child in children:  # one failed process leaves the other blocked in a collective
            if child.poll() is None:
                child.kill()
                child.wait()
    return outputs


def _first_batch_ids(outputs) -> list[set[int]]:
    return [set(json.loads(line.split(" ", 1)[1])) for stdout in outputs
            for line in stdout.splitlines() if line.startswith("FIRST_BATCH")]


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
    tokenizer = load_tokenizer("builtin:wordpiece")
    data_dir = _dataset(tmp_path)
    cfg = experiment(data_dir, tokenizer, "multihost", mesh={"shape": [-1, 1, 1]},
                     trainer={"steps": STEPS, "log_every": 2, "eval_every": STEPS,
                              "eval_batches": 1, "progress": False},
                     checkpoint={"every": STEPS})
    assert cfg.data.batch_size == 8
    run_dir = tmp_path / "run"
    outputs = _launch(tmp_path, cfg, run_dir, PROCESSES, 2)

    for i, stdout in enumerate(outputs):
        assert f"RESULT {i} {PROCESSES} 4 {STEPS} False" in stdout, stdout
    first = _first_batch_ids(outputs)
    assert [len(ids) for ids in first] == [4, 4], outputs
    assert not first[0] & first[1]
    assert len(first[0] | first[1]) == 8 and first[0] | first[1] <= set(range(48))

    assert Checkpointer(run_dir / CHECKPOINT_SUBDIR, read_only=True).all_steps() == [STEPS]
    _, params = load_params(run_dir)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))

    lines = read_metrics(run_dir)
    assert [line["step"] for line in lines if "loss/total" in line] == [2, 4]
    assert [line["step"] for line in lines if "eval/loss/total" in line] == [STEPS]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["processes"] == PROCESSES


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Same seed, data and global batches: the loss trajectory of 2 processes x 2 devices is the
    one of 1 process x 4 devices (same mesh, same program) up to summation order."""
    tokenizer = load_tokenizer("builtin:wordpiece")
    data_dir = _dataset(tmp_path)
    # Unshuffled, process p reads records p, p + 2, ...: every global batch holds the records
    # the single process's batch holds, rows permuted (the losses are means over rows).
    cfg = experiment(data_dir, tokenizer, "equal", mesh={"shape": [-1, 1, 1]},
                     data={"shuffle": False},
                     trainer={"steps": STEPS, "log_every": 1, "eval_every": STEPS,
                              "eval_batches": 1, "progress": False},
                     checkpoint={"every": STEPS, "async_save": False})
    two = _launch(tmp_path, cfg, tmp_path / "two", PROCESSES, 2)
    one = _launch(tmp_path, cfg, tmp_path / "one", 1, 4)
    assert f"RESULT 0 1 4 {STEPS} False" in one[0], one
    for i, stdout in enumerate(two):
        assert f"RESULT {i} {PROCESSES} 4 {STEPS} False" in stdout, stdout
    assert _first_batch_ids(two)[0] | _first_batch_ids(two)[1] == _first_batch_ids(one)[0]

    def trajectory(run_dir):
        return {line["step"]: line for line in read_metrics(run_dir) if "loss/total" in line}

    two_losses, one_losses = trajectory(tmp_path / "two"), trajectory(tmp_path / "one")
    assert sorted(one_losses) == list(range(1, STEPS + 1)) == sorted(two_losses)
    totals = [one_losses[step]["loss/total"] for step in range(1, STEPS + 1)]
    assert len(set(totals)) == STEPS  # the model learns: a trajectory, not one repeated value
    for step in range(1, STEPS + 1):
        for key in ("loss/total", "grad_norm"):
            assert two_losses[step][key] == pytest.approx(one_losses[step][key], abs=1e-6), (
                step, key)
