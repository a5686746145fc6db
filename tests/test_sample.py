"""`python -m dig_jax.sample` on a tiny trained run: outputs, samplers, latent runs, EMA loading and errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from dig_jax import checkpoint as ckpt
from dig_jax import sample
from dig_jax.images import to_uint8
from dig_jax.models import split_params
from dig_jax.train import build_optimizer, init_state
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

    def fake_generate(model, labels, key, **settings):
        calls.append((np.asarray(labels), jax.random.key_data(key)))
        return np.asarray(labels, np.float32)[:, None, None, None] / 100 * np.ones((1, 2, 2, 3), np.float32)

    monkeypatch.setattr(sample, "generate", fake_generate)
    labels = np.array([1, 2, 3, 4, 5], np.int32)
    images = sample.sample_images(None, labels, seed=0, batch_size=2, decode=lambda x: -x, num_steps=3)

    assert [batch.tolist() for batch, _ in calls] == [[1, 2], [3, 4], [5, 5]]
    assert len({key.tobytes() for _, key in calls}) == 3
    np.testing.assert_array_equal(images[:, 0, 0, 0], to_uint8(-labels / 100))


@pytest.mark.parametrize("selection, num_classes, expected", [
    (["--all_classes", "--per_class", "2"], 3, [0, 0, 1, 1, 2, 2]),
    (["--classes", "4,1", "--per_class", "1"], 12, [4, 1]),
    (["--per_class", "1"], 1000, list(range(sample.DEFAULT_GRID_CLASSES))),  # default: the first classes
    (["--per_class", "1"], 5, [0, 1, 2, 3, 4]),
])
def test_select_labels(selection, num_classes, expected):
    args = sample.parse_args(["--workdir", "unused", *selection])
    np.testing.assert_array_equal(sample.select_labels(args, num_classes), expected)


def test_random_classes_are_reproducible_and_cover_the_label_set():
    args = sample.parse_args(["--workdir", "unused", "--num_images", "600", "--seed", "1"])
    labels = sample.select_labels(args, 12)
    np.testing.assert_array_equal(labels, sample.select_labels(args, 12))
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(12))


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
