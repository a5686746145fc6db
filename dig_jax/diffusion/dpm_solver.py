"""DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): second-order multistep sampling of the diffusion ODE with
the data (x0) prediction, for eps-prediction models of a discrete-time schedule.

Discrete-time models follow the reference implementation (LuChengTHU/dpm-solver, `NoiseScheduleVP('discrete')`):
log(alpha_t) is interpolated linearly between the trained integer timesteps (`schedule.log_alpha_at`), the ODE is
solved from timestep T - 1 to timestep 0 (its t_continuous from 1 to 1/T), the model is called at real-valued
timesteps, and the steps are uniform in time (its skip_type="time_uniform", which the reference recommends for
guided sampling with the multistep second-order solver). The result is the ODE solution at timestep 0, whose noise
level sqrt(1 - abar_0) = 0.01 is left in (the reference's default, no extra denoising evaluation).

With steps t_0 > t_1 > ... > t_K, lambda = log(alpha / sigma), h_i = lambda_{t_i} - lambda_{t_{i-1}} and
D_i = (x_{t_i} - sigma_{t_i} eps(x_{t_i}, t_i)) / alpha_{t_i}, step i is
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} expm1(-h_i) [(1 + c_i) D_{i-1} - c_i D_{i-2}]
with c_i = h_i / (2 h_{i-1}) (the second-order correction), and c_i = 0 (DPM-Solver-1, i.e. DDIM) on the first
step, and on the last one when K < 10 (the reference's lower_order_final). One model evaluation per step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dig_jax.diffusion.gaussian import ModelFn, initial_noise
from dig_jax.diffusion.schedule import log_alpha_at

# Below this many steps the last step is first order (the reference: "a key to stabilizing ... steps <= 10").
LOWER_ORDER_FINAL_BELOW = 10


def time_uniform_steps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The K + 1 timesteps t_0 = T - 1 > ... > t_K = 0 of a K-step solve, uniform in time: float64 [K + 1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return np.linspace(num_timesteps - 1, 0, num_steps + 1)


def step_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict:
    """Per-step constants of the 2M update for the steps between consecutive `timesteps`, float64 [K] each:
    "alpha", "sigma" at the step's start (to turn eps into x0), "x_scale" (sigma_t / sigma_s), "x0_scale"
    (-alpha_t expm1(-h)) and "correction" (c_i)."""
    log_alpha = log_alpha_at(alphas_cumprod, timesteps)
    alpha = np.exp(log_alpha)
    sigma = np.sqrt(-np.expm1(2 * log_alpha))
    lambdas = log_alpha - np.log(sigma)
    h = np.diff(lambdas)
    num_steps = h.shape[0]
    correction = np.zeros(num_steps)
    correction[1:] = h[1:] / (2 * h[:-1])
    if num_steps < LOWER_ORDER_FINAL_BELOW:
        correction[-1] = 0.0
    return {"alpha": alpha[:-1], "sigma": sigma[:-1], "x_scale": sigma[1:] / sigma[:-1],
            "x0_scale": -alpha[1:] * np.expm1(-h), "correction": correction}


def dpm_solver_2m_sample_loop(model_fn: ModelFn, shape, key: jax.Array, y, alphas_cumprod: np.ndarray, *,
                              num_steps: int, learn_sigma: bool = True, noise=None,
                              clip_denoised: bool = False) -> jnp.ndarray:
    """Samples with `num_steps` DPM-Solver++(2M) steps (`num_steps` model evaluations).

    Args:
      model_fn: model_fn(x [N, H, W, C], t float32 [N] real-valued timesteps, y) -> eps [N, H, W, C], or
        [N, H, W, 2C] when `learn_sigma` (the variance channels are not used by the ODE).
      shape: (N, H, W, C). key: a PRNG key or keys [N] (one per example) for x_T. y: labels passed to the model.
      alphas_cumprod: float64 [T], the model's training schedule (not respaced).
      noise: optional x_T. clip_denoised: clip each x0 prediction to [-1, 1] (pixel-space models).
    Returns:
      float32 `shape`: the ODE solution at timestep 0.
    """
    _, x = initial_noise(key, shape, noise)
    timesteps = time_uniform_steps(alphas_cumprod.shape[0], num_steps)
    constants = step_coefficients(alphas_cumprod, timesteps)
    per_step = {name: jnp.asarray(value, x.dtype) for name, value in constants.items()}
    per_step["t"] = jnp.asarray(timesteps[:-1], jnp.float32)
    channels = shape[-1]

    def data_prediction(x, step):
        output = model_fn(x, jnp.full((shape[0],), step["t"]), y)
        expected = 2 * channels if learn_sigma else channels
        if output.shape[-1] != expected:
            raise ValueError(f"model output must have {expected} channels (learn_sigma={learn_sigma}), "
                             f"got shape {output.shape}")
        x0 = (x - step["sigma"] * output[..., :channels]) / step["alpha"]
        return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

    def body(carry, step):
        x, previous_x0 = carry
        x0 = data_prediction(x, step)
        combined = (1 + step["correction"]) * x0 - step["correction"] * previous_x0
        return (step["x_scale"] * x + step["x0_scale"] * combined, x0), None

    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), per_step)
    return x
