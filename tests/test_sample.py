"""`python -m dig_jax.sample` on a tiny trained run: outputs, samplers, latent runs, EMA loading and errors."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from local_processes import free_port, run_processes
from PIL import Image
from safetensors.numpy import save_file

from dig_jax import checkpoint as ckpt
from dig_jax import sample, sampling
from dig_jax.images import to_uint8
from dig_jax.models import split_params
from dig_jax.train import save_sample_grid
from dig_jax.train_state import build_optimizer, init_state
from dig_jax.vae import CONFIG_FILE, WEIGHTS_FILE, AutoencoderKLConfig, diffusers_param_shapes
from tests.fixtures_tiny_run import TINY_CHECKPOINT_STEPS, TINY_IMAGE_SIZE, tiny_run  # noqa: F401

NUM_CLASSES = 12  # the quickstart config's "shapes" classes
FAST = ["--num_steps", "3"]


def run_cli(*argv) -> None:
    sample.main([str(a) for a in argv])


def grid_size(rows: int, columns: int, padding: int = 2) -> tuple[int, int]:
    """PIL (width, height) of a make_grid of TINY_IMAGE_SIZE images."""
    cell = TINY_IMAGE_SIZE + padding
    return columns * cell + padding, rows * cell + padding


def test_class_grid_writes_png_and_npz_into_the_workdir(tiny_run, capsys):  # noqa: F811
    run_cli("--workdir", tiny_run, "--classes", "0,5,7", "--per_class", 2, *FAST)

    stem = os.path.join(tiny_run, "samples", f"step{TINY_CHECKPOINT_STEPS[-1]}_ddpm3_cfg1_seed0_6img")
    with Image.open(stem + ".png") as png:
        assert png.mode == "RGB" and png.size == grid_size(rows=3, columns=2)
    with np.load(stem + ".npz", allow_pickle=False) as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (6, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
        np.testing.assert_array_equal(npz["arr_1"], [0, 0, 5, 5, 7, 7])
    assert "Sampled 6 images of step 4" in capsys.readouterr().out


def test_ddim_with_guidance_on_random_classes_writes_only_the_npz(tiny_run, tmp_path):  # noqa: F811
    npz_path = tmp_path / "out.npz"
    run_cli("--workdir", tiny_run, "--step", TINY_CHECKPOINT_STEPS[0], "--sampler", "ddim", "--cfg_scale", 2,
            "--guided_channels", "all", "--num_images", 5, "--seed", 3, "--npz", npz_path, *FAST)

    with np.load(npz_path, allow_pickle=False) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert labels.shape == (5,) and ((0 <= labels) & (labels < NUM_CLASSES)).all()
    assert os.listdir(tmp_path) == ["out.npz"]


def test_sample_images_pads_the_last_batch_decodes_and_keeps_label_order(monkeypatch):
    calls = []

    def fake_generate(model, labels, keys, **settings):
        calls.append((np.asarray(labels), jax.random.key_data(keys)))
        return np.asarray(labels, np.float32)[:, None, None, None] / 100 * np.ones((1, 2, 2, 3), np.float32)

    monkeypatch.setattr(sampling, "generate", fake_generate)
    monkeypatch.setattr(sampling, "replicate_locally", lambda model: None)
    labels = np.array([1, 2, 3, 4, 5], np.int32)
    images = sampling.sample_images(None, labels, seed=0, batch_size=2, first_index=10, decode=lambda x: -x,
                                    num_steps=3)

    assert [batch.tolist() for batch, _ in calls] == [[1, 2], [3, 4], [5, 5]]
    # Image i of the call is image first_index + i of the seed's stream, the padding the stream's next one.
    expected_keys = jax.random.key_data(sampling.image_keys(0, 10, 6))
    np.testing.assert_array_equal(np.concatenate([keys for _, keys in calls]), expected_keys)
    np.testing.assert_array_equal(images[:, 0, 0, 0], to_uint8(-labels / 100))


@pytest.mark.parametrize("selection, num_classes, expected", [
    (["--all_classes"], 3, [0, 1, 2]),
    (["--classes", "4,1"], 12, [4, 1]),
    ([], 1000, list(range(sample.DEFAULT_GRID_CLASSES))),  # default: the first classes
    ([], 5, [0, 1, 2, 3, 4]),
    (["--num_images", "9"], 5, None),
])
def test_select_classes(selection, num_classes, expected):
    args = sample.parse_args(["--workdir", "unused", *selection])
    assert sample.select_classes(args, num_classes) == expected


def test_random_classes_depend_on_the_seed_and_index_only_and_cover_the_label_set():
    labels = sampling.random_classes(1, 600, 12)
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(12))
    np.testing.assert_array_equal(sampling.random_classes(1, 250, 12), labels[:250])
    assert not np.array_equal(sampling.random_classes(2, 600, 12), labels)


def test_load_ema_model_restores_the_ema_weights_of_the_checkpoint(tiny_run):  # noqa: F811
    step = TINY_CHECKPOINT_STEPS[0]
    model, config, restored_step = sample.load_ema_model(tiny_run, step)
    _, loaded, _ = split_params(model)
    assert restored_step == step

    # The whole train state of that step, restored the way the trainer does.
    tx, _ = build_optimizer(config.optimizer)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                  jax.eval_shape(lambda: init_state(loaded, tx, config.seed)))
    checkpointer = ckpt.Checkpointer(tiny_run)
    state = checkpointer.restore(step, abstract_state)
    checkpointer.close()

    def same(a, b):
        return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))

    assert same(loaded, state["ema"]) and not same(loaded, state["params"])


def write_tiny_vae(folder) -> None:
    """A random diffusers-format AutoencoderKL with one block (no resampling) and 3 latent channels."""
    config = {"_class_name": "AutoencoderKL", "block_out_channels": [32], "layers_per_block": 1,
              "latent_channels": 3, "norm_num_groups": 32}
    rng = np.random.default_rng(0)
    shapes = diffusers_param_shapes(AutoencoderKLConfig.from_diffusers(config))
    os.makedirs(folder)
    save_file({key: (0.05 * rng.standard_normal(shape)).astype(np.float32) for key, shape in shapes.items()},
              os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f)


def test_latent_run_needs_a_vae_and_decodes_through_it(tiny_run, tmp_path, capsys):  # noqa: F811
    # The tiny run relabelled as latent-space: its 16x16x3 "latents" decode to 16x16 RGB through a 1-block VAE.
    workdir = tmp_path / "latent_run"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("samples"))
    config = json.loads((workdir / "config.json").read_text())
    config["data"]["space"] = "latent"
    (workdir / "config.json").write_text(json.dumps(config))

    with pytest.raises(SystemExit) as exit_info:
        run_cli("--workdir", workdir, "--npz", tmp_path / "latent.npz", *FAST)
    assert exit_info.value.code == 2 and "--vae_path" in capsys.readouterr().err

    write_tiny_vae(tmp_path / "vae")
    run_cli("--workdir", workdir, "--vae_path", tmp_path / "vae", "--classes", "1", "--per_class", 2,
            "--npz", tmp_path / "latent.npz", *FAST)
    with np.load(tmp_path / "latent.npz", allow_pickle=False) as npz:
        assert npz["arr_0"].shape == (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)


@pytest.mark.parametrize("problem, argv, message", [
    ("missing workdir", ["--workdir", "{missing}"], "does not exist"),
    ("workdir of no run", ["--workdir", "{empty}"], "config.json not found"),
    ("no checkpoint", ["--workdir", "{untrained}"], "no checkpoint in"),
    ("missing step", ["--workdir", "{run}", "--step", "3"], "--step 3: no such checkpoint"),
    ("class out of range", ["--workdir", "{run}", "--classes", "0,12"], "--classes [12]"),
    ("malformed classes", ["--workdir", "{run}", "--classes", "a,b"], "comma-separated class indices"),
    ("eta with ddpm", ["--workdir", "{run}", "--eta", "0.5"], "--eta 0.5 applies to --sampler ddim only"),
    ("upsample factor 1", ["--workdir", "{run}", "--upsample_guidance", "1"], "integer resolution multiple >= 2"),
    ("theta alone", ["--workdir", "{run}", "--upsample_theta", "2"], "need --upsample_guidance M"),
    ("eta out of range", ["--workdir", "{run}", "--upsample_guidance", "2", "--upsample_eta", "1.5"],
     "--upsample_eta 1.5: expected a fraction in [0, 1]"),
])
def test_errors_name_the_problem(tiny_run, tmp_path, capsys, problem, argv, message):  # noqa: F811
    (tmp_path / "empty").mkdir()
    (tmp_path / "untrained").mkdir()
    shutil.copy(os.path.join(tiny_run, "config.json"), tmp_path / "untrained")
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "untrained": tmp_path / "untrained",
             "run": tiny_run}
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*[a.format(**paths) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err, problem


def test_dpm_solver_with_guidance_and_upsample_guidance_at_twice_the_size_and_png_alone(tiny_run, tmp_path):  # noqa: F811
    run_cli("--workdir", tiny_run, "--classes", "1,2", "--per_class", 1, "--sampler", "dpm++2m", "--cfg_scale", 2,
            "--upsample_guidance", 2, "--png", tmp_path / "x2.png", *FAST)

    with Image.open(tmp_path / "x2.png") as png:
        assert png.size == (2 * TINY_IMAGE_SIZE + 4, 2 * (2 * TINY_IMAGE_SIZE + 2) + 2)  # 2 rows of 1
    # --png alone still writes the npz, to its default path.
    stem = os.path.join(tiny_run, "samples", f"step{TINY_CHECKPOINT_STEPS[-1]}_dpm++2m3_cfg2_ug2x1x0.3_seed0_2img")
    with np.load(stem + ".npz", allow_pickle=False) as npz:
        assert npz["arr_0"].shape == (2, 2 * TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE, 3)
        np.testing.assert_array_equal(npz["arr_1"], [1, 2])
    assert not os.path.exists(stem + ".png")


def test_the_cli_reproduces_the_end_of_training_grid(tiny_run, tmp_path):  # noqa: F811
    model, config, step = sample.load_ema_model(tiny_run)
    config.sample.update(per_class=1, num_steps=3, sampler="ddim", cfg_scale=2.0)
    train_png = save_sample_grid(config, model, split_params(model)[1], str(tmp_path), step)

    run_cli("--workdir", tiny_run, "--all_classes", "--per_class", 1, "--seed", config.seed, "--sampler", "ddim",
            "--num_steps", 3, "--cfg_scale", 2, "--png", tmp_path / "cli.png")
    with Image.open(train_png) as trained, Image.open(tmp_path / "cli.png") as sampled:
        np.testing.assert_array_equal(np.asarray(trained), np.asarray(sampled))


def _sample_in_processes(workdir, argv, processes: int, devices_per_process: int) -> None:
    """`python -m dig_jax.sample` as a job of `processes` local processes (CPU devices, gloo collectives)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": str(processes),
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "dig_jax.sample", "--workdir", str(workdir), *map(str, argv)]
    run_processes([command] * processes, [{**env, "JAX_PROCESS_ID": str(i)} for i in range(processes)], timeout=300,
                  cwd=root)


