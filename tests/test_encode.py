"""The latent encode job and the "latents" dataset: records against the VAE, float16 precision, flips through the
loader, resume after interruption, multi-host shard ownership, the final count check, and the CLI.

A tiny random VAE (4 blocks: 64 px images -> 8x8x4 latents) is written as a diffusers folder with `save_vae`; the
images come from the built-in "shapes" dataset.
"""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from safetensors.numpy import load_file

from dig_jax import encode
from dig_jax.config_base import base_config
from dig_jax.data import ShapesDataset, create_dataset, make_loader
from dig_jax.data.latents import METADATA_FILE, LatentDataset, read_metadata, vae_sha256
from dig_jax.vae import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AutoencoderKLConfig,
    diffusers_param_shapes,
    load_vae,
    save_vae,
    vae_from_state_dict,
)
from dig_jax.vae_programs import posterior_moments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 64
NUM_IMAGES = 20
SHARD_SIZE = 8  # shards of 8, 8 and 4 records
BATCH_SIZE = 8  # one image per CPU device (conftest makes 8)
TINY_VAE = AutoencoderKLConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)


def tiny_vae(seed: int = 0):
    """Random weights scaled by 1/sqrt(fan_in), so latents and log-variances stay in a realistic range."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    for key, shape in diffusers_param_shapes(TINY_VAE).items():
        if len(shape) > 1:
            value = rng.normal(size=shape) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):  # GroupNorm scales
            value = 1 + 0.1 * rng.normal(size=shape)
        else:
            value = 0.1 * rng.normal(size=shape)
        state_dict[key] = value.astype(np.float32)
    return vae_from_state_dict(TINY_VAE, state_dict)


def write_tiny_vae(folder) -> str:
    save_vae(tiny_vae(), folder)
    return str(folder)


def encode_config(vae_path: str, **encode_overrides):
    c = base_config()
    c.data.name = "shapes"
    c.data.image_size = IMAGE_SIZE
    c.data.kwargs = dict(num_images=NUM_IMAGES)
    c.vae.path = vae_path
    c.encode.batch_size = BATCH_SIZE
    c.encode.shard_size = SHARD_SIZE
    c.encode.read_threads = 2
    c.encode.update(encode_overrides)
    return c


def test_save_vae_writes_a_diffusers_folder_that_loads_back(tmp_path):
    vae = tiny_vae(seed=1)
    save_vae(vae, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["block_out_channels"] == [8, 8, 8, 8]
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    assert {k: v.shape for k, v in tensors.items()} == diffusers_param_shapes(TINY_VAE)
    loaded = load_vae(tmp_path)
    kernel = np.asarray(vae.encoder.conv_in.kernel[...])
    np.testing.assert_array_equal(np.asarray(loaded.encoder.conv_in.kernel[...]), kernel)
    np.testing.assert_array_equal(tensors["encoder.conv_in.weight"], kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(np.asarray(loaded.decoder.mid_block.attention.to_q.kernel[...]),
                                  np.asarray(vae.decoder.mid_block.attention.to_q.kernel[...]))


def test_metadata_describes_the_complete_dir(encoded, vae_dir):
    layout, complete = read_metadata(encoded)
    assert complete
    assert (layout.num_records, layout.num_shards, layout.latent_shape) == (NUM_IMAGES, 3, (8, 8, 4))
    assert (layout.dtype, layout.flipped, layout.scaling_factor, layout.shift_factor) == ("float16", True, 0.18215,
                                                                                         None)
    assert layout.source == repr(ShapesDataset(image_size=IMAGE_SIZE, num_images=NUM_IMAGES))
    assert layout.vae_sha256 == vae_sha256(vae_dir)
    assert json.loads(open(os.path.join(encoded, METADATA_FILE)).read())["record_bytes"] == 4 + 2 * 8 * 8 * 8 * 2
    shards = sorted(f for f in os.listdir(encoded) if f != METADATA_FILE)
    assert shards == [f"latents-train.array_record-{i:05d}-of-00003" for i in range(3)]
    for shard in shards:  # one record per group, stored uncompressed (SHARD_WRITER_OPTIONS)
        options = ArrayRecordReader(os.path.join(encoded, shard)).writer_options_string().split(",")
        assert "group_size:1" in options and "uncompressed" in options


def test_records_hold_the_vae_posterior_of_the_image_and_its_mirror(encoded, vae_dir):
    encode_exactly = jax.jit(functools.partial(posterior_moments, load_vae(vae_dir)))  # float32, not stored
    source = ShapesDataset(image_size=IMAGE_SIZE, num_images=NUM_IMAGES)
    latents = LatentDataset(data_dir=encoded, split="train", image_size=IMAGE_SIZE)
    assert len(latents) == NUM_IMAGES
    indices = [0, 9, 19]  # first shard, middle shard, the padded last batch
    images = np.stack([source[i]["image"] for i in indices]).astype(np.float32) / 127.5 - 1
    for view, pixels in (("moments", images), ("flipped_moments", images[:, :, ::-1])):
        exact = np.asarray(encode_exactly(pixels))
        stored = np.stack([latents[i][view] for i in indices])
        assert stored.dtype == np.float16 and stored.shape == (3, 8, 8, 8)  # the storage dtype
        # float16 keeps 11 significant bits: rounding error <= 2**-11 of each value (plus float32 encode noise).
        np.testing.assert_allclose(stored, exact, rtol=2 ** -11 + 1e-5, atol=1e-5)
        assert np.abs(exact).max() > 0.5 and np.abs(stored - exact).max() > 0  # real, rounded values
    assert [int(latents[i]["label"]) for i in indices] == [int(source[i]["label"]) for i in indices]


def test_read_batch_gives_the_records_stacked(encoded):
    latents = LatentDataset(data_dir=encoded, split="train", image_size=IMAGE_SIZE)
    indices = np.array([19, 0, 9, 8, 0, 16])  # across the three shards, unsorted, one twice
    batch = latents.read_batch(indices)
    assert set(batch) == {"moments", "flipped_moments", "label"} and batch["label"].dtype == np.int32
    for key, value in batch.items():
        np.testing.assert_array_equal(value, np.stack([latents[int(i)][key] for i in indices]))
    assert batch["moments"].dtype == np.float16 and batch["moments"].shape == (6, 8, 8, 8)
    for bad in (np.array([0, NUM_IMAGES]), np.array([-1]), np.zeros((2, 2), int)):
        with pytest.raises(IndexError, match=rf"record numbers in \[0, {NUM_IMAGES}\)"):
            latents.read_batch(bad)


def test_worker_processes_read_latents_with_readers_of_their_own(encoded):
    latents = LatentDataset(data_dir=encoded, split="train", image_size=IMAGE_SIZE)
    latents[0]  # opens a reader here: the workers get the dataset without it
    loader = make_loader(latents, global_batch_size=4, seed=0, random_flip=False, num_epochs=1, batch_reads=False,
                         worker_count=2)
    read = np.concatenate([batch["moments"] for batch in loader])
    stored = latents.read_batch(np.arange(NUM_IMAGES))["moments"]
    found = {j for m in read for j in range(NUM_IMAGES) if np.array_equal(m, stored[j])}
    assert len(found) == len(read) == 16  # distinct stored records; each worker drops its last 2 of 10


@pytest.mark.parametrize("batch_reads", [True, False], ids=["batches", "records"])
def test_loader_flips_latents_by_picking_the_stored_mirror(encoded, batch_reads):
    latents = create_dataset("latents", split="train", image_size=IMAGE_SIZE, data_dir=encoded)
    stored = [latents[i] for i in range(NUM_IMAGES)]

    def one_epoch(random_flip):
        loader = make_loader(latents, global_batch_size=4, seed=3, random_flip=random_flip, shuffle=False,
                             num_epochs=1, batch_reads=batch_reads)
        batches = list(loader)
        assert set(batches[0]) == {"moments", "label"} and batches[0]["moments"].shape == (4, 8, 8, 8)
        return np.concatenate([b["moments"] for b in batches])

    picks = [[np.array_equal(m, stored[i][view]) for view in ("moments", "flipped_moments")]
             for i, m in enumerate(one_epoch(random_flip=True))]
    assert all(any(pick) for pick in picks)
    flipped = [pick[1] for pick in picks]
    assert 0 < sum(flipped) < NUM_IMAGES
    again = [np.array_equal(m, stored[i]["flipped_moments"]) for i, m in enumerate(one_epoch(random_flip=True))]
    assert again == flipped  # seeded per record: the same stream position flips the same way
    unflipped = one_epoch(random_flip=False)
    np.testing.assert_array_equal(unflipped, np.stack([s["moments"] for s in stored]))


def test_interrupted_multi_host_encode_resumes_and_the_count_check_names_missing_shards(tmp_path, vae_dir, encoded):
    out = str(tmp_path)
    config = encode_config(vae_dir)
    shard = [os.path.join(out, f"latents-train.array_record-{i:05d}-of-00003") for i in range(3)]

    encode.encode_split(config, out, process_index=1, process_count=2)  # host 1 of 2 owns shard 1 only
    assert [os.path.exists(p) for p in shard] == [False, True, False]
    with pytest.raises(encode.EncodeError, match=r"2 of 3 shards missing \(shards 0, 2\)"):
        encode.finish(out)
    assert not read_metadata(out)[1]

    # Host 0 is interrupted: it writes one of its shards, and a half-written file remains of the other.
    encode.encode_split(encode_config(vae_dir, max_shards=1), out, process_index=0, process_count=2)
    with open(shard[2] + ".tmp", "wb") as f:
        f.write(b"partial")
    with pytest.raises(encode.EncodeError, match=r"1 of 3 shards missing \(shards 2\)"):
        encode.finish(out)
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(data_dir=out, split="train", image_size=IMAGE_SIZE)

    written = {p: os.stat(p).st_mtime_ns for p in shard[:2]}
    encode.encode_split(config, out, process_index=0, process_count=2)  # resumes: only shard 2 is encoded
    assert {p: os.stat(p).st_mtime_ns for p in shard[:2]} == written
    assert not os.path.exists(shard[2] + ".tmp")
    encode.finish(out)
    resumed = LatentDataset(data_dir=out, split="train", image_size=IMAGE_SIZE)
    straight = LatentDataset(data_dir=encoded, split="train", image_size=IMAGE_SIZE)
    for i in range(NUM_IMAGES):
        np.testing.assert_array_equal(resumed[i]["flipped_moments"], straight[i]["flipped_moments"])

    os.remove(shard[1])  # a lost shard is found by the count check and rewritten by a rerun
    with pytest.raises(encode.EncodeError, match=r"shards 1\)"):
        encode.finish(out)
    encode.run(config, out)
    assert os.path.exists(shard[1])


def test_damaged_shard_and_changed_config_are_refused(tmp_path, vae_dir):
    out = str(tmp_path)
    config = encode_config(vae_dir, max_shards=1)
    encode.encode_split(config, out, process_index=0, process_count=1)
    writer = ArrayRecordWriter(os.path.join(out, "latents-train.array_record-00000-of-00003"), "group_size:1")
    writer.write(b"one record")
    writer.close()
    with pytest.raises(encode.EncodeError, match="00000-of-00003 has 1 records, expected 8"):
        encode.encode_split(config, out, process_index=0, process_count=1)
    with pytest.raises(encode.EncodeError, match="another encode config.*dtype: 'float16' vs 'float32'"):
        encode.encode_split(encode_config(vae_dir, dtype="float32"), out, process_index=0, process_count=1)


CLI_CONFIG = """
from dig_jax.config_base import base_config


