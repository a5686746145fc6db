"""Encodes a dataset split with a VAE into the sharded latent dir that the "latents" dataset reads
(format: dig_jax.data.latents).

    python -m dig_jax.encode --config configs/encode_in256.py --out LATENT_DIR \
        --config.data.kwargs.data_dir=$TFDS_DATA_DIR --config.vae.path=$VAE_DIR

Resumable: metadata.json (complete: false) is written first; shard i is written under a temporary name and renamed
when complete, so a rerun of the same command skips the shards that exist (after checking their record count) and
rewrites the others. A rerun with another data, VAE or encode config is refused: it would mix latents.

Multi-host: run the same command on every host (processes are found as the trainer finds them: config.distributed,
SLURM, Cloud TPU; see dig_jax.distributed). Host p writes the shards i with i % process_count == p, on its own
devices. When all hosts are done, host 0 checks that every shard is present with its record count and that the total
equals the split size, then marks metadata.json complete: true. The trainer reads only complete dirs.
"""

import sys
import time

import grain
import jax
import numpy as np
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict, config_flags

from dig_jax import distributed
from dig_jax.config_cli import parse_config_flags
from dig_jax.data import create_dataset
from dig_jax.data.latents import (
    METADATA_FILE,
    SHARD_WRITER_OPTIONS,
    STORAGE_DTYPES,
    LatentLayout,
    read_metadata,
    serialize_records,
    vae_sha256,
    write_metadata,
)
from dig_jax.data_space import check_data_dir, check_vae_compute_dtype
from dig_jax.vae import diffusers_config, load_vae
from dig_jax.vae_programs import make_encode_fn


class EncodeError(RuntimeError):
    """The encode job cannot go on or did not produce a complete latent dir; the message says what to do."""


def check_encode_config(config: ConfigDict) -> None:
    e = config.encode
    for key in ("batch_size", "shard_size", "read_threads"):
        if e[key] < 1:
            raise ValueError(f"config.encode.{key} must be >= 1, got {e[key]}")
    if e.max_shards < 0:
        raise ValueError(f"config.encode.max_shards must be >= 0 (0: all), got {e.max_shards}")
    if e.dtype not in STORAGE_DTYPES:
        raise ValueError(f"config.encode.dtype must be one of {STORAGE_DTYPES}, got {e.dtype!r}")
    if e.batch_size % jax.local_device_count():
        raise ValueError(f"config.encode.batch_size={e.batch_size} must be a multiple of this host's "
                         f"{jax.local_device_count()} devices")
    check_vae_compute_dtype(config)
    if not config.vae.path:
        raise ValueError("config.vae.path is empty: set it to a diffusers AutoencoderKL folder (docs/imagenet.md)")
    if config.data.name == "latents":
        raise ValueError("config.data.name='latents' is already encoded: name an image dataset (e.g. imagenet2012)")
    check_data_dir(config)


def plan_layout(config: ConfigDict, source, vae) -> LatentLayout:
    """The latent dir that encoding `source` with `vae` under `config` produces."""
    d = config.data
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if d.image_size % factor:
        raise ValueError(f"config.data.image_size={d.image_size} must be a multiple of the VAE's downsampling {factor}")
    side = d.image_size // factor
    return LatentLayout(
        split=d.split, num_records=len(source), shard_size=config.encode.shard_size, image_size=d.image_size,
        latent_shape=(side, side, vae.config.latent_channels), dtype=config.encode.dtype, flipped=config.encode.flip,
        scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor, source=repr(source),
        vae_config=diffusers_config(vae.config), vae_sha256=vae_sha256(config.vae.path))


