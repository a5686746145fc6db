"""The trainer end to end on the built-in data: learning, exact resume, preemption, NaN guard, bad configs."""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from configs import quickstart
from dig_jax import checkpoint as ckpt
from dig_jax.train import ConfigError, NonFiniteLossError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    c = quickstart.get_config()
    c.model.input_size = c.data.image_size = 16
    c.model.options = dict(depth=1, hidden_size=32, num_heads=2, gla_impl="xla")
    c.global_batch_size = 8
    c.num_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.sample.per_class = 0
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return c


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return {record["step"]: record["loss"] for record in records(workdir)}


def test_training_lowers_the_loss(tmp_path):
    config = tiny_config(num_steps=120, log_every=10, checkpoint_every=1000, global_batch_size=16)
    config.optimizer.learning_rate = 2e-3
    train(config, str(tmp_path))
    trajectory = losses(str(tmp_path))
    assert trajectory[120] < 0.6 * trajectory[10], trajectory
    # The share of each logged interval the loop spent getting batches: the in-memory source keeps up.
    assert all(0 <= record["data_time_fraction"] < 0.5 for record in records(str(tmp_path))[1:])


def test_resume_is_exact_and_logs_each_step_once(tmp_path):
    workdir = str(tmp_path)
    train(tiny_config(), workdir)
    straight = losses(workdir)
    # As if the run had stopped after logging steps 4-6 but before saving step 6: it resumes from step 3.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    train(tiny_config(), workdir)
    assert [record["step"] for record in records(workdir)] == [1, 2, 3, 4, 5, 6]
    assert [losses(workdir)[step] for step in (4, 5, 6)] == [straight[step] for step in (4, 5, 6)]


def test_several_steps_per_call_follow_the_same_trajectory(tmp_path):
    one, three = str(tmp_path / "one"), str(tmp_path / "three")
    train(tiny_config(), one)
    train(tiny_config(steps_per_call=3, log_every=3), three)
    expected, batched = losses(one), losses(three)
    assert sorted(batched) == [3, 6]
    assert batched[3] == pytest.approx(expected[3], rel=1e-5) and batched[6] == pytest.approx(expected[6], rel=1e-5)
    with pytest.raises(ConfigError, match="config.steps_per_call=4"):  # step 6 cannot be reached in fours
        train(tiny_config(steps_per_call=4, num_steps=8, log_every=4, checkpoint_every=4), three)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    workdir = str(tmp_path)
    command = [sys.executable, "-m", "dig_jax.train", "--config", "configs/quickstart.py", "--workdir", workdir,
               "--config.model.input_size=16", "--config.data.image_size=16", "--config.global_batch_size=8",
               "--config.num_steps=100000", "--config.log_every=1", "--config.checkpoint_every=100000",
               "--config.sample.per_class=0", "--config.model.options.depth=1",
               "--config.model.options.hidden_size=32", "--config.model.options.num_heads=2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:  # wait until training is under way
            if line.startswith("step 2/"):
                break
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "SIGTERM received: saved step" in output
    saved = ckpt.Checkpointer(workdir).latest_step()
    assert saved is not None and saved >= 2
    train(tiny_config(num_steps=saved + 1), workdir)  # resumes from the saved step
    assert max(losses(workdir)) == saved + 1


def test_nan_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config(num_steps=50, checkpoint_every=1)
    config.optimizer.learning_rate = 1e30
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is step"):
        train(config, str(tmp_path))
    last = ckpt.Checkpointer(str(tmp_path)).latest_step()
    assert last is not None and last < 50
    logged = records(str(tmp_path))  # the diverged step is reported by the error, not logged as a row
    assert logged and all(math.isfinite(record["loss"]) for record in logged)


def test_nan_in_a_step_logged_after_the_next_dispatch_stops_training_unlogged(tmp_path):
    """Between checkpoints a logged step's metrics are fetched once the next call is queued: a diverged step is
    still caught before its row is written, and no later step is logged."""
    config = tiny_config(num_steps=50, checkpoint_every=1000)
    config.optimizer.learning_rate = 1e30
    with pytest.raises(NonFiniteLossError, match="No checkpoint was saved yet") as error:
        train(config, str(tmp_path))
    diverged = int(str(error.value).split(" at step ")[1].split(":")[0])
    logged = records(str(tmp_path))
    assert [record["step"] for record in logged] == list(range(1, diverged))
    assert all(math.isfinite(record["loss"]) for record in logged)


def tree_digest(folder):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path):
    workdir = str(tmp_path)
    train(tiny_config(num_steps=3), workdir)
    step_dir = os.path.join(workdir, "checkpoints", "3", "state")
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(8)
    before = tree_digest(os.path.join(workdir, "checkpoints"))
    with pytest.raises(ckpt.CheckpointError, match="could not be restored"):
        train(tiny_config(), workdir)
    assert tree_digest(os.path.join(workdir, "checkpoints")) == before


def test_workdir_of_another_model_or_data_order_is_refused(tmp_path):
    train(tiny_config(num_steps=1), str(tmp_path))
    other = tiny_config()
    other.model.options = dict(depth=2, hidden_size=32, num_heads=2, gla_impl="xla")
    with pytest.raises(ckpt.CheckpointError, match=r"different config.model \(config.model.options="):
        train(other, str(tmp_path))
    more_workers = tiny_config()  # the data order depends on the worker count: the key is named
    more_workers.data.worker_count = 2
    with pytest.raises(ckpt.CheckpointError, match="config.data.worker_count=0 then, 2 now"):
        train(more_workers, str(tmp_path))


