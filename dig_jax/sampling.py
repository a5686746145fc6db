"""Class-conditional sampling with a trained model: DDPM or DDIM, optional classifier-free guidance."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.diffusion import cfg_model_fn, create_diffusion

SAMPLERS = ("ddpm", "ddim")


def generate(model: nnx.Module, labels, key, *, num_steps: int = 250, sampler: str = "ddpm", cfg_scale: float = 1.0,
             guided_channels: int | None = 3, eta: float = 0.0, clip_denoised: bool = False, decode=None):
    """Samples one image per label.

    Args:
      model: a DiG/DiT (its config gives the latent shape and the null class = num_classes).
      labels: int [N] class indices.
      key: PRNG key; the same key and labels give the same samples.
      num_steps: respaced diffusion steps (ADM semantics: "250" keeps t = round(i * 999 / 249)).
      sampler: "ddpm" (ancestral) or "ddim" (eta 0 = deterministic).
      cfg_scale: classifier-free guidance scale; 1.0 disables guidance (and the doubled batch).
      guided_channels: eps channels that guidance applies to (3 = DiT's choice); None for all.
      clip_denoised: clip each step's x0 prediction to [-1, 1] (ADM's choice for pixel-space models; DiT's
        latent models do not clip).
      decode: optional latents -> images function (the VAE); None for pixel-space models. Pass the same function
        object on every call: it is part of the compilation cache key.
    Returns:
      float32 [N, H, W, C] in the model's space (or decoded images in [-1, 1] when `decode` is given).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    graphdef, state = nnx.split(model)
    return _sample_loop(graphdef, state, jnp.asarray(labels, jnp.int32), key, num_steps=num_steps, sampler=sampler,
                        cfg_scale=float(cfg_scale), guided_channels=guided_channels, eta=float(eta),
                        clip_denoised=bool(clip_denoised), decode=decode)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "sampler", "cfg_scale", "guided_channels",
                                             "eta", "clip_denoised", "decode"))
def _sample_loop(graphdef, state, labels, key, *, num_steps, sampler, cfg_scale, guided_channels, eta, clip_denoised,
                 decode):
    # Compiled once per (model structure, settings, batch size): later batches reuse the program.
    net = nnx.merge(graphdef, state)
    config = net.config
    diffusion = create_diffusion(str(num_steps) if sampler == "ddpm" else f"ddim{num_steps}",
                                 learn_sigma=config.learn_sigma)
    shape = (labels.shape[0], config.input_size, config.input_size, config.in_channels)

    def model_fn(x, t, y):
        return net(x, t, y, train=False)

    if cfg_scale != 1.0:
        model_fn = cfg_model_fn(model_fn, cfg_scale, null_class=config.num_classes, guided_channels=guided_channels)
    if sampler == "ddpm":
        samples = diffusion.p_sample_loop(model_fn, shape, key, labels, clip_denoised=clip_denoised)
    else:
        samples = diffusion.ddim_sample_loop(model_fn, shape, key, labels, eta=eta, clip_denoised=clip_denoised)
    return samples if decode is None else decode(samples)
