"""Upsample guidance (Hwang, Park & Jo 2024, arXiv 2404.01709): sampling at m times the trained resolution with a
model trained at 1x, by adding one guidance term to the eps prediction (the DiG paper's supplementary uses it for
768-1536 px images):

    eps~(x_t, t) = eps(x_t, t) + w_t * U[ eps(D(x_t) / sqrt(P_t), tau) / m - D(eps(x_t, t)) ]

D: m x m average pooling; U: nearest-neighbour upsampling by m. D(x_t) = sqrt(abar_t) D(x0) + sqrt(1 - abar_t) D(eps)
where D(eps) has variance 1/m^2, so D(x_t) / sqrt(P_t) with P_t = abar_t + (1 - abar_t) / m^2 is a unit-variance
noisy image at the low resolution whose signal-to-noise ratio is m^2 SNR(t) ("power adjustment"); the model is
therefore asked at tau, the timestep with SNR(tau) = m^2 SNR(t) ("time adjustment"), and its eps prediction, which
estimates m D(eps), divided by m replaces the low-frequency part D(eps(x_t)) of the full-resolution prediction.
w_t = theta while t is in the first (noisiest) eta fraction of the diffusion time, 0 after.

Timesteps are real-valued: tau falls between trained steps and the models take it as is (their timestep embedding
is sinusoidal in a real t), with abar interpolated as `schedule.log_alpha_at` does (DPM-Solver's discrete-time
schedule). The guidance is linear in the two eps predictions, so wrapping a classifier-free-guided model or wrapping
the models before classifier-free guidance gives the same prediction.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dig_jax.diffusion.gaussian import ModelFn
from dig_jax.diffusion.schedule import log_alpha_at, timestep_at_log_alpha

DEFAULT_THETA, DEFAULT_ETA = 1.0, 0.3


@dataclasses.dataclass(frozen=True)
class UpsampleGuidance:
    """Settings: `factor` m (the resolution multiple), `theta` (the guidance scale w) and `eta` (the fraction of the
    diffusion time, from the noisy end, during which it applies)."""

    factor: int
    theta: float = DEFAULT_THETA
    eta: float = DEFAULT_ETA

    def __post_init__(self):
        if not (isinstance(self.factor, int) and self.factor >= 2):
            raise ValueError(f"upsample guidance factor must be an integer >= 2, got {self.factor!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"upsample guidance eta must be in [0, 1], got {self.eta}")


def average_pool(x: jnp.ndarray, factor: int) -> jnp.ndarray:
    """D: means of factor x factor blocks, [N, H, W, C] -> [N, H / factor, W / factor, C]."""
    n, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not a multiple of the upsample factor {factor}")
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def nearest_upsample(x: jnp.ndarray, factor: int) -> jnp.ndarray:
    """U: each pixel repeated into a factor x factor block, [N, H, W, C] -> [N, factor H, factor W, C]."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def alphas_cumprod_at(alphas_cumprod: np.ndarray, t) -> jnp.ndarray:
    """abar at real-valued timesteps t (exact at integers, log-linear in between)."""
    return jnp.exp(2.0 * log_alpha_at(alphas_cumprod, t, jnp))


def power(alpha_bar, factor: int):
    """P_t = abar_t + (1 - abar_t) / m^2: the variance of D(x_t) for unit-variance, block-constant signal and unit
    noise (D averages m^2 independent noise values)."""
    return alpha_bar + (1.0 - alpha_bar) / factor**2


def matched_timestep(alphas_cumprod: np.ndarray, t, factor: int) -> jnp.ndarray:
    """tau with SNR(tau) = m^2 SNR(t), SNR = abar / (1 - abar): real-valued, clamped to [0, T - 1]."""
    alpha_bar = alphas_cumprod_at(alphas_cumprod, t)
    # abar(tau) = m^2 SNR / (1 + m^2 SNR) = abar / P_t.
    log_alpha = 0.5 * jnp.log(alpha_bar / power(alpha_bar, factor))
    return timestep_at_log_alpha(alphas_cumprod, log_alpha, jnp)


def guidance_weight(t, num_timesteps: int, theta: float, eta: float) -> jnp.ndarray:
    """w_t = theta where t lies in the first `eta` fraction of the reverse process, else 0: float32 like t.

    The time is DPM-Solver's continuous one, (t + 1) / T in (0, 1], the noisy end being 1, so the guidance is on
    while (t + 1) / T >= 1 - eta.
    """
    t = jnp.asarray(t, jnp.float32)
    return jnp.where((t + 1.0) / num_timesteps >= 1.0 - eta, jnp.float32(theta), jnp.float32(0.0))


def upsample_guided_model_fn(model_fn: ModelFn, low_res_model_fn: ModelFn, alphas_cumprod: np.ndarray,
                             settings: UpsampleGuidance) -> ModelFn:
    """Wraps a model run at m times its trained size with upsample guidance from the same model at its own size.

    Args:
      model_fn: (x [N, mH, mW, C], t [N], y) -> [N, mH, mW, C] eps, or [N, mH, mW, 2C] with variance channels
        (these are passed through unchanged).
      low_res_model_fn: the same network at the trained size, (x [N, H, W, C], t [N] real, y) -> like model_fn.
      alphas_cumprod: float64 [T], the training schedule the models' timesteps index.
    Returns:
      A model function like `model_fn` whose eps channels are the guided eps~. The low-resolution model runs only
      while some example of the batch has a non-zero weight.
    """
    m = settings.factor

    def guided(x, t, y):
        output = model_fn(x, t, y)
        channels = x.shape[-1]
        eps = output[..., :channels]
        weight = guidance_weight(t, alphas_cumprod.shape[0], settings.theta, settings.eta)

        def guidance_term():
            alpha_bar = alphas_cumprod_at(alphas_cumprod, t).astype(x.dtype)[:, None, None, None]
            low_res_x = average_pool(x, m) / jnp.sqrt(power(alpha_bar, m))
            tau = matched_timestep(alphas_cumprod, t, m).astype(jnp.float32)
            low_res_eps = low_res_model_fn(low_res_x, tau, y)[..., :channels]
            return nearest_upsample(low_res_eps / m - average_pool(eps, m), m)

        term = jax.lax.cond(jnp.any(weight > 0), guidance_term, lambda: jnp.zeros_like(eps))
        guided_eps = eps + weight.astype(eps.dtype)[:, None, None, None] * term
        return jnp.concatenate([guided_eps, output[..., channels:]], axis=-1)

    return guided