def test_a_run_recorded_before_a_config_key_existed_resumes(tmp_path):
    workdir = str(tmp_path)
    train(tiny_config(num_steps=1), workdir)
    recorded = ckpt.read_run_config(workdir)
    del recorded["data"]["batch_reads"]  # as written before the key was added
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(recorded, f)
    train(tiny_config(num_steps=2), workdir)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    assert "batch_reads" in ckpt.read_run_config(workdir)["data"]


def test_a_bad_model_config_writes_nothing_and_a_workdir_without_checkpoints_takes_a_new_config(tmp_path):
    workdir = str(tmp_path / "run")
    for key, value, message in (("model.name", "DiG-Q/2", "config.model.name='DiG-Q/2' is not a model"),
                                ("model.input_size", 18, "config.model.input_size=18 must be a multiple of "
                                                         "DiG-S/4's patch size 4"),
                                ("model.options.gla_impl", "foo", "config.model.options: gla_impl must be one of"),
                                ("model.options.conv_impl", "pallas", "config.model.options.conv_impl='pallas' needs a "
                                                                      "GPU or TPU backend, this is cpu")):
        with pytest.raises(ConfigError, match=message):
            train(tiny_config(**{key: value}), workdir)
        assert not os.path.exists(workdir)
    # A start that failed after recording its config (the model's own checks run when it is built) left no
    # checkpoint: the workdir accepts another config and records it.
    os.makedirs(workdir)
    ckpt.write_run_config(workdir, tiny_config(**{"model.options.num_heads": 3}).to_json_best_effort())
    config = tiny_config(num_steps=1)
    train(config, workdir)
    assert ckpt.read_run_config(workdir)["model"] == json.loads(config.to_json_best_effort())["model"]


@pytest.mark.parametrize("overrides,message", [
    ({"compute_dtype": "float16"}, "config.compute_dtype"),
    ({"global_batch_size": 0}, "config.global_batch_size"),
    ({"ema_decay": 1.5}, "config.ema_decay"),
    ({"steps_per_call": 4}, "config.num_steps=6 must be a multiple of config.steps_per_call=4"),
    ({"data.image_size": 24}, "config.data.image_size"),
    ({"mesh.seq": 3}, "config.mesh.seq must be >= 1 and divide the 8 devices"),
    ({"mesh.seq": 2, "global_batch_size": 6}, r"divisible by the 4 devices that split it \(all devices / config.mesh"),
    ({"mesh.seq": 2, "model.name": "DiT-S/2"}, "config.mesh.seq=2 splits DiG's tokens; DiT-S/2 has no"),
])
def test_bad_config_values_are_rejected_by_name(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(**overrides), str(tmp_path))


@pytest.mark.parametrize("arguments,message", [
    (["--config.model.name=DiG-Q/2"], "error: config.model.name='DiG-Q/2' is not a model; known: DiG-S/2,"),
    (["--config.model.input_size=18"], "error: config.model.input_size=18 must be a multiple of DiG-S/4's patch size"),
    (["--config.model.options.gla_impl=foo"], "error: config.model.options: gla_impl must be one of ('auto', "),
    (["--config.global_batch_size=abc"], "error: --config.global_batch_size=abc: invalid literal for int() with "
                                         "base 10: 'abc' (config.global_batch_size must be of type int)"),
    (["--config.num_steps=3", "--config.model.bogus=1"], "error: --config.model.bogus: config.model.bogus is not a "
                                                         "config key; config.model has in_channels, input_size,"),
    (["--config.bogus=1"], "error: --config.bogus: config.bogus is not a config key; config has checkpoint_every,"),
    (["--config", "configs/imagenet256.py"], "error: --config=configs/imagenet256.py: ValueError: "
                                              "configs/imagenet256.py takes the model after a colon"),
    (["--config", "configs/missing.py"], "error: --config=configs/missing.py: no such config file"),
])
def test_command_line_errors_are_one_line_naming_the_problem(tmp_path, arguments, message):
    workdir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "dig_jax.train", "--config", "configs/quickstart.py", "--workdir", workdir,
         *arguments], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(message), result.stderr
    assert not os.path.exists(workdir)


def test_a_workdir_that_is_a_file_or_not_writable_is_refused_by_name(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("user data")
    for workdir in (a_file, a_file / "run"):
        with pytest.raises(ConfigError, match=f"--workdir={workdir}: {a_file} is a file, not a folder"):
            train(tiny_config(), str(workdir))
    assert a_file.read_text() == "user data"
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anyway; a read-only mount is what refuses it
        monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(read_only))
    with pytest.raises(ConfigError, match=f"--workdir={read_only / 'run'}: {read_only} is not writable"):
        train(tiny_config(), str(read_only / "run"))


def test_quickstart_config_trains_and_writes_a_sample_grid_once(tmp_path, capsys):
    config = tiny_config(num_steps=2)
    config.sample.per_class = 1
    config.sample.num_steps = 3
    started = time.time()
    train(config, str(tmp_path))
    assert time.time() - started < 300
    output = capsys.readouterr().out
    assert 0 <= output.find("Compiling the train step of DiG-S/4") < output.find("step 1/2")
    assert re.search(r"step 2/2 \|.* img/s \| data \d+% \|", output)
    grid = tmp_path / "samples_2.png"
    assert grid.read_bytes().startswith(b"\x89PNG")
    grid.write_bytes(b"kept")  # a rerun of the finished run neither trains nor samples again
    train(config, str(tmp_path))
    assert grid.read_bytes() == b"kept"
    assert "Nothing to do" in capsys.readouterr().out
