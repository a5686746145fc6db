"""Latent space: VAE posterior moments stored as ArrayRecord shards, the "latents" dataset that reads them, and how
the trainer gets x0 (the variable it diffuses) from a batch.

In latent space x0 = (posterior SAMPLE - shift_factor) * scaling_factor (SD VAEs: no shift, 0.18215), drawn anew at
every training step as the reference does, from moments that are either computed on the fly from the batch's images
("online") or were computed once by `python -m dig_jax.encode` ("pre-encoded", the "latents" dataset).

Latent dir (one split):
  metadata.json                                    `LatentLayout` as JSON plus "complete" (written atomically)
  latents-<split>.array_record-<i:05d>-of-<n:05d>  shard i: examples [i * shard_size, (i + 1) * shard_size)
Record j holds example j of the source split, as the bytes of one `LatentLayout.record_dtype` element (no pickle):
  label    int32, little-endian
  moments  float16 or float32, little-endian, [views, h, w, 2 * C]: channels are [mean (C), logvar (C)] with logvar
           clamped to [-30, 20]; view 0 is the image's posterior, view 1 (when `flipped`) its horizontal mirror's.

Storage dtype: float16 (the default) halves the disk (ImageNet 256 with flipped views: 42 GB instead of 84 GB). It
keeps 11 significant bits, a relative rounding error <= 2**-11 = 4.9e-4 per value: for scaled latents (std ~1) well
below the smallest noise the model sees (std sqrt(beta_0) = 0.01 at t = 0). float32 stores the encoder output as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dig_jax.vae import WEIGHTS_FILE, AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, load_vae, read_vae_config

FORMAT = "dig_jax.latents/1"
METADATA_FILE = "metadata.json"
STORAGE_DTYPES = ("float16", "float32")
VAE_COMPUTE_DTYPES = ("float32", "bfloat16")
DATA_SPACES = ("pixel", "latent")
# Datasets whose kwargs must name a data dir, and where to read how to make one.
_DATA_DIR_DATASETS = ("imagenet2012", "latents")
_DOCS = "docs/imagenet.md"


class LatentDataError(ValueError):
    """A latent dir cannot be read or does not fit the config; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class LatentLayout:
    """What a latent dir holds: its shards, record format and provenance (metadata.json without "complete")."""

    split: str
    num_records: int
    shard_size: int
    image_size: int
    latent_shape: tuple[int, int, int]  # (h, w, C) of one posterior sample
    dtype: str  # storage dtype of the moments, one of STORAGE_DTYPES
    flipped: bool  # records also hold the moments of the horizontally flipped image
    scaling_factor: float
    shift_factor: float | None
    source: str  # repr() of the encoded dataset, e.g. ImageNet2012(version='5.1.0', split='train', ...)
    vae_config: dict  # the VAE's diffusers config.json
    vae_sha256: str  # of its diffusion_pytorch_model.safetensors
    format: str = FORMAT

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(self.latent_shape))
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.num_records < 1 or self.shard_size < 1:
            raise ValueError(f"num_records and shard_size must be >= 1, got {self.num_records}, {self.shard_size}")

    @property
    def views(self) -> int:
        return 2 if self.flipped else 1

    @property
    def moments_shape(self) -> tuple[int, int, int, int]:
        """[views, h, w, 2C] of one record's moments."""
        height, width, channels = self.latent_shape
        return self.views, height, width, 2 * channels

    @property
    def record_dtype(self) -> np.dtype:
        """One record: int32 label, then the moments; packed, little-endian."""
        moments_dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.dtype([("label", "<i4"), ("moments", moments_dtype, self.moments_shape)])

    @property
    def num_shards(self) -> int:
        return -(-self.num_records // self.shard_size)

    def shard_name(self, shard: int) -> str:
        return f"latents-{self.split}.array_record-{shard:05d}-of-{self.num_shards:05d}"

    def shard_range(self, shard: int) -> range:
        """Indices of the source examples that shard `shard` holds, in order."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_records))

    def to_json(self, *, complete: bool) -> str:
        fields = dataclasses.asdict(self)
        return json.dumps({**fields, "complete": complete, "record_bytes": self.record_dtype.itemsize}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> tuple[LatentLayout, bool]:
        """(layout, complete) from metadata.json's text."""
        fields = json.loads(text)
        if fields.get("format") != FORMAT:
            raise LatentDataError(f"metadata format {fields.get('format')!r} is not {FORMAT!r}")
        complete = fields.pop("complete")
        fields.pop("record_bytes")
        return cls(**fields), complete

    def differences(self, other: LatentLayout) -> list[str]:
        """Names and values of the fields where `other` differs from this layout."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# ----------------------------------------------------------------------------------------------------------------
# Metadata and records.


def read_metadata(latent_dir: str | os.PathLike) -> tuple[LatentLayout, bool]:
    """(layout, complete) of a latent dir; LatentDataError when it has no readable metadata.json."""
    path = epath.Path(latent_dir) / METADATA_FILE
    if not path.exists():
        raise LatentDataError(f"{path} not found: {latent_dir} is not a latent dir. Write one with "
                              f"`python -m dig_jax.encode --config configs/encode_in256.py --out DIR` (see {_DOCS}).")
    try:
        return LatentLayout.from_json(path.read_text())
    except (KeyError, TypeError, ValueError) as error:
        raise LatentDataError(f"{path} cannot be read as latent metadata ({error}): re-encode into a new dir "
                              f"with `python -m dig_jax.encode`.") from error


def read_complete_layout(latent_dir: str | os.PathLike) -> LatentLayout:
    """The layout of a latent dir whose encoding finished (all shards counted); LatentDataError otherwise."""
    layout, complete = read_metadata(latent_dir)
    if not complete:
        raise LatentDataError(
            f"latent dir {latent_dir} is incomplete: its encode job did not finish or its final count check "
            f"failed. Rerun the same `python -m dig_jax.encode ... --out {latent_dir}` command to finish it.")
    return layout


def write_metadata(latent_dir: str | os.PathLike, layout: LatentLayout, *, complete: bool) -> None:
    """Writes metadata.json under a temporary name, then renames it (readers never see a partial file)."""
    final = epath.Path(latent_dir) / METADATA_FILE
    temporary = final.parent / f".tmp-{uuid.uuid4().hex}-{METADATA_FILE}"
    temporary.write_text(layout.to_json(complete=complete))
    temporary.replace(final)


def serialize_records(layout: LatentLayout, moments: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """moments [n, views, h, w, 2C] (any float dtype), labels [n] -> n records in `layout.record_dtype`."""
    records = np.empty(len(labels), layout.record_dtype)
    records["label"] = labels
    records["moments"] = moments
    return [record.tobytes() for record in records]


def parse_record(layout: LatentLayout, record: bytes) -> tuple[np.ndarray, int]:
    """One record's bytes -> (moments [views, h, w, 2C] in the storage dtype, label)."""
    if len(record) != layout.record_dtype.itemsize:
        raise LatentDataError(f"a record has {len(record)} bytes, expected {layout.record_dtype.itemsize}: the shard "
                              "does not belong to this metadata.json")
    parsed = np.frombuffer(record, dtype=layout.record_dtype)[0]
    return parsed["moments"], int(parsed["label"])


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def vae_sha256(vae_folder: str | os.PathLike) -> str:
    """Fingerprint of a VAE folder's weights: ties a latent dir to the exact VAE that encoded it."""
    return file_sha256(epath.Path(vae_folder) / WEIGHTS_FILE)


class LatentDataset:
    """Random-access pre-encoded latents: `ds[i]` -> {"moments": float32 [h, w, 2C], "label": int32 [], and, when
    the dir holds flipped views, "flipped_moments": float32 [h, w, 2C]}.

    The loader's FlipAndScale picks "flipped_moments" instead of "moments" when it flips a record (flipping a latent
    is not encoding a flipped image). Moments are [mean, logvar] along the channels (`DiagonalGaussian.from_moments`).
    """

    def __init__(self, *, data_dir: str, split: str = "train", image_size: int = 256):
        # Imported here: the rest of this module (the encode and x0 functions) also runs where array_record is not
        # installed, e.g. on accelerator images used only for benchmarks.
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        layout = read_complete_layout(data_dir)
        if layout.split != split:
            raise LatentDataError(f"{data_dir} holds split {layout.split!r}, but split {split!r} was requested "
                                  "(config.data.split)")
        if layout.image_size != image_size:
            raise LatentDataError(f"{data_dir} holds latents of {layout.image_size} px images, but image_size="
                                  f"{image_size} was requested (config.data.image_size)")
        self.layout = layout
        root = epath.Path(data_dir)
        # "path[start:stop]" tells the source each shard's record count, so no shard is opened before it is read.
        self._records = ArrayRecordDataSource([
            f"{root / layout.shard_name(shard)}[0:{len(layout.shard_range(shard))}]"
            for shard in range(layout.num_shards)])

    def __len__(self) -> int:
        return self.layout.num_records

    def __repr__(self) -> str:
        # No data_dir: a loader state saved on one machine must restore where the files live elsewhere.
        layout = self.layout
        return (f"LatentDataset(split={layout.split!r}, num_records={layout.num_records}, "
                f"latent_shape={layout.latent_shape}, dtype={layout.dtype!r}, flipped={layout.flipped}, "
                f"source={layout.source!r}, vae_sha256={layout.vae_sha256[:16]!r})")

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        moments, label = parse_record(self.layout, self._records[int(index)])
        element = {"moments": moments[0].astype(np.float32), "label": np.int32(label)}
        if self.layout.flipped:
            element["flipped_moments"] = moments[1].astype(np.float32)
        return element


# ----------------------------------------------------------------------------------------------------------------
# Encoding and scaling.


def posterior_moments(vae: AutoencoderKL, images: jax.Array) -> jax.Array:
    """images [N, H, W, 3] in [-1, 1] -> float32 [N, h, w, 2C]: [mean, clamped logvar] of q(z | image)."""
    posterior = vae.encode(images)
    return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)


