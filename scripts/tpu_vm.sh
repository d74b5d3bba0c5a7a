#!/usr/bin/env bash
# Cloud TPU VM slice launcher: create/start/stop/delete a slice, copy and install this repository
# on every worker, run one command on every worker at once (gcloud ... --worker=all).
#
# Every worker of a multi-host slice runs the same program; jax.distributed.initialize() (our
# parallel.initialize_distributed() with no arguments) finds the coordinator and each
# process's id from the TPU metadata, so the command needs no per-worker flags.
#
#   scripts/tpu_vm.sh --name my-slice --zone us-central2-b --type v4-32 create
#   scripts/tpu_vm.sh --name my-slice --zone us-central2-b setup
#   scripts/tpu_vm.sh --name my-slice --zone us-central2-b run \
#       'python -m jaxdistill.cli distill configs/job_search/student.yaml'
#   scripts/tpu_vm.sh --name my-slice --zone us-central2-b delete
#   scripts/tpu_vm.sh --dry-run ... COMMAND      # print the gcloud commands, run nothing
#
# Defaults come from the environment: TPU_NAME, ZONE, ACCELERATOR_TYPE (v5litepod-16),
# TPU_VERSION (v2-alpha-tpuv5-lite: the runtime image for v5e), PROJECT (gcloud's default).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/tpu_vm.sh [--dry-run] [--name NAME] [--zone ZONE] [--type ACCELERATOR_TYPE]
                         [--version RUNTIME_VERSION] [--project PROJECT] [--spot]
                         create | start | stop | delete | setup | run COMMAND...
  create   create the TPU VM slice (--spot for a Spot slice)
  start    start a stopped slice;  stop: stop it;  delete: delete it (no prompt)
  setup    copy this repository (git archive of HEAD) to every worker and pip-install it
           with jax[tpu] into ~/venv
  run      run COMMAND in ~/jaxdistill on every worker at once, with ~/venv's python first
           on PATH
  --dry-run  print the commands instead of running them
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

DRY_RUN=0
NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
VERSION="${TPU_VERSION:-v2-alpha-tpuv5-lite}"
PROJECT="${PROJECT:-}"
SPOT=0
REMOTE_DIR='~/jaxdistill'  # expanded by the workers' shell, not here
ARCHIVE=jaxdistill.tar.gz

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done

(($#)) || { usage >&2; die "missing command: one of create, start, stop, delete, setup, run"; }
COMMAND="$1"
shift
[[ -n "$NAME" ]] || die "no TPU name: pass --name NAME or set TPU_NAME"
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or set ZONE"

# Runs one command, or with --dry-run prints it, single-quoted where needed so it can be pasted.
run() {
  if ((DRY_RUN)); then
    local words=() word
    for word in "$@"; do
      if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
        words+=("$word")
      else
        words+=("'${word//\'/\'\\\'\'}'")
      fi
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")

case "$COMMAND" in
  create)
    extra=()
    ((SPOT)) && extra+=(--spot)
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" "${extra[@]}"
    ;;
  start|stop)
    run "${TPU[@]}" "$COMMAND" "$NAME" "${WHERE[@]}"
    ;;
  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
  setup)
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local_archive="${TMPDIR:-/tmp}/$ARCHIVE"
    # Committed files only: no virtual environment, runs or caches travel.
    run git -C "$repo" archive --format=tar.gz -o "$local_archive" HEAD
    run "${TPU[@]}" scp "$local_archive" "$NAME:$ARCHIVE" "${WHERE[@]}" --worker=all
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="set -e; \
rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/$ARCHIVE -C $REMOTE_DIR; \
python3 -m venv ~/venv; ~/venv/bin/pip install -q -U pip; \
~/venv/bin/pip install -q -U 'jax[tpu]' -e $REMOTE_DIR"
    ;;
  run)
    (($#)) || die "run needs a COMMAND, e.g. run 'python -c \"import jax; print(jax.devices())\"'"
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
      --command="cd $REMOTE_DIR && PATH=~/venv/bin:\$PATH $*"
    ;;
  *)
    die "unknown command '$COMMAND': one of create, start, stop, delete, setup, run"
    ;;
esac
