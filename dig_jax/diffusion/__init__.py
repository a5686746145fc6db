"""ADM Gaussian diffusion as used by DiT and DiG: linear betas, eps prediction, learned-range variance.

Typical use:
  train:  diffusion = create_diffusion()
          t = sample_timesteps(key, n); losses = diffusion.training_losses(model_fn, x0, t, noise, y)
  sample: diffusion = create_diffusion("250")
          x0 = diffusion.p_sample_loop(cfg_model_fn(model_fn, 1.5), shape, key, y)
  faster: dpm_solver.dpm_solver_2m_sample_loop(model_fn, shape, key, y, create_diffusion().schedule.alphas_cumprod,
                                               num_steps=20)
  larger: upsample_guidance.upsample_guided_model_fn (sampling above the training resolution)
"""

from collections.abc import Sequence

from dig_jax.diffusion.gaussian import GaussianDiffusion, mean_per_example, sample_timesteps
from dig_jax.diffusion.guidance import NULL_CLASS, cfg_model_fn
from dig_jax.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from dig_jax.diffusion.respace import respaced, space_timesteps
from dig_jax.diffusion.schedule import NoiseSchedule, linear_beta_schedule


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None = "",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """DiT's create_diffusion: a linear-schedule diffusion of `diffusion_steps` steps, respaced if asked.

    Args:
      timestep_respacing: "" or None keeps every step (training); otherwise section counts for space_timesteps,
        e.g. "250" or "ddim50" for sampling.
      learn_sigma: learned-range variance (model outputs 2C channels); False uses ADM's fixed-large variance.
    """
    base = GaussianDiffusion.from_betas(linear_beta_schedule(diffusion_steps), learn_sigma)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    # Like DiT, even "keep every step" goes through respacing, whose betas are recomputed from abar: the float64
    # schedule then matches the reference bit for bit.
    return respaced(base, space_timesteps(diffusion_steps, timestep_respacing))


__all__ = [
    "NULL_CLASS",
    "GaussianDiffusion",
    "NoiseSchedule",
    "approx_standard_normal_cdf",
    "cfg_model_fn",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "linear_beta_schedule",
    "mean_per_example",
    "normal_kl",
    "respaced",
    "sample_timesteps",
    "space_timesteps",
]
