"""Multi-process training on one machine (processes of 4 CPU devices talking over gloo) against one process,
resuming on a different number of processes, how the distributed setup is detected, and the launch scripts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from local_processes import free_port, run_processes
from multihost_worker import SMALL_FSDP_MIN_SIZE, concatenated, run_steps, tiny_config
from test_data import BatchReading

from dig_jax import distributed
from dig_jax.checkpoint import Checkpointer, CheckpointError
from dig_jax.data import create_dataset, make_loader
from dig_jax.sharding import make_mesh

WORKER = Path(__file__).with_name("multihost_worker.py")
RUN_TIMEOUT_S = 300  # generous: the processes share the machine with the rest of the suite


def _run_job(workdir, num_steps, *, processes, devices_per_process, mesh_data, mesh_fsdp) -> list[str]:
    """Runs multihost_worker.py as `processes` local processes to completion; returns each one's output."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    commands = [[sys.executable, str(WORKER), str(workdir), "--num_steps", str(num_steps), "--processes",
                 str(processes), "--process_id", str(i), "--port", str(port), "--mesh_data", str(mesh_data),
                 "--mesh_fsdp", str(mesh_fsdp)] for i in range(processes)]
    return run_processes(commands, [env] * processes, timeout=RUN_TIMEOUT_S)


def _logged_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice (by two processes?): {steps}"
    return {r["step"]: r["loss"] for r in records}


def _reference_batches(config, saved_steps: int, resumed_steps: int) -> list[dict]:
    """The global batches of the 2-process run (its hosts' batches side by side), then those of one process
    resuming at `saved_steps` (its own stream, moved on by `saved_steps` batches: the topology-change policy)."""
    source = create_dataset(config.data.name, split="train", image_size=config.data.image_size,
                            **config.data.kwargs.to_dict())

    def loader(index, count):
        return make_loader(source, global_batch_size=config.global_batch_size, seed=config.seed,
                           shard_index=index, shard_count=count)

    hosts = [loader(0, 2), loader(1, 2)]
    batches = [concatenated(*(next(host) for host in hosts)) for _ in range(saved_steps)]
    single = loader(0, 1)
    for _ in range(saved_steps):
        next(single)
    return batches + [next(single) for _ in range(resumed_steps)]


def test_two_processes_train_as_one_and_their_checkpoint_resumes_on_one_process(tmp_path):
    workdir = tmp_path / "run"
    outputs = _run_job(workdir, 4, processes=2, devices_per_process=4, mesh_data=2, mesh_fsdp=4)
    assert "2 process(es), 8 cpu devices (4 in process 0); mesh data=2 x fsdp=4" in outputs[0]
    assert "step 4/4" in outputs[0] and "step " not in outputs[1]  # only process 0 logs
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(workdir / "checkpoints" / "4" / "data"))
    assert sorted(_logged_losses(workdir)) == [1, 2, 3, 4]

    # One process with all 8 devices and another mesh continues the 2-process run.
    (output,) = _run_job(workdir, 6, processes=1, devices_per_process=8, mesh_data=8, mesh_fsdp=1)
    assert "Checkpoint step 4 was written by 2 process(es), this run has 1" in output
    logged = _logged_losses(workdir)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]

    # The same steps in this process (SMALL_FSDP_MIN_SIZE: the step test_sharding compiles, if it ran first).
    config = tiny_config(num_steps=6, mesh_data=2, mesh_fsdp=4)
    losses, state = run_steps(make_mesh(2, 4), _reference_batches(config, 4, 2), SMALL_FSDP_MIN_SIZE)
    np.testing.assert_allclose([logged[step] for step in range(1, 7)], losses, rtol=2e-5)
    saved = Checkpointer(workdir, async_save=False)
    restored = saved.restore(6, state)
    saved.close()
    for name in ("params", "opt_state", "ema"):
        for got, want in zip(jax.tree.leaves(restored[name]), jax.tree.leaves(state[name]), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6, err_msg=name)
    assert int(restored["step"]) == 6


