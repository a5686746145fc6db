#!/usr/bin/env bash
# Trains on this machine: one process driving every local GPU / TPU chip (or the CPU), or N local processes
# that exercise the multi-host code paths (coordinator, per-process data and checkpoint shards) on one box.
#
# Usage: launch/local.sh [options] -- TRAIN_ARGS...
#   TRAIN_ARGS          what `python -m dig_jax.train` takes: --config configs/x.py --workdir DIR [--config.k=v ...]
#   --processes N       start N processes connected through a coordinator on localhost (default 1)
#   --cpu-devices K     run on the CPU with K devices per process (XLA's host-platform device count)
#   --port P            coordinator port for --processes > 1 (default 12355)
#   --python PY         interpreter (default: the repository's .venv/bin/python when present, else python3)
#   --dry-run           print the commands instead of running them
#
# Examples:
#   launch/local.sh -- --config configs/imagenet256.py:DiG-S/2 --workdir workdirs/s2      # all local GPUs, one process
#   launch/local.sh --processes 2 --cpu-devices 4 -- --config configs/quickstart.py --workdir workdirs/mh
# With N processes, process 0 prints to the terminal and process i writes WORKDIR/process_<i>.log.
set -euo pipefail

processes=1
cpu_devices=""
port=12355
python=""
dry_run=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
train_args=("$@")
if [[ ${#train_args[@]} -eq 0 ]]; then
  echo "error: give the trainer's arguments after --, e.g. -- --config configs/quickstart.py --workdir DIR" >&2
  exit 2
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --processes must be a positive integer, got $processes" >&2
  exit 2
fi

workdir=""
for ((i = 0; i < ${#train_args[@]}; i++)); do
  case "${train_args[i]}" in
    --workdir=*) workdir="${train_args[i]#--workdir=}" ;;
    --workdir) workdir="${train_args[i + 1]:-}" ;;
  esac
done
if [[ -z "$workdir" ]]; then
  echo "error: the train arguments need --workdir DIR" >&2
  exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "$python" ]]; then  # the README's setup installs everything into .venv
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
prefix=(env "PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}")  # dig_jax importable from any directory
if [[ -n "$cpu_devices" ]]; then
  prefix+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
fi

# The command of process $1 as an array in $command.
process_command() {
  command=("${prefix[@]}" "$python" -m dig_jax.train "${train_args[@]}")
  if [[ "$processes" -gt 1 ]]; then
    command+=("--config.distributed.coordinator_address=localhost:$port"
              "--config.distributed.num_processes=$processes" "--config.distributed.process_id=$1")
  fi
}

if [[ "$dry_run" -eq 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    process_command "$i"
    printf '%q ' "${command[@]}"
    if [[ "$i" -gt 0 ]]; then printf '> %q 2>&1 &' "$workdir/process_$i.log"; fi
    echo
  done
  exit 0
fi

if [[ "$processes" -eq 1 ]]; then
  process_command 0
  exec "${command[@]}"
fi

mkdir -p "$workdir"
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((i = 1; i < processes; i++)); do
  process_command "$i"
  "${command[@]}" > "$workdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
process_command 0
status=0
"${command[@]}" || { status=$?; stop_all; }  # the others would wait for process 0 until JAX's heartbeat timeout
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