_PROGRAMS: list[tuple[tuple, Callable]] = []


def _cached_program(key: tuple, build: Callable[[], Callable]) -> Callable:
    """`build()` once per distinct `key` in this process, so VAEs of one architecture share their compiled programs
    (every encode of a resumed or multi-split job, every test). Keys are compared by value: nnx GraphDefs are not
    hashable, so this is a list, not a dict; it holds one entry per architecture and setting."""
    for cached_key, program in _PROGRAMS:
        if cached_key == key:
            return program
    program = build()
    _PROGRAMS.append((key, program))
    return program


def _encode_program(graphdef, flip: bool, dtype: str) -> Callable:
    def build():
        @jax.jit
        def encode(params, images):
            model = nnx.merge(graphdef, params)
            pixels = images.astype(jnp.float32) / 127.5 - 1.0
            views = [pixels, pixels[:, :, ::-1]] if flip else [pixels]
            return jnp.stack([posterior_moments(model, view) for view in views], axis=1).astype(dtype)

        return encode

    return _cached_program(("encode", graphdef, flip, dtype), build)


def make_encode_fn(vae: AutoencoderKL, *, flip: bool, dtype: str, devices=None) -> Callable[[np.ndarray], jax.Array]:
    """The encode job's jitted step: uint8 images [B, H, W, 3] -> moments [B, views, h, w, 2C] in `dtype`.

    Pixels are scaled to [-1, 1] as the loader does; view 1 (with `flip`) encodes the horizontal mirror. The batch
    is split over `devices` (default: this process's devices, so every host encodes on its own); B must be a
    multiple of their count. Parameters are replicated on them once, and passed as arguments, not constants.
    """
    devices = jax.local_devices() if devices is None else devices
    mesh = Mesh(np.asarray(devices), ("batch",))
    graphdef, params = nnx.split(vae)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    batch_sharding = NamedSharding(mesh, P("batch"))
    encode = _encode_program(graphdef, flip, dtype)

    def encode_batch(images: np.ndarray) -> jax.Array:
        if images.shape[0] % len(devices):
            raise ValueError(f"batch of {images.shape[0]} images must be a multiple of the {len(devices)} devices")
        return encode(params, jax.device_put(images, batch_sharding))

    return encode_batch