def test_random_class_sampling_is_resumable_and_independent_of_devices_and_processes(tiny_run, tmp_path,  # noqa: F811
                                                                                     monkeypatch, capsys):
    argv = ["--num_images", 7, "--batch_size", 3, "--sampler", "ddim", *FAST]
    npz_path = tmp_path / "one_process.npz"
    parts = tmp_path / "one_process.parts"

    # One process, 8 devices, stopped after its first batch (of 3).
    real_sample_images, calls = sampling.sample_images, []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sample_images(*args, **kwargs)

    monkeypatch.setattr(sample, "sample_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli("--workdir", tiny_run, "--npz", npz_path, *argv)
    assert sorted(os.listdir(parts)) == ["images_0000000-0000002.npz", "settings.json"]
    assert not npz_path.exists()

    # Other settings cannot resume into these parts.
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--workdir", tiny_run, "--npz", npz_path, "--cfg_scale", 2, *argv)
    assert exit_info.value.code == 2 and "cfg_scale" in capsys.readouterr().err

    # The rerun samples only the two missing batches.
    calls.clear()
    monkeypatch.setattr(sample, "sample_images", lambda *a, **k: calls.append(k["first_index"]) or
                        real_sample_images(*a, **k))
    run_cli("--workdir", tiny_run, "--npz", npz_path, *argv)
    assert calls == [3, 6] and not parts.exists()
    assert "1 of 3 batches already in" in capsys.readouterr().out

    # Two processes of 4 devices, from scratch.
    _sample_in_processes(tiny_run, ["--npz", tmp_path / "two_processes.npz", *argv], processes=2,
                         devices_per_process=4)

    with np.load(npz_path, allow_pickle=False) as one, np.load(tmp_path / "two_processes.npz") as two:
        assert one["arr_0"].shape == (7, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
        np.testing.assert_array_equal(one["arr_1"], sampling.random_classes(0, 7, NUM_CLASSES))
        np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
        np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
