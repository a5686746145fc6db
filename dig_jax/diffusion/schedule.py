"""Noise schedules of the discrete Gaussian diffusion, precomputed in float64 numpy.

Every array has one entry per diffusion step, index 0 being the first (least noisy) step. They stay float64 numpy
so that derived quantities keep full precision; `gather` turns an entry into float32 only when a batch indexes it.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear betas rescaled to `num_timesteps` steps (1e-4 .. 0.02 exactly when it is 1000).

    Returns:
      float64 [num_timesteps].
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float64)
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """All per-step coefficients of q(x_t | x_0) and of the posterior q(x_{t-1} | x_t, x_0), float64 [T].

    Built with `NoiseSchedule.from_betas`; arrays are read-only.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    # log of the posterior variance with step 0's value (which is 0) replaced by step 1's, so the log is finite.
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        """Derives every coefficient from betas (1-D, each in (0, 1]; at least 2 steps)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must all lie in (0, 1]")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        return cls(
            betas=_frozen(betas),
            alphas_cumprod=_frozen(alphas_cumprod),
            alphas_cumprod_prev=_frozen(alphas_cumprod_prev),
            sqrt_alphas_cumprod=_frozen(np.sqrt(alphas_cumprod)),
            sqrt_one_minus_alphas_cumprod=_frozen(np.sqrt(1.0 - alphas_cumprod)),
            sqrt_recip_alphas_cumprod=_frozen(np.sqrt(1.0 / alphas_cumprod)),
            sqrt_recipm1_alphas_cumprod=_frozen(np.sqrt(1.0 / alphas_cumprod - 1.0)),
            posterior_variance=_frozen(posterior_variance),
            posterior_log_variance_clipped=_frozen(np.log(np.append(posterior_variance[1], posterior_variance[1:]))),
            posterior_mean_coef1=_frozen(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
            posterior_mean_coef2=_frozen((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)),
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def log_alpha_at(alphas_cumprod: np.ndarray, t, xp=np):
    """log(alpha_t) = 0.5 log(abar_t) at real-valued timesteps t (any shape), `xp` being numpy or jax.numpy.

    Piecewise linear in t between the integer steps, exact at them: DPM-Solver's continuous-time view of a
    discrete-time schedule (its t_continuous = (t + 1) / T for a T-step schedule), which lets samplers and
    guidance evaluate a model at timesteps between the trained ones. Clamped to the ends outside [0, T - 1].
    """
    log_alphas = 0.5 * np.log(alphas_cumprod)
    return xp.interp(t, np.arange(log_alphas.shape[0], dtype=np.float64), log_alphas)


def timestep_at_log_alpha(alphas_cumprod: np.ndarray, log_alpha, xp=np):
    """The inverse of `log_alpha_at`: the real timesteps whose log(alpha_t) is `log_alpha` (clamped to [0, T - 1])."""
    log_alphas = 0.5 * np.log(alphas_cumprod)  # decreasing in t; interp needs increasing abscissae
    steps = np.arange(log_alphas.shape[0], dtype=np.float64)
    return xp.interp(log_alpha, log_alphas[::-1], steps[::-1])


def gather(array: np.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Picks array[t] as float32, shaped [N, 1, ..., 1] to broadcast against an `ndim`-dimensional [N, ...] batch.

    Args:
      array: float64 numpy [T].
      t: int [N] step indices.
      ndim: rank of the batch the result multiplies (4 for NHWC images).
    """
    values = jnp.asarray(array.astype(np.float32))[t]
    return values.reshape(t.shape + (1,) * (ndim - 1))
