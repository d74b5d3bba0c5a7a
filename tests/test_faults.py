"""Fault classes of a training run, one test each: a second writer, a changed config on resume,
unreadable checkpoints and teacher runs, a run that learns nothing, storage and config-file
errors, preemption. Each asserts the exit code, that the message names the file/key/step, and,
where a checkpoint exists, that the last committed one is intact and restores bitwise."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxdistill import cli, runlock
from jaxdistill import config as config_lib
from jaxdistill.checkpoint import CHECKPOINT_SUBDIR, SET_ASIDE_SUBDIR, Checkpointer, load_params
from jaxdistill.metrics import read_metrics
from test_train import data_dir, experiment, tokenizer  # noqa: F401 (fixtures)

STEPS = 4  # the base run: 4 steps, a checkpoint every 2, a metrics line every step


def write_config(path, cfg):
    path.write_text(config_lib.resolved_yaml(cfg))
    return str(path)


@pytest.fixture(scope="module")
def base(data_dir, tokenizer, tmp_path_factory):  # noqa: F811
    """(config path, finished run directory) of a tiny run every test copies."""
    root = tmp_path_factory.mktemp("faults")
    cfg = experiment(data_dir, tokenizer, "faults", data={"eval_split": None},
                     trainer={"steps": STEPS, "log_every": 1, "progress": False},
                     checkpoint={"every": 2}, logging={"tensorboard": False})
    config = write_config(root / "faults.yaml", cfg)
    assert cli.main(["train", config, "--run-dir", str(root / "run")]) == 0
    return config, root / "run"


def copy_run(base, tmp_path):  # noqa: F811
    return shutil.copytree(base[1], tmp_path / "run")


def params_at(run_dir, step):
    checkpointer = Checkpointer(run_dir / CHECKPOINT_SUBDIR, read_only=True)
    try:
        return jax.tree.leaves(checkpointer.restore_params(step))
    finally:
        checkpointer.close()


def assert_same_params(a, b):
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def train(config, run_dir, *extra):
    return cli.main(["train", config, "--run-dir", str(run_dir), *extra])


# ---------------------------------------------------------------- 1. one writer per run dir


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(base, tmp_path, capsys,
                                                                          caplog):
    run_dir = copy_run(base, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / runlock.LOCK_FILE).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
        assert train(base[0], run_dir) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and str(run_dir / runlock.LOCK_FILE) in err
        assert (run_dir / "metrics.jsonl").read_text() == before  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now (same host, pid gone): its lock is taken over, then released.
    assert train(base[0], run_dir) == 0
    assert "taking over the lock of a dead process" in caplog.text
    assert not (run_dir / runlock.LOCK_FILE).exists()
    # O_EXCL: while one lock is held a second acquire fails, naming this process.
    with runlock.RunLock(tmp_path / "other"):
        with pytest.raises(runlock.RunLockedError, match=f"pid {os.getpid()}"):
            runlock.RunLock(tmp_path / "other").acquire()


def test_a_reused_pid_or_a_silent_host_loses_its_lock_and_a_beating_holder_keeps_it(
        tmp_path, monkeypatch, caplog):
    lock_path = tmp_path / runlock.LOCK_FILE

    def held_by(**holder):
        lock_path.write_text(json.dumps({"started": "2026-01-01T00:00:00", **holder}))

    # This process is alive, but the lock names another start time: its pid was reused.
    held_by(pid=os.getpid(), pid_start=runlock._process_start(os.getpid()) + 1,
            host=socket.gethostname())
    with runlock.RunLock(tmp_path):
        assert json.loads(lock_path.read_text())["pid_start"] == runlock._process_start(
            os.getpid())
    assert "pid reused by another process" in caplog.text

    # Another host's lock: held while its heartbeat is recent, taken over once it is stale.
    held_by(pid=1, host="elsewhere")
    with pytest.raises(runlock.RunLockedError, match="after 600 s without its heartbeat"):
        runlock.RunLock(tmp_path).acquire()
    os.utime(lock_path, (time.time() - 601, time.time() - 601))
    with runlock.RunLock(tmp_path):
        pass
    assert "no heartbeat for 601 s" in caplog.text

    # The holder's heartbeat keeps the lock fresh while it is held.
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with runlock.RunLock(tmp_path):
        os.utime(lock_path, (time.time() - 601, time.time() - 601))
        time.sleep(0.3)
        assert time.time() - lock_path.stat().st_mtime < 5
    assert not lock_path.exists()


# ------------------------------------------------------------- 2. resume checks the config


def test_resume_with_a_changed_config_is_refused_listing_each_key(base, tmp_path, capsys):
    run_dir = copy_run(base, tmp_path)
    run_json = (run_dir / "run.json").read_text()
    assert train(base[0], run_dir, "--set", "optimizer.learning_rate=0.5",
                 "--set", "data.max_len=12") == 2
    err = capsys.readouterr().err
    assert f"{run_dir / CHECKPOINT_SUBDIR}/{STEPS}" in err
    assert "optimizer.learning_rate: checkpoint 0.01, now 0.5" in err
    assert "data.max_len: checkpoint 16, now 12" in err
    assert (run_dir / "run.json").read_text() == run_json  # rewritten only after a restore
    # Run length and cadence may change; --force-config resumes past any other difference.
    assert train(base[0], run_dir, "--set", "trainer.log_every=3",
                 "--set", "checkpoint.max_to_keep=5", "--set", "logging.tensorboard=true") == 0
    assert train(base[0], run_dir, "--set", "optimizer.learning_rate=0.5",
                 "--force-config") == 0
    assert json.loads((run_dir / "run.json").read_text())["resumed_from_step"] == STEPS
    assert_same_params(params_at(run_dir, STEPS), params_at(base[1], STEPS))


# ------------------------------------------------- 3. unreadable checkpoints, the run falls back


@pytest.mark.slow  # ~15-20 s on 2 cores: trains two steps again from step 2 (one compile)
def test_a_truncated_latest_step_is_named_and_the_run_resumes_from_the_one_before(
        base, tmp_path, capsys, caplog):
    run_dir = copy_run(base, tmp_path)
    latest = run_dir / CHECKPOINT_SUBDIR / str(STEPS)
    arrays = sorted((latest / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    arrays[0].write_bytes(arrays[0].read_bytes()[:64])  # a truncated array file
    (run_dir / CHECKPOINT_SUBDIR / "9").mkdir()  # junk: no commit marker
    (run_dir / CHECKPOINT_SUBDIR / "9" / "notes.txt").write_text("not a checkpoint")

    assert train(base[0], run_dir) == 0
    assert f"{run_dir / CHECKPOINT_SUBDIR}/9: set aside" in caplog.text  # never restored
    assert f"{latest}: unreadable state data (array " in caplog.text
    assert "a truncated or corrupt file" in caplog.text and "resuming from step 2" in caplog.text
    assert json.loads(capsys.readouterr().out)["step"] == STEPS
    assert (run_dir / SET_ASIDE_SUBDIR / str(STEPS)).is_dir()
    # Steps 3 and 4 were trained again from step 2: the same state, each step logged once.
    assert_same_params(params_at(run_dir, STEPS), params_at(base[1], STEPS))
    steps = [line["step"] for line in read_metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1))


def test_a_deleted_metadata_file_is_named_and_from_step_picks_a_step(base, tmp_path, capsys):
    run_dir = copy_run(base, tmp_path)
    (run_dir / CHECKPOINT_SUBDIR / str(STEPS) / "state" / "_METADATA").unlink()
    assert train(base[0], run_dir, "--from-step", "3") == 2
    assert "--from-step 3: no committed checkpoint at that step; committed steps: [2, 4]" in \
        capsys.readouterr().err
    assert train(base[0], run_dir, "--from-step", str(STEPS)) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / CHECKPOINT_SUBDIR}/{STEPS}: missing state/_METADATA" in err
    assert_same_params(params_at(run_dir, 2), params_at(base[1], 2))  # the one before: intact


@pytest.mark.parametrize("damage", ["random checkpoint bytes", "garbage config.yaml"])
def test_a_broken_teacher_run_is_refused_naming_the_file(base, data_dir, tokenizer,  # noqa: F811
                                                         tmp_path, capsys, damage):
    teacher = copy_run(base, tmp_path)
    if damage == "garbage config.yaml":
        bad = teacher / "config.yaml"
        bad.write_text("model: [unclosed\n  backbone: {")
    else:
        bad = teacher / CHECKPOINT_SUBDIR / str(STEPS) / "state" / "_METADATA"
        for path in (teacher / CHECKPOINT_SUBDIR / str(STEPS) / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(np.random.default_rng(0).bytes(256))
    cfg = experiment(data_dir, tokenizer, "student", teachers={
        "relevance_teacher": {"source": f"run:{teacher}", "dtype": "float32"}})
    config = write_config(tmp_path / "student.yaml", cfg)
    assert cli.main(["distill", config, "--run-dir", str(tmp_path / "student")]) == 2
    err = capsys.readouterr().err
    assert str(bad if damage == "garbage config.yaml" else bad.parent.parent) in err
    assert "Traceback" not in err and not (tmp_path / "student" / CHECKPOINT_SUBDIR).exists()


# -------------------------------------------------------------- 4. a run that learns nothing


@pytest.mark.slow  # ~15-20 s on 2 cores: trains until 3 skipped updates (one compile)
def test_consecutive_skipped_updates_stop_the_run_naming_the_step_and_terms(base, tmp_path,
                                                                             capsys):
    # Adam moves every weight by ~lr: the weights overflow, and a skipped update leaves them as
    # they were, so every later step is skipped too.
    run_dir = tmp_path / "nan"
    assert train(base[0], run_dir, "--set", "optimizer.learning_rate=1e30",
                 "--set", "trainer.steps=20", "--set", "trainer.max_skipped_updates=3") == 2
    err = capsys.readouterr().err
    # Step 1 runs at the warm-up's learning rate 0; step 2 blows the weights up; from step 3 on
    # the loss saturates (finite) while its gradient is NaN.
    assert "the last 3 updates (steps 3-5) were all skipped" in err
    assert "non-finite grad_norm from step 3 on" in err
    assert "the last committed checkpoint is 4" in err
    assert [line["step"] for line in read_metrics(run_dir)] == [1, 2, 3, 4]  # then it stopped
    assert [line["skipped_updates"] for line in read_metrics(run_dir)] == [0, 0, 1, 2]


def test_a_vocab_smaller_than_the_tokenizer_is_refused_at_start_up(
        base, tokenizer, tmp_path, capsys):  # noqa: F811
    assert train(base[0], tmp_path / "small", "--set", "model.backbone.vocab_size=200") == 2
    err = capsys.readouterr().err
    assert f"model.backbone.vocab_size is 200 but data.tokenizer 'builtin:wordpiece' has " \
           f"{len(tokenizer)} tokens" in err
    assert not (tmp_path / "small").exists()


# --------------------------------------------------- 5. every user-facing failure is exit 2


def test_an_unwritable_run_directory_is_named(base, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "locked"
    real_open = os.open

    def refuse(path, *args, **kwargs):  # root ignores file modes: refuse like a read-only dir
        if str(path).startswith(str(run_dir)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runlock.os, "open", refuse)
    assert train(base[0], run_dir) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / runlock.LOCK_FILE}: cannot write (Permission denied)" in err
    assert "no checkpoint was committed" in err and "Traceback" not in err


@pytest.mark.slow  # ~15 s on 2 cores: trains on until the save fails (one compile)
def test_a_full_disk_names_the_path_and_the_last_committed_step(base, tmp_path, capsys,
                                                                 monkeypatch):
    """Simulated: orbax's writer raises what tensorstore raises on a full disk (a real 2 MiB
    tmpfs gives the same message; mounting one needs root, so the suite patches the writer)."""
    from jaxdistill import checkpoint

    run_dir = copy_run(base, tmp_path)
    real_save = checkpoint.Checkpointer.save

    def full(self, step, *args, **kwargs):
        if step > STEPS + 1:
            target = self.directory / f"{step}.orbax-checkpoint-tmp" / "state" / "d" / "0a1b"
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{target}": '
                             f'Failed writing: "{target}": Failed to write 4096 bytes to file '
                             "6: No space left on device [os_error_code='28']")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", full)
    assert train(base[0], run_dir, "--set", "trainer.steps=8", "--set", "checkpoint.every=1") == 2
    err = capsys.readouterr().err
    assert "cannot write (No space left on device)" in err and f"{STEPS + 2}.orbax" in err
    assert f"the last committed checkpoint is step {STEPS + 1}" in err
    assert "Traceback" not in err
    assert_same_params(params_at(run_dir, STEPS), params_at(base[1], STEPS))


@pytest.mark.parametrize("case", ["non-utf8", "base-int", "max-batches"])
def test_config_file_errors_name_the_file(base, tmp_path, capsys, case):
    config = tmp_path / "bad.yaml"
    if case == "non-utf8":
        config.write_bytes(b"name: x\ntrainer:\n  steps: 3 # caf\xe9\n")
        argv, expected = ["train", str(config)], f"{config}: line 3: not UTF-8 text"
    elif case == "base-int":
        config.write_text("base: 5\nname: x\n")
        argv, expected = ["train", str(config)], f"{config}: base: expected the path"
    else:
        argv = ["eval", str(base[1]), "--split", "validation", "--max-batches", "0"]
        expected = "--max-batches must be a positive number of batches, found 0"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


# ------------------------------------------------------------------ 6. preemption is visible

CHILD = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jaxdistill import cli, train

    to_device = train._to_device

    def slow(batch, mesh, rules):
        with open(sys.argv[3], "a") as f:
            f.write("batch\\n")
        time.sleep(0.2)
        return to_device(batch, mesh, rules)

    train._to_device = slow
    sys.exit(cli.main(["train", sys.argv[1], "--run-dir", sys.argv[2], "--set",
                       "trainer.steps=500", "--set", "checkpoint.every=1000", "--force-config"]))
""")


@pytest.mark.slow
def test_sigterm_exits_75_with_preempted_true_and_resume_logs_each_step_once(base, tmp_path):
    run_dir = copy_run(base, tmp_path)
    (tmp_path / "child.py").write_text(CHILD)
    batches = tmp_path / "batches.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    process = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), base[0], str(run_dir),
                                str(batches)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    deadline = 240
    while not (batches.exists() and len(batches.read_text().splitlines()) >= 4):
        assert process.poll() is None, process.communicate()[1][-3000:]
        deadline -= 0.05
        assert deadline > 0
        __import__("time").sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == cli.EXIT_PREEMPTED, stderr[-3000:]
    result = json.loads(stdout)
    assert result["preempted"] is True and result["step"] > STEPS
    assert Checkpointer(run_dir / CHECKPOINT_SUBDIR, read_only=True).latest_step() == \
        result["step"]
    # A resume from an earlier step drops the later lines before logging them again.
    assert train(base[0], run_dir, "--from-step", str(STEPS)) == 0
    steps = [line["step"] for line in read_metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1))
    assert_same_params(params_at(run_dir, STEPS), params_at(base[1], STEPS))