def prepare_out_dir(out_dir: epath.Path, layout: LatentLayout) -> None:
    """Creates `out_dir` with an incomplete metadata.json, or checks that an existing one plans the same latents.

    Every host may write it: all write the same bytes, each through its own temporary file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / METADATA_FILE).exists():
        existing, _ = read_metadata(out_dir)
        differences = existing.differences(layout)
        if differences:
            raise EncodeError(f"{out_dir} holds latents of another encode config ({'; '.join(differences)}). "
                              "Use a new --out, or the original config to resume.")
    else:
        write_metadata(out_dir, layout, complete=False)


def shard_record_count(path: epath.Path) -> int | None:
    """Records in a finished shard file; None when it does not exist."""
    if not path.exists():
        return None
    reader = ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def _image_batches(source, indices: range, batch_size: int, read_threads: int):
    """(uint8 images [batch_size, H, W, 3], labels [n]) of source[indices], in order; the last batch is padded with
    copies of its last image to batch_size (one compiled shape). Images are read ahead by `read_threads` threads."""
    dataset = grain.MapDataset.source(source)[indices.start:indices.stop]
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
    for batch in dataset.to_iter_dataset(options).batch(batch_size):
        images, labels = batch["image"], batch["label"]
        padding = batch_size - len(labels)
        if padding:
            images = np.concatenate([images, np.repeat(images[-1:], padding, axis=0)])
        yield images, labels


def encode_shard(layout: LatentLayout, source, encode_fn, path: epath.Path, indices: range, *, batch_size: int,
                 read_threads: int) -> None:
    """Writes the records of source[indices] to `path` (through a temporary file renamed at the end)."""
    temporary = path.parent / f"{path.name}.tmp"  # a leftover from an interrupted run is overwritten
    writer = ArrayRecordWriter(str(temporary), SHARD_WRITER_OPTIONS)
    try:
        pending = None  # the previous batch: written while the device encodes the next one
        for images, labels in _image_batches(source, indices, batch_size, read_threads):
            moments = encode_fn(images)
            if pending is not None:
                _write_records(writer, layout, *pending)
            pending = moments, labels
        if pending is not None:
            _write_records(writer, layout, *pending)
    finally:
        writer.close()
    written = shard_record_count(temporary)
    if written != len(indices):
        raise EncodeError(f"{temporary} has {written} records, expected {len(indices)}")
    temporary.replace(path)


def _write_records(writer, layout: LatentLayout, moments: jax.Array, labels: np.ndarray) -> None:
    for record in serialize_records(layout, np.asarray(moments)[:len(labels)], labels):
        writer.write(record)


def encode_split(config: ConfigDict, out_dir: str, *, process_index: int, process_count: int) -> LatentLayout:
    """Encodes this host's unfinished shards of config.data's split into `out_dir` (at most config.encode.max_shards
    of them when > 0); prints a progress line per shard. Returns the layout."""
    check_encode_config(config)
    d, e = config.data, config.encode
    source = create_dataset(d.name, split=d.split, image_size=d.image_size, **d.kwargs.to_dict())
    vae = load_vae(config.vae.path, dtype=config.vae.compute_dtype)
    layout = plan_layout(config, source, vae)
    out = epath.Path(out_dir)
    prepare_out_dir(out, layout)

    mine = [shard for shard in range(layout.num_shards) if shard % process_count == process_index]
    unfinished = []
    for shard in mine:
        count = shard_record_count(out / layout.shard_name(shard))
        if count is None:
            unfinished.append(shard)
        elif count != len(layout.shard_range(shard)):
            raise EncodeError(f"{out / layout.shard_name(shard)} has {count} records, expected "
                              f"{len(layout.shard_range(shard))}: it is damaged. Delete it and rerun to rewrite it.")
    todo = unfinished[:e.max_shards] if e.max_shards else unfinished
    print(f"host {process_index}/{process_count}: {len(mine)} of the {layout.num_shards} shards, "
          f"{len(mine) - len(unfinished)} already written, {len(todo)} to encode now", flush=True)
    if not todo:
        return layout

    encode_fn = make_encode_fn(vae, flip=e.flip, dtype=e.dtype)
    started, encoded = time.perf_counter(), 0
    for done, shard in enumerate(todo, start=1):
        shard_started = time.perf_counter()
        indices = layout.shard_range(shard)
        encode_shard(layout, source, encode_fn, out / layout.shard_name(shard), indices, batch_size=e.batch_size,
                     read_threads=e.read_threads)
        encoded += len(indices)
        now = time.perf_counter()
        rate = encoded / (now - started)
        remaining = sum(len(layout.shard_range(s)) for s in todo[done:])
        print(f"{layout.shard_name(shard)} written (host {process_index}: {done}/{len(todo)}): "
              f"{len(indices) / (now - shard_started):.1f} images/s, average {rate:.1f} images/s, "
              f"{remaining / rate / 60:.1f} min left", flush=True)
    return layout


def finish(out_dir: str) -> LatentLayout:
    """The final count check: every shard present with its record count and the total equal to the split size.

    Marks metadata.json complete when it passes; raises EncodeError naming the missing or damaged shards otherwise.
    """
    out = epath.Path(out_dir)
    layout, _ = read_metadata(out)
    missing, wrong, total = [], [], 0
    for shard in range(layout.num_shards):
        count = shard_record_count(out / layout.shard_name(shard))
        expected = len(layout.shard_range(shard))
        if count is None:
            missing.append(shard)
        elif count != expected:
            wrong.append(f"{layout.shard_name(shard)} ({count} records, expected {expected})")
        else:
            total += count
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of {layout.num_shards} shards missing (shards {_ranges(missing)})")
        if wrong:
            problems.append(f"wrong record counts: {', '.join(wrong)}")
        raise EncodeError(f"latent dir {out} is incomplete: {'; '.join(problems)}. Rerun the same command to encode "
                          "what is missing (delete damaged shards first).")
    if total != layout.num_records:
        raise EncodeError(f"latent dir {out} holds {total} records, but the split has {layout.num_records}")
    write_metadata(out, layout, complete=True)
    return layout


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    spans = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def run(config: ConfigDict, out_dir: str) -> LatentLayout | None:
    """Encodes this host's shards, waits for every host, and (on host 0) runs the final count check."""
    distributed.initialize(config)  # multi-host: as the trainer, from config.distributed and the environment
    process_index, process_count = jax.process_index(), jax.process_count()
    encode_split(config, out_dir, process_index=process_index, process_count=process_count)
    if process_count > 1:
        multihost_utils.sync_global_devices("dig_jax.encode: all shards written")
    if process_index != 0:
        return None
    layout = finish(out_dir)
    size_gb = layout.num_records * layout.record_dtype.itemsize / 1e9
    print(f"Complete: {layout.num_records} records of {layout.moments_shape} {layout.dtype} moments in "
          f"{layout.num_shards} shards ({size_gb:.2f} GB) in {out_dir}", flush=True)
    return layout


def main(argv):
    del argv
    try:
        run(_CONFIG.value, _OUT.value)
    except (EncodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Defined here, not at import: dig_jax.train defines a --config flag too, and both modules are imported together.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Encode config file (configs/encode_in256.py).")
    _OUT = flags.DEFINE_string("out", None, "Latent dir to write (or to resume). Local path or gs://.")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main, flags_parser=parse_config_flags)