def scale_latents(z: jax.Array, scaling_factor: float, shift_factor: float | None) -> jax.Array:
    """VAE latent z -> the diffused x0: (z - shift) * scale (diffusers' convention; SD VAEs have no shift)."""
    return (z - (shift_factor or 0.0)) * scaling_factor


def unscale_latents(x0: jax.Array, scaling_factor: float, shift_factor: float | None) -> jax.Array:
    """Inverse of `scale_latents`: what `vae.decode` takes."""
    return x0 / scaling_factor + (shift_factor or 0.0)


# ----------------------------------------------------------------------------------------------------------------
# The trainer's view: config checks and x0 per data space.


@dataclasses.dataclass(frozen=True)
class DataSpace:
    """How training turns a batch into x0 and how generated x0 becomes images.

    to_x0(frozen, batch, key) -> float32 [B, h, w, C]: traced inside the train step. `frozen` is the pytree of
      constants it reads (the VAE's parameters when encoding online, else empty); the step takes it as an argument
      so that it is neither embedded in the compiled program, trained, nor checkpointed.
    decode: x0 [N, h, w, C] -> numpy float32 images [N, H, W, 3] in about [-1, 1]; None when there is no VAE (pixel
      space, or pre-encoded latents without config.vae.path).
    """

    to_x0: Callable[[Any, dict, jax.Array], jax.Array]
    frozen: Any
    decode: Callable[[jax.Array], np.ndarray] | None


