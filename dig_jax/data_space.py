"""How the trainer gets x0, the variable it diffuses, from a batch (`DataSpace`), and the config checks that the
data, VAE and model can train together.

In latent space x0 = (posterior SAMPLE - shift_factor) * scaling_factor (SD VAEs: no shift, 0.18215), drawn anew at
every training step as the reference does, from moments that are either computed on the fly from the batch's images
("online") or were computed once by `python -m dig_jax.encode` ("pre-encoded", the "latents" dataset,
dig_jax.data.latents).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dig_jax.data.latents import read_complete_layout
from dig_jax.vae import WEIGHTS_FILE, AutoencoderKLConfig, DiagonalGaussian, load_vae, read_vae_config
from dig_jax.vae_programs import make_decoder, scale_latents

VAE_COMPUTE_DTYPES = ("float32", "bfloat16")
DATA_SPACES = ("pixel", "latent")
# Datasets whose kwargs must name a data dir, and where to read how to make one.
_DATA_DIR_DATASETS = ("imagenet2012", "latents")
_DOCS = "docs/imagenet.md"


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
