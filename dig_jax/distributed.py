"""Multi-process (multi-host) training: starting JAX's distributed runtime, and resuming a checkpoint that a
different number of processes wrote.

One process drives the accelerators of one host (a TPU VM worker, a SLURM task per GPU, ...).
`jax.distributed.initialize` connects the processes: `jax.devices()` then lists every device of the job, jitted
steps span all of them, and orbax coordinates multi-host checkpoint writes. `initialize(config)` picks the setup
from `config.distributed` and the environment, first match wins:

  1. cluster="none": one process, nothing to do.
  2. Explicit: coordinator_address, num_processes and process_id from the config, each falling back to the
     environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (give all three or none).
     num_processes=1 is one process.
  3. SLURM: SLURM_JOB_ID is set and SLURM_NTASKS > 1 (an `srun` job step); JAX reads the coordinator, process
     count and id from SLURM's variables, and gives each task one GPU (SLURM_LOCALID).
  4. Cloud TPU: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES name several hosts (GKE), or libtpu is installed
     (a Cloud TPU VM; JAX reads the slice's workers from the VM metadata, a one-host VM gives one process).
  5. Otherwise one process.

Everything else in a multi-process run is per process by construction: each process reads its own slice of the
records (dig_jax.data.make_loader shards by jax.process_index()), feeds its devices' rows of the global batch,
and saves its own loader position; only process 0 writes config.json, logs and sample images.
"""

import importlib.util
import os
import re

import jax
from ml_collections import ConfigDict

from dig_jax.checkpoint import CheckpointError

CLUSTERS = ("auto", "none")
_EXPLICIT_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                 "process_id": "JAX_PROCESS_ID"}
_UNSET = {"coordinator_address": "", "num_processes": 0, "process_id": -1}


def initialize(config: ConfigDict) -> str:
    """Starts JAX's distributed runtime as `config.distributed` and the environment say (see the module doc).

    Must run before anything touches a JAX device; a second call in the same process does nothing.
    Returns how the processes were found: "single", "explicit", "slurm", "tpu" or "already initialized".
    """
    if jax.distributed.is_initialized():
        return "already initialized"
    d = config.distributed
    if d.cluster not in CLUSTERS:
        raise ValueError(f"config.distributed.cluster must be one of {CLUSTERS}, got {d.cluster!r}")
    if d.cluster == "none":
        return "single"
    explicit = _explicit_settings(d)
    if explicit is not None:
        if explicit["num_processes"] == 1:
            return "single"
        _use_cpu_collectives()
        jax.distributed.initialize(**explicit)
        return "explicit"
    if _slurm_job_step_has_several_tasks():
        jax.distributed.initialize()
        return "slurm"
    if _on_cloud_tpu():
        jax.distributed.initialize()
        return "tpu"
    return "single"


def _explicit_settings(d: ConfigDict) -> dict | None:
    """{"coordinator_address", "num_processes", "process_id"} from the config or environment, or None if unset."""
    values = {}
    for key, env_name in _EXPLICIT_ENV.items():
        value = d[key] if d[key] != _UNSET[key] else os.environ.get(env_name, _UNSET[key])
        values[key] = value if key == "coordinator_address" else int(value)
    given = [key for key in values if values[key] != _UNSET[key]]
    if not given:
        return None
    if len(given) < len(values):
        missing = [f"config.distributed.{key} (or ${_EXPLICIT_ENV[key]})" for key in values if key not in given]
        raise ValueError(f"an explicit multi-process setup needs {', '.join(missing)} as well; got "
                         f"{', '.join(f'{key}={values[key]!r}' for key in given)}")
    if not 0 <= values["process_id"] < values["num_processes"]:
        raise ValueError(f"config.distributed.process_id must be in [0, num_processes={values['num_processes']}), "
                         f"got {values['process_id']}")
    return values


def _use_cpu_collectives() -> None:
    # Processes exchange CPU-device data through gloo (CPU-only runs and the multi-process tests); accelerators
    # use their own interconnect and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _slurm_job_step_has_several_tasks() -> bool:
    if "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    if "SLURM_STEP_NODELIST" not in os.environ:
        raise ValueError(
            f"SLURM job {os.environ['SLURM_JOB_ID']} has SLURM_NTASKS={os.environ['SLURM_NTASKS']} but this is not a "
            f"job step: start the trainer with `srun python -m dig_jax.train ...` (see launch/slurm.sh), or set "
            f"--config.distributed.cluster=none for one process")
    return True


def _on_cloud_tpu() -> bool:
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len(hosts.split(",")) > 1 or importlib.util.find_spec("libtpu") is not None


def describe_processes() -> str:
    """One line for the log: processes, devices and this process's share."""
    return (f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices "
            f"({jax.local_device_count()} in process {jax.process_index()})")


# --- Resuming on a different number of processes -------------------------------------------------------------

_LOADER_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def saved_process_count(checkpoint_directory: str, step: int) -> int | None:
    """How many processes wrote checkpoint `step` (from its per-process loader files), None without loader state."""
    data_dir = os.path.join(checkpoint_directory, str(step), "data")
    if not os.path.isdir(data_dir):
        return None
    counts = {int(m.group(2)) for name in os.listdir(data_dir) if (m := _LOADER_STATE_FILE.fullmatch(name))}
    if len(counts) != 1:
        raise CheckpointError(f"{data_dir} should hold the loader states of one run (process_<i>-of-<n>.json), "
                              f"found process counts {sorted(counts)}")
    return counts.pop()


def restore_checkpoint(checkpointer, step: int, abstract_state: dict, loader) -> dict:
    """Restores train state `step` into `abstract_state`'s shardings, and the loader's position.

    Same number of processes as the run that saved it: the exact restore of `checkpointer.restore`.
    A different number (e.g. a pod slice of another size, or a 2-host run continued on one host): each process
    then reads a different slice of the records, so the saved per-process positions mean nothing. Policy: the
    train state (params, optimizer state, EMA, step, rng) is restored exactly, resharded by orbax to the new
    mesh, and every process's loader is moved `step` x (its batch) records into its own stream: the data
    position recomputed from the step, the same fraction of an epoch as the saved run had reached. The rest of
    that epoch is a fresh draw (a few records of it come twice or not at all); later epochs, and later resumes on
    the same number of processes, are exact.
    """
    saved = saved_process_count(checkpointer.directory, step)
    if saved is None or saved == jax.process_count():
        return checkpointer.restore(step, abstract_state, loader)
    state = checkpointer.restore(step, abstract_state)
    loader.set_state(loader.state_after(step))
    if jax.process_index() == 0:
        print(f"Checkpoint step {step} was written by {saved} process(es), this run has {jax.process_count()}: "
              f"restored the train state exactly and moved each process's data position to step {step} (data "
              f"order differs from the saved run's until the end of the current epoch).", flush=True)
    return state
