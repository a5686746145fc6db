"""Latent-space training end to end: encode -> train a tiny DiG on the stored moments -> sample -> decode to PNG;
x0 = posterior SAMPLE * scaling factor, pre-encoded and encoded online; config checks, paper configs included.

Shares the tiny random VAE (64 px -> 8x8x4) and "shapes" encode setup of test_encode.py.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from test_encode import IMAGE_SIZE

from configs import imagenet256
from dig_jax.checkpoint import CheckpointError
from dig_jax.config_base import PAPER_RESULTS, base_config
from dig_jax.data.latents import read_metadata, write_metadata
from dig_jax.data_space import data_space
from dig_jax.sharding import make_mesh
from dig_jax.train import ConfigError, train, validate_config
from dig_jax.vae import DiagonalGaussian, load_vae

LATENT_SIZE = IMAGE_SIZE // 8
NUM_CLASSES = 12


@pytest.fixture
def latent_dir(encoded):
    """The session's encoded latents (tests/conftest.py), shared with test_encode.py."""
    return encoded


def latent_config(vae_path: str, latent_dir: str | None = None):
    """A tiny DiG on 8x8x4 latents of 64 px "shapes": pre-encoded from `latent_dir`, or encoded online."""
    c = base_config()
    c.model.input_size = LATENT_SIZE
    c.model.num_classes = NUM_CLASSES
    c.model.options = dict(depth=2, hidden_size=64, num_heads=2, gla_impl="xla")
    c.data.space = "latent"
    c.data.image_size = IMAGE_SIZE
    c.data.worker_count = 0  # in-process reading: loader processes would only compete for the test machine's cores
    if latent_dir is None:
        c.data.name = "shapes"
        c.data.kwargs = dict(num_images=64)
    else:
        c.data.name = "latents"
        c.data.kwargs = dict(data_dir=latent_dir)
    c.vae.path = vae_path
    c.optimizer.learning_rate = 1e-3
    c.ema_decay = 0.9
    c.global_batch_size = 8
    c.num_steps = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.sample.per_class = 0
    return c


def logged_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [record["loss"] for record in map(json.loads, f)]


def test_pre_encoded_latents_train_sample_and_decode_to_png_without_saving_the_vae(tmp_path, vae_dir, latent_dir):
    config = latent_config(vae_dir, latent_dir)
    config.sample.per_class = 1
    config.sample.num_steps = 2
    train(config, str(tmp_path))
    losses = logged_losses(str(tmp_path))
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    with Image.open(tmp_path / "samples_2.png") as grid:
        # One decoded 64 px image per class in one column, 2 px padding: decoded, not the 8x8 latents.
        assert grid.size == (IMAGE_SIZE + 4, NUM_CLASSES * (IMAGE_SIZE + 2) + 2)
        pixels = np.asarray(grid)[2:2 + IMAGE_SIZE, 2:2 + IMAGE_SIZE]
    assert pixels.std() > 0
    # orbax's tree metadata lists every saved array by its path: the train state only, no VAE parameter.
    saved = json.loads((tmp_path / "checkpoints" / "2" / "state" / "_METADATA").read_text())["tree_metadata"]
    assert {entry["key_metadata"][0]["key"] for entry in saved.values()} == {"step", "params", "opt_state", "ema",
                                                                             "rng"}
    assert not [path for path in saved if "quant_conv" in path or "down_blocks" in path]


