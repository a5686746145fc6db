#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: requests the slice (a queued resource), copies this checkout to every worker,
# installs the requirements with jax[tpu], runs the trainer on all workers at once, and after a preemption
# re-creates the slice and runs again: the trainer resumes from the newest checkpoint in the workdir.
#
# Usage: launch/tpu_pod.sh COMMAND [options] [-- TRAIN_ARGS...]
# Commands:
#   create    request the slice and wait until it is ACTIVE
#   setup     copy the code to every worker; install Python 3.12, requirements, jax[tpu] and gcsfuse
#   train     run `python -m dig_jax.train TRAIN_ARGS` on every worker (--worker=all)
#   run       create if needed, setup, train; after a preemption delete, re-create, setup and train again
#   delete    release the slice (teardown)
# Options:
#   --zone ZONE            (required)
#   --name NAME            queued resource and TPU name (default dig-jax)
#   --project PROJECT      (default: gcloud's configured project)
#   --accelerator TYPE     e.g. v4-32, v5p-64, v6e-32 (default v4-32)
#   --runtime VERSION      TPU software version (default tpu-ubuntu2204-base; v5p: v2-alpha-tpuv5,
#                          v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
#   --spot                 spot capacity: cheaper, can be preempted at any time
#   --workdir gs://B/DIR   run folder (checkpoints, logs, samples); required by train and run
#   --data-dir gs://B/DIR  TFDS data dir (ImageNet as array_record); exported as TFDS_DATA_DIR and passed as
#                          --config.data.kwargs.data_dir
#   --max-restarts N       run: give up after N preemptions (default 20)
#   --dry-run              print the commands instead of running them
# The trainer reads and writes local paths, so each gs:// bucket is mounted with gcsfuse at ~/gcs/BUCKET on every
# worker, and the trainer gets those paths. Every worker writes its checkpoint shards there.
#
# Example:
#   launch/tpu_pod.sh run --zone us-central2-b --accelerator v4-32 --spot \
#       --workdir gs://my-bucket/runs/dig_xl2 --data-dir gs://my-bucket/tfds -- --config configs/imagenet256.py:DiG-XL/2
#   launch/tpu_pod.sh delete --zone us-central2-b
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

[[ $# -ge 1 ]] || usage 2
command_name="$1"
shift
case "$command_name" in
  create|setup|train|run|delete) ;;
  -h|--help) usage 0 ;;
  *) echo "error: unknown command $command_name (create, setup, train, run or delete)" >&2; usage 2 ;;
esac

name=dig-jax
zone=""
project=""
accelerator=v4-32
runtime=tpu-ubuntu2204-base
spot=0
workdir=""
data_dir=""
max_restarts=20
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --zone) zone="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --workdir) workdir="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
train_args=("$@")
[[ -n "$zone" ]] || { echo "error: --zone is required" >&2; exit 2; }
if [[ "$command_name" == train || "$command_name" == run ]]; then
  [[ -n "$workdir" ]] || { echo "error: $command_name needs --workdir gs://BUCKET/DIR" >&2; exit 2; }
