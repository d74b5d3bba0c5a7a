"""The multi-host path on two local processes (jax.distributed over gloo CPU collectives): each
process feeds its half of every global batch, one checkpoint is written, process 0 logs."""
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

# One process of the run: 2 CPU devices each, so the [-1, 1, 1] mesh spans 4 devices over 2
# processes. Prints the record ids (member_features[0]) of its rows of the first global batch.
CHILD = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    config_path, run_dir, address, process_id = sys.argv[1:5]
    from jaxdistill import config as config_lib, parallel, train

    parallel.initialize_distributed(address, num_processes=2, process_id=int(process_id))
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


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
    tokenizer = load_tokenizer("builtin:wordpiece")
    rng = random.Random(0)
    data_dir = sources.write_dataset({"train": listwise_records(48, 0, rng),
                                      "validation": listwise_records(16, 1000, rng)},
                                     "listwise", tmp_path / "data")
    cfg = experiment(data_dir, tokenizer, "multihost", mesh={"shape": [-1, 1, 1]},
                     trainer={"steps": STEPS, "log_every": 2, "eval_every": STEPS,
                              "eval_batches": 1, "progress": False},
                     checkpoint={"every": STEPS})
    assert cfg.data.batch_size == 8
    config_path = tmp_path / "multihost.yaml"
    config_path.write_text(config_lib.resolved_yaml(cfg))
    (tmp_path / "child.py").write_text(CHILD)
    run_dir = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    children = [subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(config_path), str(run_dir), address,
         str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(PROCESSES)]
    outputs = []
    try:
        for i, child in enumerate(children):
            stdout, stderr = child.communicate(timeout=150)
            assert child.returncode == 0, f"process {i} failed:\n{stderr[-3000:]}"
            outputs.append(stdout)
    finally:
        for child in children:  # one failed process leaves the other blocked in a collective
            if child.poll() is None:
                child.kill()
                child.wait()

    for i, stdout in enumerate(outputs):
        assert f"RESULT {i} {PROCESSES} 4 {STEPS} False" in stdout, stdout
    first = [set(json.loads(line.split(" ", 1)[1])) for stdout in outputs
             for line in stdout.splitlines() if line.startswith("FIRST_BATCH")]
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
