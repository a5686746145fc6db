"""Pre-encoded latents on disk: VAE posterior moments stored as ArrayRecord shards, and `LatentDataset`, the
"latents" dataset that reads them (written by `python -m dig_jax.encode`).

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
import threading
import uuid

import numpy as np
from etils import epath

from dig_jax.vae import WEIGHTS_FILE

FORMAT = "dig_jax.latents/1"  # the format's name, recorded in every metadata.json: kept as is so old dirs read
# ArrayRecord options of the shards: one record per group (a random read decodes only the record asked for) and no
# compression. Float16 moments barely compress (ArrayRecord's default zstd saved 8% on random ones), and
# decompressing took a random record read from 36-39 to 62 us on a CPU, in the loader that feeds small models
# (docs/benchmarks.md, "Latent shards without compression"). Readers take either: the compression is in each
# shard's header.
SHARD_WRITER_OPTIONS = "group_size:1,uncompressed"
METADATA_FILE = "metadata.json"
STORAGE_DTYPES = ("float16", "float32")


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


def read_metadata(latent_dir: str | os.PathLike) -> tuple[LatentLayout, bool]:
    """(layout, complete) of a latent dir; LatentDataError when it has no readable metadata.json."""
    path = epath.Path(latent_dir) / METADATA_FILE
    if not path.exists():
        raise LatentDataError(f"{path} not found: {latent_dir} is not a latent dir. Write one with `python -m "
                              "dig_jax.encode --config configs/encode_in256.py --out DIR` (see docs/imagenet.md).")
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


def parse_records(layout: LatentLayout, records: list[bytes]) -> np.ndarray:
    """Records' bytes -> a structured array [n] of `layout.record_dtype` (fields "label" and "moments")."""
    sizes = set(map(len, records)) - {layout.record_dtype.itemsize}
    if sizes:
        raise LatentDataError(f"records of {sorted(sizes)} bytes, expected {layout.record_dtype.itemsize}: the shard "
                              "does not belong to this metadata.json")
    return np.frombuffer(b"".join(records), dtype=layout.record_dtype)


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
    """Random-access pre-encoded latents: `ds[i]` -> {"moments": [h, w, 2C], "label": int32 [], and, when the dir
    holds flipped views, "flipped_moments": [h, w, 2C]}, moments in the storage dtype (`layout.dtype`);
    `ds.read_batch(indices)` -> the same keys with a leading [b] axis, from one read per shard touched.

    The loader's `flip_and_scale` picks "flipped_moments" instead of "moments" when it flips a record (flipping a
    latent is not encoding a flipped image). Moments are [mean, logvar] along the channels
    (`DiagonalGaussian.from_moments`, which casts them to float32).
    """

    def __init__(self, *, data_dir: str, split: str = "train", image_size: int = 256):
        layout = read_complete_layout(data_dir)
        if layout.split != split:
            raise LatentDataError(f"{data_dir} holds split {layout.split!r}, but split {split!r} was requested "
                                  "(config.data.split)")
        if layout.image_size != image_size:
            raise LatentDataError(f"{data_dir} holds latents of {layout.image_size} px images, but image_size="
                                  f"{image_size} was requested (config.data.image_size)")
        self.layout = layout
        self._shard_paths = [os.fspath(epath.Path(data_dir) / layout.shard_name(shard))
                             for shard in range(layout.num_shards)]
        self._readers = {}  # shard -> its reader, opened on first read (a process reads only the shards it needs)
        self._open_lock = threading.Lock()

    def __getstate__(self):  # a loader's worker processes open readers of their own
        return {**self.__dict__, "_readers": {}, "_open_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _open_lock=threading.Lock())

    def __len__(self) -> int:
        return self.layout.num_records

    def __repr__(self) -> str:
        # No data_dir: a loader state saved on one machine must restore where the files live elsewhere.
        layout = self.layout
        return (f"LatentDataset(split={layout.split!r}, num_records={layout.num_records}, "
                f"latent_shape={layout.latent_shape}, dtype={layout.dtype!r}, flipped={layout.flipped}, "
                f"source={layout.source!r}, vae_sha256={layout.vae_sha256[:16]!r})")

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: value[0] for key, value in self.read_batch(np.array([index])).items()}

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Records `indices` (int [b]) as {"moments": [b, h, w, 2C], "flipped_moments"?, "label": int32 [b]}."""
        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or (indices.size and not 0 <= indices.min() <= indices.max() < len(self)):
            raise IndexError(f"indices must be a 1-D array of record numbers in [0, {len(self)}), got {indices!r}")
        shards, positions = np.divmod(indices, self.layout.shard_size)
        records = [b""] * len(indices)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            for row, record in zip(rows, self._reader(int(shard)).read(positions[rows].tolist()), strict=True):
                records[row] = record
        parsed = parse_records(self.layout, records)
        batch = {"moments": parsed["moments"][:, 0], "label": parsed["label"].astype(np.int32)}
        if self.layout.flipped:
            batch["flipped_moments"] = parsed["moments"][:, 1]
        return batch

    def _reader(self, shard: int):
        # Readers are thread-safe; the lock only keeps two threads from opening the same shard.
        if shard not in self._readers:
            with self._open_lock:
                if shard not in self._readers:
                    # Imported here: the format functions above also run where array_record is not installed,
                    # e.g. on accelerator images used only for benchmarks.
                    from array_record.python.array_record_module import ArrayRecordReader

                    # No read-ahead: reads are random, one record or a few per call.
                    self._readers[shard] = ArrayRecordReader(self._shard_paths[shard], "readahead_buffer_size:0")
        return self._readers[shard]