def _pixels_x0(frozen, batch, key):
    del frozen, key
    return batch["image"]


def _replicated(tree, mesh: Mesh):
    """Copies host-identical arrays onto every device of `mesh` (works across hosts, unlike device_put)."""
    sharding = NamedSharding(mesh, P())

    def replicate(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(replicate, tree)


def _decode_program(graphdef, scaling_factor: float, shift_factor: float | None) -> Callable:
    def build():
        @jax.jit
        def decode(params, x0):
            return nnx.merge(graphdef, params).decode(unscale_latents(x0, scaling_factor, shift_factor))

        return decode

    return _cached_program(("decode", graphdef, scaling_factor, shift_factor), build)


def make_decoder(vae: AutoencoderKL, chunk_size: int = 16) -> Callable[[jax.Array], np.ndarray]:
    """x0 [N, h, w, C] -> float32 images [N, H, W, 3], decoded `chunk_size` at a time (bounded memory, one compile)."""
    graphdef, params = nnx.split(vae)
    decode_chunk = _decode_program(graphdef, vae.scaling_factor, vae.shift_factor)

    def decode(x0) -> np.ndarray:
        x0 = np.asarray(x0, np.float32)
        chunks = []
        for start in range(0, len(x0), chunk_size):
            chunk = x0[start:start + chunk_size]
            padded = np.concatenate([chunk, np.zeros((chunk_size - len(chunk), *chunk.shape[1:]), np.float32)])
            chunks.append(np.asarray(decode_chunk(params, padded))[:len(chunk)])
        return np.concatenate(chunks)

    return decode


def data_space(config, mesh: Mesh) -> DataSpace:
    """The DataSpace a (validated, see `check_data_space`) training config describes.

    pixel: x0 = batch["image"]. Latent, online (config.data.name is an image dataset): x0 = scaled sample of
    vae.encode(batch["image"]). Latent, pre-encoded (config.data.name == "latents"): x0 = scaled (mean + std * eps)
    of batch["moments"], with the scaling factor the latents were encoded with.
    """
    if config.data.space == "pixel":
        return DataSpace(to_x0=_pixels_x0, frozen={}, decode=None)
    vae = load_vae(config.vae.path, dtype=config.vae.compute_dtype) if config.vae.path else None
    decode = make_decoder(vae) if vae is not None else None
    if config.data.name == "latents":
        layout = read_complete_layout(config.data.kwargs.data_dir)

        def moments_x0(frozen, batch, key):
            del frozen
            z = DiagonalGaussian.from_moments(batch["moments"]).sample(key)
            return scale_latents(z, layout.scaling_factor, layout.shift_factor)

        return DataSpace(to_x0=moments_x0, frozen={}, decode=decode)

    graphdef, params = nnx.split(vae)

    def encoded_x0(frozen, batch, key):
        encoder = nnx.merge(graphdef, frozen)
        return scale_latents(encoder.encode(batch["image"]).sample(key), vae.scaling_factor, vae.shift_factor)

    return DataSpace(to_x0=encoded_x0, frozen=_replicated(params, mesh), decode=decode)


def _readable_vae_config(path: str) -> AutoencoderKLConfig:
    if not path:
        raise ValueError(
            "config.vae.path is empty: latent-space training on images encodes them online and needs a diffusers "
            "AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema), or pre-encoded latents: config.data.name="
            f"'latents' with config.data.kwargs.data_dir=<dir written by dig_jax.encode>. See {_DOCS}.")
    try:
        vae_config = read_vae_config(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"config.vae.path={path!r}: {error}. See {_DOCS}.") from error
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise ValueError(f"config.vae.path={path!r} has no {WEIGHTS_FILE}. See {_DOCS}.")
    return vae_config


def check_data_dir(config) -> None:
    """config.data.kwargs.data_dir is set, and exists when local, for datasets that read files."""
    d = config.data
    if d.name not in _DATA_DIR_DATASETS:
        return
    data_dir = d.kwargs.get("data_dir", "")
    what = "a latent dir written by `python -m dig_jax.encode`" if d.name == "latents" else \
        "the TFDS data dir that holds imagenet2012/ (array_record)"
    if not data_dir:
        raise ValueError(f"config.data.kwargs.data_dir is empty: config.data.name={d.name!r} needs {what}. "
                         f"See {_DOCS} (linked from the README).")
    if "://" not in data_dir and not os.path.isdir(data_dir):
        raise ValueError(f"config.data.kwargs.data_dir={data_dir!r} does not exist: config.data.name={d.name!r} "
                         f"needs {what}. See {_DOCS} (linked from the README).")


def _check_pre_encoded(config, vae_config: AutoencoderKLConfig | None) -> None:
    d, m = config.data, config.model
    layout = read_complete_layout(d.kwargs.data_dir)
    for key, wanted, found in (("config.data.split", d.split, layout.split),
                               ("config.data.image_size", d.image_size, layout.image_size)):
        if wanted != found:
            raise ValueError(f"{key}={wanted!r}, but the latents in {d.kwargs.data_dir} are of {found!r}")
    height, width, channels = layout.latent_shape
    if (m.input_size, m.input_size, m.in_channels) != (height, width, channels):
        raise ValueError(f"config.model.input_size={m.input_size} and config.model.in_channels={m.in_channels} must "
                         f"match the latents' shape {layout.latent_shape} (h, w, C) in {d.kwargs.data_dir}")
    if d.random_flip and not layout.flipped:
        raise ValueError(f"config.data.random_flip=True, but {d.kwargs.data_dir} holds no flipped views: re-encode "
                         "with config.encode.flip=True, or set config.data.random_flip=False")
    if vae_config is not None and (vae_config.scaling_factor, vae_config.shift_factor) != (
            layout.scaling_factor, layout.shift_factor):
        raise ValueError(f"config.vae.path's scaling/shift factors ({vae_config.scaling_factor}, "
                         f"{vae_config.shift_factor}) differ from the encoding VAE's ({layout.scaling_factor}, "
                         f"{layout.shift_factor}) recorded in {d.kwargs.data_dir}")


def _check_online(config, vae_config: AutoencoderKLConfig) -> None:
    d, m = config.data, config.model
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    if d.image_size % factor or d.image_size // factor != m.input_size:
        raise ValueError(f"config.data.image_size={d.image_size} / {factor} (the VAE's downsampling) must equal "
                         f"config.model.input_size={m.input_size}")
    if m.in_channels != vae_config.latent_channels:
        raise ValueError(f"config.model.in_channels={m.in_channels} must equal the VAE's latent_channels="
                         f"{vae_config.latent_channels}")


def check_vae_compute_dtype(config) -> None:
    if config.vae.compute_dtype not in VAE_COMPUTE_DTYPES:
        raise ValueError(f"config.vae.compute_dtype must be one of {VAE_COMPUTE_DTYPES}, got "
                         f"{config.vae.compute_dtype!r}")


def check_data_space(config) -> None:
    """Raises ValueError, naming the config key, when config.data, config.vae and config.model cannot train together.

    Reads only small files (metadata.json, the VAE's config.json); loads no weights and no data.
    """
    d, m = config.data, config.model
    if d.space not in DATA_SPACES:
        raise ValueError(f"config.data.space must be one of {DATA_SPACES}, got {d.space!r}")
    check_data_dir(config)
    if d.space == "pixel":
        if d.name == "latents":
            raise ValueError("config.data.name='latents' holds VAE latents: set config.data.space='latent'")
        if d.image_size != m.input_size:
            raise ValueError(f"config.data.image_size={d.image_size} must equal config.model.input_size="
                             f"{m.input_size} for pixel-space training")
        return
    check_vae_compute_dtype(config)
    if d.name == "latents":
        vae_config = _readable_vae_config(config.vae.path) if config.vae.path else None
        if vae_config is None and config.sample.per_class:
            raise ValueError("config.sample.per_class > 0 decodes samples with the VAE: set config.vae.path, or "
                             "config.sample.per_class=0")
        _check_pre_encoded(config, vae_config)
    else:
        _check_online(config, _readable_vae_config(config.vae.path))
