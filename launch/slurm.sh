#!/usr/bin/env bash
# Submits a training job to SLURM: one task (process) per GPU on each node, all started by one `srun`.
# Inside the job step JAX finds the coordinator, process count and id in SLURM's variables
# (dig_jax.distributed), and each task drives the GPU SLURM_LOCALID. The job is requeued when preempted,
# and rerunning (or requeueing) resumes from the newest checkpoint in the workdir.
#
# Usage: launch/slurm.sh [options] -- TRAIN_ARGS...
#   TRAIN_ARGS            what `python -m dig_jax.train` takes: --config configs/x.py --workdir DIR [--config.k=v]
#                         (DIR on a filesystem every node sees: all tasks write their checkpoint shards there)
#   --nodes N             nodes (default 1)
#   --gpus-per-node G     GPUs, and so tasks, per node (default 8)
#   --cpus-per-task C     CPU cores per task for data loading (default 12)
#   --time T              time limit, e.g. 24:00:00 (default 48:00:00)
#   --partition P         partition (default: the cluster's default)
#   --account A           account to charge (default: none given)
#   --job-name NAME       (default dig-jax)
#   --venv DIR            virtualenv to activate in the job (default: use the submitting shell's python3)
#   --dry-run             print the sbatch command with its script instead of submitting
#
# Example:
#   launch/slurm.sh --nodes 2 --venv .venv -- --config configs/imagenet256.py:DiG-XL/2 --workdir /shared/runs/xl2 \
#       --config.data.kwargs.data_dir=/shared/tfds --config.global_batch_size=256
set -euo pipefail

nodes=1
gpus_per_node=8
cpus_per_task=12
time_limit=48:00:00
partition=""
account=""
job_name=dig-jax
venv=""
dry_run=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus_per_node="$2"; shift 2 ;;
    --cpus-per-task) cpus_per_task="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --venv) venv="$(cd "$2" && pwd)"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "error: give the trainer's arguments after --, e.g. -- --config configs/imagenet256.py:DiG-S/2 --workdir DIR" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
train_command="$(printf '%q ' python3 -m dig_jax.train "$@")"

batch_script() {
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus_per_node
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --cpus-per-task=$cpus_per_task
#SBATCH --time=$time_limit
#SBATCH --requeue
#SBATCH --output=$repo/slurm-%x-%j.out
EOF
  if [[ -n "$partition" ]]; then echo "#SBATCH --partition=$partition"; fi
  if [[ -n "$account" ]]; then echo "#SBATCH --account=$account"; fi
  cat <<EOF
set -euo pipefail
cd $(printf '%q' "$repo")
EOF
  if [[ -n "$venv" ]]; then echo "source $(printf '%q' "$venv/bin/activate")"; fi
  cat <<EOF
# One process per GPU; a task that fails ends the whole step instead of leaving the others waiting.
srun --kill-on-bad-exit=1 $train_command
EOF
}

if [[ "$dry_run" -eq 1 ]]; then
  echo "sbatch <<'SCRIPT'"
  batch_script
  echo "SCRIPT"
  exit 0
fi
batch_script | sbatch  # sbatch reads the script from stdin