fi
for path in "$workdir" "$data_dir"; do
  if [[ -n "$path" && ! "$path" =~ ^gs://[^/]+/.+ ]]; then
    echo "error: --workdir and --data-dir must be gs://BUCKET/PATH, got $path" >&2
    exit 2
  fi
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
location=(--zone="$zone")
[[ -z "$project" ]] || location+=(--project="$project")

# Runs a command, or prints it (shell-quoted, ready to paste) with --dry-run.
run() {
  if [[ "$dry_run" -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

on_workers() {  # on_workers SCRIPT: runs SCRIPT with bash on every worker of the slice
  run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all --command="$1"
}

# gs://BUCKET/PATH -> the path where the workers see it (~/gcs/BUCKET/PATH, $HOME expanded on the worker).
mounted_path() { echo "\$HOME/gcs/${1#gs://}"; }

bucket_of() { local path="${1#gs://}"; echo "${path%%/*}"; }

describe_state=(gcloud compute tpus queued-resources describe "$name" "${location[@]}" --format="value(state.state)")

slice_state() {  # the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...), empty if none
  "${describe_state[@]}" 2>/dev/null || true
}

create() {
  local flags=(--node-id="$name" --accelerator-type="$accelerator" --runtime-version="$runtime")
  [[ "$spot" -eq 0 ]] || flags+=(--spot)
  run gcloud compute tpus queued-resources create "$name" "${location[@]}" "${flags[@]}"
  wait_until_active
}

wait_until_active() {
  if [[ "$dry_run" -eq 1 ]]; then
    run "${describe_state[@]}"
    echo "# ... every 60 s until the state is ACTIVE"
    return
  fi
  local state
  while true; do
    state="$(slice_state)"
    [[ "$state" != ACTIVE ]] || return 0
    case "$state" in
      FAILED|SUSPENDED) echo "error: slice $name is $state" >&2; return 1 ;;
    esac
    echo "slice $name: ${state:-not found yet}; waiting" >&2
    sleep 60
  done
}

delete() {
  run gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
}

setup() {
  local package
  package="$(mktemp -u -t dig-jax-code.XXXXXX)"  # a fresh name; tar creates the file
  run tar -czf "$package" -C "$repo" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ .
  run gcloud compute tpus tpu-vm scp "$package" "$name:dig-jax.tar.gz" "${location[@]}" --worker=all
  [[ "$dry_run" -eq 1 ]] || rm -f "$package"
  # uv brings its own Python 3.12 (JAX needs >= 3.11; the TPU images ship older ones).
  on_workers 'set -e
rm -rf ~/dig-jax && mkdir -p ~/dig-jax && tar -xzf ~/dig-jax.tar.gz -C ~/dig-jax
command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
~/.local/bin/uv venv --allow-existing --python 3.12 ~/venv
~/.local/bin/uv pip install --python ~/venv/bin/python -U "jax[tpu]"
~/.local/bin/uv pip install --python ~/venv/bin/python -r ~/dig-jax/requirements.txt
if ! command -v gcsfuse >/dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt" \
    "gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
    | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi'
}

train_script() {  # the script every worker runs: mount the buckets, then the trainer
  local buckets=("$(bucket_of "$workdir")") args=(--workdir="$(mounted_path "$workdir")") env_prefix=""
  if [[ -n "$data_dir" ]]; then
    buckets+=("$(bucket_of "$data_dir")")
    env_prefix="TFDS_DATA_DIR=$(mounted_path "$data_dir") "
    args+=(--config.data.kwargs.data_dir="$(mounted_path "$data_dir")")
  fi
  local script="set -e"
  for bucket in $(printf '%s\n' "${buckets[@]}" | sort -u); do
    script+="
mkdir -p ~/gcs/$bucket
mountpoint -q ~/gcs/$bucket || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket ~/gcs/$bucket"
  done
  # The gs:// paths stay unquoted so that the worker's shell expands $HOME in them.
  script+="
cd ~/dig-jax && ${env_prefix}~/venv/bin/python -m dig_jax.train ${args[*]} $(printf '%q ' "${train_args[@]}")"
  echo "$script"
}

train() { on_workers "$(train_script)"; }

run_until_done() {
  local script restarts=0
  script="$(train_script)"
  if [[ "$dry_run" -eq 1 ]]; then
    create
    setup
    on_workers "$script"
    echo "# if training fails and the slice is no longer ACTIVE (preempted): delete, create, setup and train again,"
    echo "# at most --max-restarts=$max_restarts times; a failure on an ACTIVE slice stops with an error"
    return
  fi
  case "$(slice_state)" in
    ACTIVE) ;;
    "") create ;;
    FAILED|SUSPENDING|SUSPENDED) delete; create ;;
    *) wait_until_active ;;  # still queued or provisioning from an earlier create
  esac
  setup
  while ! on_workers "$script"; do
    if [[ "$(slice_state)" == ACTIVE ]]; then
      echo "error: training failed on an ACTIVE slice (not a preemption); see the output above" >&2
      return 1
    fi
    restarts=$((restarts + 1))
    if [[ "$restarts" -gt "$max_restarts" ]]; then
      echo "error: preempted $restarts times, more than --max-restarts=$max_restarts" >&2
      return 1
    fi
    echo "slice $name was preempted ($restarts/$max_restarts): re-creating it; training resumes from $workdir" >&2
    delete
    create
    setup
  done
  echo "training finished: $workdir" >&2
}

case "$command_name" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  run) run_until_done ;;
  delete) delete ;;
esac
