"""Classifier-free guidance as a model wrapper (DiT's forward_with_cfg)."""

import jax.numpy as jnp

from dig_jax.diffusion.gaussian import ModelFn

NULL_CLASS = 1000


def cfg_model_fn(
    model_fn: ModelFn, guidance_scale: float, null_class: int = NULL_CLASS, guided_channels: int | None = 3
) -> ModelFn:
    """Wraps a class-conditional model so that each call returns the guided prediction for the conditional batch.

    The wrapped model, called with x [N, H, W, C], t [N], y [N], runs `model_fn` once on the batch [x; x] with
    labels [y; null_class] and returns [N, H, W, out] where eps channels [:guided_channels] are
    eps_u + guidance_scale * (eps_c - eps_u) and every other channel (the remaining eps channels and the variance
    channels) is the conditional prediction. DiT guides only 3 of the 4 latent channels, a choice kept for exact
    reproducibility; guided_channels=None guides all C eps channels.

    This equals the conditional half of DiT's doubled-batch sampling: DiT feeds both halves with the conditional
    half's x_t, so the unconditional half's own trajectory never influences the conditional one and is dropped.
    Sampling with the wrapped model therefore takes N noises and returns N (conditional) samples.
    """

    def guided(x, t, y):
        channels = x.shape[-1]
        num_guided = channels if guided_channels is None else guided_channels
        if not 1 <= num_guided <= channels:
            raise ValueError(f"guided_channels must be None or in [1, {channels}], got {guided_channels}")
        n = x.shape[0]
        labels = jnp.concatenate([y, jnp.full_like(y, null_class)])
        output = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)
        cond, uncond = output[:n], output[n:]
        eps_c, eps_u = cond[..., :num_guided], uncond[..., :num_guided]
        guided_eps = eps_u + guidance_scale * (eps_c - eps_u)
        return jnp.concatenate([guided_eps, cond[..., num_guided:]], axis=-1)

    return guided