@pytest.mark.parametrize("reading", ["grain, 0 workers", "grain, 3 workers", "batches"])
def test_state_after_matches_reading_that_many_batches(reading):
    """3 workers: batches k, k + 3, ... come from one worker. "batches": latents read a batch at a time."""
    source = create_dataset("shapes", split="train", image_size=8, num_images=40)
    options = {"batch_reads": False, "worker_count": 3 if "3" in reading else 0, "read_threads": 0}
    if reading == "batches":
        source, options = BatchReading(source), {}
    for shard_index, shard_count in ((0, 1), (1, 2)):
        def loader(index=shard_index, count=shard_count):
            return make_loader(source, global_batch_size=4, seed=3, shard_index=index, shard_count=count, **options)

        reference = loader()
        batches = [next(reference) for _ in range(14)]  # more than an epoch of a 2-way shard (10 batches)
        reference.close()
        for step in (0, 4, 12):
            moved = loader()
            moved.set_state(moved.state_after(step))
            for expected in batches[step:step + 2]:
                got = next(moved)
                np.testing.assert_array_equal(got["image"], expected["image"])
                np.testing.assert_array_equal(got["label"], expected["label"])
            moved.close()


def test_saved_process_count_reads_the_loader_state_files(tmp_path):
    data = tmp_path / "7" / "data"
    data.mkdir(parents=True)
    assert distributed.saved_process_count(str(tmp_path), 3) is None
    for name in ("process_0-of-2.json", "process_1-of-2.json", "commit_success.txt"):
        (data / name).write_text("{}")
    assert distributed.saved_process_count(str(tmp_path), 7) == 2
    (data / "process_0-of-4.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"found process counts \[2, 4\]"):
        distributed.saved_process_count(str(tmp_path), 7)


_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
                "SLURM_STEP_NODELIST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def fake_initialize(monkeypatch):
    """Records jax.distributed.initialize calls instead of connecting; starts from an environment without clusters."""
    for name in _CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def _distributed_config(**values):
    config = tiny_config(num_steps=1, mesh_data=-1, mesh_fsdp=1)
    config.distributed.update(values)
    return config


def test_initialize_takes_explicit_settings_from_config_or_environment(fake_initialize, monkeypatch):
    assert distributed.initialize(_distributed_config()) == "single"
    explicit = dict(coordinator_address="host0:1234", num_processes=2, process_id=1)
    assert distributed.initialize(_distributed_config(**explicit)) == "explicit"
    assert distributed.initialize(_distributed_config(num_processes=1, process_id=0,
                                                      coordinator_address="host0:1234")) == "single"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed.initialize(_distributed_config(process_id=1)) == "explicit"  # config wins over env
    assert fake_initialize == [explicit, explicit]


def test_initialize_rejects_incomplete_or_inconsistent_explicit_settings(fake_initialize):
    with pytest.raises(ValueError, match=r"num_processes \(or \$JAX_NUM_PROCESSES\)"):
        distributed.initialize(_distributed_config(coordinator_address="host0:1234"))
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 2"):
        distributed.initialize(_distributed_config(coordinator_address="h:1", num_processes=2, process_id=2))
    with pytest.raises(ValueError, match="config.distributed.cluster must be one of"):
        distributed.initialize(_distributed_config(cluster="slurm"))
    assert fake_initialize == []


def test_initialize_detects_slurm_steps_and_tpu_pods(fake_initialize, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.initialize(_distributed_config()) == "single"
    monkeypatch.setenv("SLURM_NTASKS", "8")
    with pytest.raises(ValueError, match="srun"):  # an sbatch script's own shell is not a job step
        distributed.initialize(_distributed_config())
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[01-02]")
    assert distributed.initialize(_distributed_config()) == "slurm"
    assert distributed.initialize(_distributed_config(cluster="none")) == "single"
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed.initialize(_distributed_config()) == "tpu"
    assert fake_initialize == [{}, {}]  # JAX reads the rest from the cluster


LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def _dry_run(script: str, *args: str) -> list[str]:
    result = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def _remote_script(ssh_line: str) -> str:
    """The --command= script of a printed `gcloud ... ssh` line, unquoted the way bash reads the line."""
    words = subprocess.run(["bash", "-c", 'eval "words=($1)"; printf "%s\\0" "${words[@]}"', "bash", ssh_line],
                           capture_output=True, text=True, check=True).stdout.split("\0")
    (command,) = [word for word in words if word.startswith("--command=")]
    return command.removeprefix("--command=")


def _launcher_in(repo) -> str:
    """A copy of launch/local.sh in the folder `repo`, which stands for a checkout (with or without .venv)."""
    (repo / "launch").mkdir(parents=True)
    shutil.copy(LAUNCH / "local.sh", repo / "launch" / "local.sh")
    return str(repo / "launch" / "local.sh")


def test_local_launcher_starts_one_process_or_n_connected_ones(tmp_path):
    launcher = _launcher_in(tmp_path)  # no .venv: the system's python3
    (line,) = _dry_run(launcher, "--dry-run", "--", "--config", "configs/quickstart.py", "--workdir", "w")
    assert line.startswith("env PYTHONPATH=") and "XLA_FLAGS" not in line
    assert line.rstrip().endswith(" python3 -m dig_jax.train --config configs/quickstart.py --workdir w")
    lines = _dry_run(launcher, "--dry-run", "--processes", "2", "--cpu-devices", "4", "--port", "4321", "--",
                     "--config", "configs/quickstart.py", "--workdir=w")
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in line
        assert (f"--config.distributed.coordinator_address=localhost:4321 --config.distributed.num_processes=2 "
                f"--config.distributed.process_id={i}") in line
    assert lines[1].endswith("> w/process_1.log 2>&1 &")


def test_local_launcher_runs_the_checkouts_venv_python_when_there_is_one(tmp_path):
    launcher = _launcher_in(tmp_path)
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PYTHONPATH" "$@" > "$(dirname "$0")/called"\n')
    venv_python.chmod(0o755)
    subprocess.run(["bash", launcher, "--", "--config", "configs/quickstart.py", "--workdir", "w"], check=True)
    pythonpath, *arguments = (venv_python.parent / "called").read_text().splitlines()
    assert pythonpath.split(":")[0] == str(tmp_path)
    assert arguments == ["-m", "dig_jax.train", "--config", "configs/quickstart.py", "--workdir", "w"]
    (line,) = _dry_run(launcher, "--dry-run", "--python", "python3.12", "--", "--workdir", "w")  # asked for
    assert " python3.12 -m dig_jax.train " in line


def test_slurm_launcher_runs_one_task_per_gpu_through_srun():
    lines = _dry_run("slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--",
                     "--config", "configs/imagenet256.py:DiG-XL/2", "--workdir", "/shared/runs/xl2")
    assert lines[0] == "sbatch <<'SCRIPT'" and lines[-1] == "SCRIPT"
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--requeue"):
        assert f"#SBATCH {directive}" in lines
    assert ("srun --kill-on-bad-exit=1 python3 -m dig_jax.train --config configs/imagenet256.py:DiG-XL/2 "
            "--workdir /shared/runs/xl2") in [line.rstrip() for line in lines]
    subprocess.run(["bash", "-n"], input="\n".join(lines[1:-1]), text=True, check=True)


def test_tpu_pod_launcher_creates_sets_up_and_trains_on_all_workers():
    lines = _dry_run("tpu_pod.sh", "run", "--dry-run", "--zone", "us-central2-b", "--accelerator", "v4-32", "--spot",
                     "--workdir", "gs://runs-bucket/xl2", "--data-dir", "gs://data-bucket/tfds", "--",
                     "--config", "configs/imagenet256.py:DiG-XL/2")
    assert lines[0].startswith("gcloud compute tpus queued-resources create dig-jax --zone=us-central2-b ")
    assert "--accelerator-type=v4-32" in lines[0] and lines[0].rstrip().endswith("--spot")
    ssh = [line for line in lines if line.startswith("gcloud compute tpus tpu-vm ssh dig-jax")]
    assert len(ssh) == 2 and all("--worker=all" in line for line in ssh)
    setup, train = (_remote_script(line) for line in ssh)
    assert 'pip install --python ~/venv/bin/python -U "jax[tpu]"' in setup
    assert "-r ~/dig-jax/requirements.txt" in setup
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 runs-bucket ~/gcs/runs-bucket" in train
    assert ("TFDS_DATA_DIR=$HOME/gcs/data-bucket/tfds ~/venv/bin/python -m dig_jax.train "
            "--workdir=$HOME/gcs/runs-bucket/xl2 --config.data.kwargs.data_dir=$HOME/gcs/data-bucket/tfds "
            "--config configs/imagenet256.py:DiG-XL/2") in train
    for script in (setup, train):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert _dry_run("tpu_pod.sh", "delete", "--dry-run", "--zone", "z")[0].rstrip() == (
        "gcloud compute tpus queued-resources delete dig-jax --zone=z --force --quiet")


def test_tpu_pod_launcher_rejects_local_workdirs():
    result = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "train", "--dry-run", "--zone", "z", "--workdir",
                             "runs/xl2"], capture_output=True, text=True)
    assert result.returncode == 2 and "must be gs://BUCKET/PATH" in result.stderr
