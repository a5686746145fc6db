"""Datasets and the per-host input pipeline.

Typical use in a trainer:

    source = create_dataset("shapes", split="train", image_size=32)          # or "imagenet2012", data_dir=...
    loader = make_loader(source, global_batch_size=256, seed=0, random_flip=True, worker_count=0)
    batch = next(loader)   # {"image": float32 [256 // process_count, H, W, 3] in [-1, 1], "label": int32 [b]}
    batch = to_global_batch(batch, NamedSharding(mesh, P("data")))           # global jax.Arrays
    state = loader.get_state()   # bytes, one per host; loader.set_state(state) resumes at the same batch

Sources are random access: `len(source)`, `source[i]` -> {"image": uint8 [H, W, 3], "label": int32}, plus
`num_classes` and `class_names` (image datasets).

- "shapes" (`ShapesDataset`): procedurally generated coloured shapes, 12 classes, any image size, no files.
  Options: num_images (default 50,000), seed.
- "imagenet2012" (`imagenet.ImageNet2012`): TFDS-prepared ArrayRecord files read without TensorFlow, ADM
  center crop. Options: data_dir (required). Check a data dir with
  `python -m dig_jax.data.imagenet --data_dir DIR --dry_run`.
- "latents" (`latents.LatentDataset`): VAE posterior moments written by `python -m dig_jax.encode`;
  `source[i]` -> {"moments": [h, w, 2C], "flipped_moments" (when encoded with flips), "label"}, moments in the
  storage dtype (float16 by default; the train step casts them), and `source.read_batch(indices)` the same with a
  leading [b] axis, which the loader reads a batch at a time (make_loader's batch_reads). The loader yields
  {"moments": [b, h, w, 2C], "label"}. Options: data_dir (required).
"""

from __future__ import annotations

from typing import Any

from dig_jax.data.loader import Loader, RandomAccessSource, make_loader, to_global_batch
from dig_jax.data.shapes import ShapesDataset


def _imagenet2012(**kwargs: Any) -> RandomAccessSource:
    # Imported on demand: tensorflow_datasets takes about a second to import.
    from dig_jax.data.imagenet import ImageNet2012

    return ImageNet2012(**kwargs)


def _latents(**kwargs: Any) -> RandomAccessSource:
    # Imported on demand: dig_jax.data.latents imports the VAE and flax.
    from dig_jax.data.latents import LatentDataset

    return LatentDataset(**kwargs)


DATASETS = {
    "shapes": ShapesDataset,
    "imagenet2012": _imagenet2012,
    "latents": _latents,
}


def create_dataset(name: str, *, split: str, image_size: int, **kwargs: Any) -> RandomAccessSource:
    """Builds the random-access source registered as `name` (see `DATASETS`); kwargs go to its constructor."""
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](split=split, image_size=image_size, **kwargs)


__all__ = ["DATASETS", "Loader", "ShapesDataset", "create_dataset", "make_loader", "to_global_batch"]
