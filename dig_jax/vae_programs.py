"""The VAE's compiled programs: images -> posterior moments (the encode job's step) and x0 -> images (decoding
samples), and the scaling between VAE latents z and the diffused x0.

Programs are cached per VAE architecture and setting, so every VAE of one architecture reuses their compilation.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dig_jax.vae import AutoencoderKL


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
