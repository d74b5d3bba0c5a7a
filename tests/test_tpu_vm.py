"""scripts/tpu_vm.sh: bash-valid, its gcloud commands (--dry-run) are the documented ones, and a
printed command, pasted into a shell, runs exactly what the script itself runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tpu_vm.sh"
WHERE = ["--name", "slice", "--zone", "us-central2-b"]


def tpu_vm(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize("args, expected", [
    (["--type", "v4-32", "--version", "tpu-ubuntu2204-base", "--spot", "create"],
     ["gcloud compute tpus tpu-vm create slice --zone=us-central2-b --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot"]),
    (["create"], ["gcloud compute tpus tpu-vm create slice --zone=us-central2-b "
                  "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"]),
    (["start"], ["gcloud compute tpus tpu-vm start slice --zone=us-central2-b"]),
    (["--project", "p1", "stop"],
     ["gcloud compute tpus tpu-vm stop slice --zone=us-central2-b --project=p1"]),
    (["delete"], ["gcloud compute tpus tpu-vm delete slice --zone=us-central2-b --quiet"]),
    (["run", "python -m jaxdistill.cli plan x.yaml"],
     ["gcloud compute tpus tpu-vm ssh slice --zone=us-central2-b --worker=all "
      "'--command=cd ~/jaxdistill && PATH=~/venv/bin:$PATH python -m jaxdistill.cli plan x.yaml'"]),
])
def test_dry_run_prints_the_gcloud_commands(args, expected):
    result = tpu_vm("--dry-run", *WHERE, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


def test_setup_copies_to_every_worker_and_installs():
    lines = tpu_vm("--dry-run", *WHERE, "setup", env={**os.environ, "TMPDIR": "/tmp/x"}
                   ).stdout.splitlines()
    assert lines[0] == f"git -C {REPO} archive --format=tar.gz -o /tmp/x/jaxdistill.tar.gz HEAD"
    assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/x/jaxdistill.tar.gz "
                        "slice:jaxdistill.tar.gz --zone=us-central2-b --worker=all")
    assert lines[2].startswith("gcloud compute tpus tpu-vm ssh slice --zone=us-central2-b "
                               "--worker=all '--command=set -e; rm -rf ~/jaxdistill")
    assert "pip install -q -U '\\''jax[tpu]'\\'' -e ~/jaxdistill'" in lines[2]


def test_printed_command_runs_what_the_script_runs(tmp_path):
    # A fake gcloud that records its argv: the script's own call and the pasted dry-run line
    # must hand gcloud the very same arguments (quotes and $ included).
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    command = "python -c \"print('it''s $HOME')\" && echo done"
    direct = tpu_vm(*WHERE, "run", command, env=env)
    printed = tpu_vm("--dry-run", *WHERE, "run", command, env=env).stdout
    pasted = subprocess.run(["bash", "-c", printed], capture_output=True, text=True, env=env)
    assert direct.returncode == 0 and pasted.returncode == 0
    argv = json.loads(direct.stdout)
    assert json.loads(pasted.stdout) == argv
    assert argv[-1] == f"--command=cd ~/jaxdistill && PATH=~/venv/bin:$PATH {command}"


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "create"], "no TPU name: pass --name NAME or set TPU_NAME"),
    (["--name", "s", "create"], "no zone: pass --zone ZONE or set ZONE"),
    (WHERE + ["frob"], "unknown command 'frob': one of create, start, stop, delete, setup, run"),
    (WHERE + ["run"], "run needs a COMMAND"),
    (WHERE + ["--bogus", "create"], "unknown option --bogus"),
    (WHERE, "missing command"),
])
def test_errors(args, message):
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
    result = tpu_vm("--dry-run", *args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