def get_config():
    c = base_config()
    c.data.name = "shapes"
    c.data.image_size = {image_size}
    c.data.kwargs = dict(num_images={num_images})
    c.encode.batch_size = {batch_size}
    c.encode.shard_size = {shard_size}
    return c
"""


def test_cli_reports_progress_and_fails_the_count_check_when_stopped_early(tmp_path, vae_dir):
    config_file = tmp_path / "encode_shapes.py"
    config_file.write_text(CLI_CONFIG.format(image_size=IMAGE_SIZE, num_images=NUM_IMAGES, batch_size=BATCH_SIZE,
                                             shard_size=SHARD_SIZE))
    out = tmp_path / "latents"
    result = subprocess.run(
        [sys.executable, "-m", "dig_jax.encode", "--config", str(config_file), "--out", str(out),
         f"--config.vae.path={vae_dir}", "--config.encode.max_shards=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "latents-train.array_record-00000-of-00003 written (host 0: 1/1)" in result.stdout
    assert "images/s" in result.stdout
    assert "error: latent dir" in result.stderr and "2 of 3 shards missing (shards 1-2)" in result.stderr
    assert "Rerun the same command" in result.stderr


@pytest.mark.parametrize("change,message", [
    (dict(batch_size=12), "config.encode.batch_size=12 must be a multiple of this host's 8 devices"),
    (dict(dtype="bfloat16"), "config.encode.dtype must be one of"),
    (dict(shard_size=0), "config.encode.shard_size must be >= 1"),
    (dict(name="imagenet2012", kwargs=dict(data_dir="")), r"config.data.kwargs.data_dir is empty.*docs/imagenet.md"),
    (dict(name="latents"), "config.data.name='latents' is already encoded"),
    (dict(path=""), "config.vae.path is empty"),
])
def test_bad_encode_configs_are_rejected_by_name(vae_dir, change, message):
    config = encode_config(vae_dir)
    for key, value in change.items():
        section = next(s for s in (config.encode, config.data, config.vae) if key in s)
        section[key] = value
    with pytest.raises(ValueError, match=message):
        encode.check_encode_config(config)