def test_a_latent_run_read_record_by_record_resumes_only_so_and_says_how(tmp_path, vae_dir, latent_dir):
    config = latent_config(vae_dir, latent_dir)
    config.data.batch_reads = False
    train(config, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        recorded = json.load(f)
    del recorded["data"]["batch_reads"]  # a run started before the key existed, when latents were read per record
    with open(tmp_path / "config.json", "w") as f:
        json.dump(recorded, f)
    longer = latent_config(vae_dir, latent_dir)
    longer.num_steps = 4
    with pytest.raises(CheckpointError, match=r"record-by-record \(grain\) loader.*config.data.batch_reads = False"):
        train(longer, str(tmp_path))
    longer.data.batch_reads = False
    train(longer, str(tmp_path))
    assert len(logged_losses(str(tmp_path))) == 4


def test_x0_is_a_scaled_posterior_sample_drawn_anew_for_each_key(vae_dir, latent_dir):
    mesh = make_mesh()
    keys = jax.random.split(jax.random.key(0), 2)
    rng = np.random.default_rng(0)  # numpy inputs: no extra compiled programs
    moments = rng.normal(size=(8, LATENT_SIZE, LATENT_SIZE, 8)).astype(np.float32) - np.array([0.0] * 4 + [3.0] * 4,
                                                                                             np.float32)
    images = rng.uniform(-1, 1, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    vae = load_vae(vae_dir)
    cases = [  # (space, batch, the posterior by hand)
        (data_space(latent_config("", latent_dir), mesh), {"moments": moments}, DiagonalGaussian.from_moments(moments)),
        (data_space(latent_config(vae_dir), mesh), {"image": images}, jax.jit(vae.encode)(images)),
    ]
    for space, batch, posterior in cases:
        to_x0 = jax.jit(space.to_x0)
        x0 = [np.asarray(to_x0(space.frozen, batch, key)) for key in keys]
        for key, sample in zip(keys, x0):
            np.testing.assert_allclose(sample, posterior.sample(key) * 0.18215, rtol=1e-4, atol=1e-5)
        # A sample, not the mean: two keys differ by about sqrt(2) posterior standard deviations.
        ratio = (x0[0] - x0[1]) / (np.asarray(posterior.std) * 0.18215)
        assert abs(ratio.std() - np.sqrt(2)) < 0.15
    (pre_encoded, *_), (online, *_) = cases
    assert online.frozen and not pre_encoded.frozen  # only online encoding passes the VAE to the train step
    assert pre_encoded.decode is None and online.decode is not None
    pixel_config = latent_config(vae_dir)
    pixel_config.data.space = "pixel"
    pixel = data_space(pixel_config, mesh)
    assert pixel.to_x0(pixel.frozen, {"image": images}, keys[0]) is images and pixel.decode is None


def _set(config, key, value):
    *parents, leaf = key.split(".")
    for parent in parents:
        config = config[parent]
    config[leaf] = value


@pytest.mark.parametrize("online,key,value,message", [
    (True, "vae.path", "", "config.vae.path is empty"),
    (True, "vae.path", "/nonexistent/vae", "config.vae.path='/nonexistent/vae'"),
    (True, "data.image_size", 32, r"config.data.image_size=32 / 8 \(the VAE's downsampling\)"),
    (True, "model.in_channels", 3, "config.model.in_channels=3 must equal the VAE's latent_channels=4"),
    (True, "data.space", "voxel", "config.data.space must be one of"),
    (False, "data.kwargs.data_dir", "", r"config.data.kwargs.data_dir is empty.*docs/imagenet.md"),
    (False, "data.kwargs.data_dir", "/nonexistent/latents", "config.data.kwargs.data_dir='/nonexistent/latents'"),
    (False, "model.input_size", 4, r"config.model.input_size=4 .* \(8, 8, 4\)"),
    (False, "data.split", "validation", "config.data.split='validation'"),
    (False, "data.space", "pixel", "set config.data.space='latent'"),
])
def test_bad_latent_configs_are_rejected_by_name(vae_dir, latent_dir, online, key, value, message):
    config = latent_config(vae_dir, None if online else latent_dir)
    _set(config, key, value)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def _copy_metadata(source_dir, target_dir, *, complete=True, **changes) -> str:
    layout, _ = read_metadata(source_dir)
    os.makedirs(target_dir, exist_ok=True)
    write_metadata(target_dir, dataclasses.replace(layout, **changes), complete=complete)
    return str(target_dir)


def test_latent_dirs_that_cannot_train_are_rejected(tmp_path, vae_dir, latent_dir):
    incomplete = _copy_metadata(latent_dir, tmp_path / "incomplete", complete=False)
    with pytest.raises(ConfigError, match="is incomplete.*Rerun the same"):
        validate_config(latent_config(vae_dir, incomplete))
    unflipped = _copy_metadata(latent_dir, tmp_path / "unflipped", flipped=False)
    with pytest.raises(ConfigError, match="random_flip=True, but .* holds no flipped views"):
        validate_config(latent_config(vae_dir, unflipped))
    config = latent_config(vae_dir, unflipped)
    config.data.random_flip = False
    validate_config(config)
    config.vae.path = ""
    config.sample.per_class = 1
    with pytest.raises(ConfigError, match="config.sample.per_class > 0 decodes samples with the VAE"):
        validate_config(config)
    rescaled = _copy_metadata(latent_dir, tmp_path / "rescaled", scaling_factor=0.13025)
    with pytest.raises(ConfigError, match="scaling/shift factors"):
        validate_config(latent_config(vae_dir, rescaled))


@pytest.mark.parametrize("model_name", PAPER_RESULTS)
def test_paper_configs_validate_given_data_and_vae_paths(tmp_path, vae_dir, latent_dir, model_name):
    config = imagenet256.get_config(model_name)
    assert config.model.name == model_name
    with pytest.raises(ConfigError, match=r"config.data.kwargs.data_dir is empty.*docs/imagenet.md"):
        validate_config(config)
    # Online: a TFDS data dir and the VAE (the tiny one has SD's 8x downsampling and 4 latent channels).
    config.data.kwargs.data_dir = str(tmp_path)
    config.vae.path = vae_dir
    validate_config(config)
    # Pre-encoded: ImageNet 256 latents (32x32x4); the VAE path is then optional.
    imagenet_latents = _copy_metadata(latent_dir, tmp_path / "latents", image_size=256, latent_shape=(32, 32, 4))
    config.data.name = "latents"
    config.data.kwargs.data_dir = imagenet_latents
    config.vae.path = ""
    validate_config(config)


def test_paper_config_names_its_models_and_their_paper_fid():
    for model_name, fid in PAPER_RESULTS.items():
        assert f"{model_name} {fid:.2f}" in imagenet256.__doc__
    for bad in (None, "DiG-Q/2"):
        with pytest.raises(ValueError, match="configs/imagenet256.py:DiG-XL/2"):
            imagenet256.get_config(bad)
