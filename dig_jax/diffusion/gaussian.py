"""ADM's Gaussian diffusion: epsilon prediction, learned-range (or fixed-large) variance, MSE + VB loss.

Layouts: images x are [N, H, W, C] (any [N, ...] works; "per example" means a mean over every non-batch axis).
A model is any callable `model_fn(x_t, t, y) -> output` with x_t [N, H, W, C], t int [N] ORIGINAL timestep indices
(see `GaussianDiffusion.model_timesteps`), y the class labels [N]; output [N, H, W, 2C] when the variance is learned
(channels [:C] predict eps, [C:] the variance interpolation v in [-1, 1]) and [N, H, W, C] otherwise.
Step indices t passed to this module's methods index the (possibly respaced) schedule of the diffusion itself.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dig_jax.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from dig_jax.diffusion.schedule import NoiseSchedule, gather

ModelFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


def mean_per_example(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the first: [N, ...] -> [N]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two independent keys from a key, or from keys [N] (one per example) two key arrays [N]."""
    if key.ndim == 0:
        return tuple(jax.random.split(key))
    pairs = jax.vmap(jax.random.split)(key)
    return pairs[:, 0], pairs[:, 1]


def fold_in(key: jax.Array, data) -> jax.Array:
    """jax.random.fold_in of a key, or of each of keys [N]."""
    if key.ndim == 0:
        return jax.random.fold_in(key, data)
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def standard_normal(key: jax.Array, shape) -> jnp.ndarray:
    """float32 N(0, I) noise of `shape` [N, ...] from one key, or from keys [N]: then example i's noise depends on
    keys[i] alone, so an image does not change with the batch it is sampled in."""
    if key.ndim == 0:
        return jax.random.normal(key, shape, jnp.float32)
    if key.shape != tuple(shape[:1]):
        raise ValueError(f"expected one key per example ({shape[0]}), got keys of shape {key.shape}")
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(key)


def sample_timesteps(key: jax.Array, n: int, num_timesteps: int = 1000) -> jnp.ndarray:
    """Training timesteps, uniform over {0, ..., num_timesteps - 1}: int32 [n]."""
    return jax.random.randint(key, (n,), 0, num_timesteps, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A discrete Gaussian diffusion over `schedule`, immutable; methods are pure and jit-friendly.

    Attributes:
      schedule: float64 coefficients of this diffusion's own steps.
      timestep_map: int [T], the original timestep each step stands for (identity unless respaced); models
        are always called with these original indices.
      learn_sigma: whether the model outputs the variance interpolation v (LEARNED_RANGE) next to eps;
        otherwise the variance is ADM's FIXED_LARGE (beta_t, with step 0 taking the posterior variance of step 1).
    """

    schedule: NoiseSchedule
    timestep_map: np.ndarray
    learn_sigma: bool = True

    def __post_init__(self):
        timestep_map = np.array(self.timestep_map, dtype=np.int64)
        if timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map must have shape ({self.num_timesteps},), got {timestep_map.shape}")
        timestep_map.flags.writeable = False
        object.__setattr__(self, "timestep_map", timestep_map)  # a read-only copy keeps the instance immutable

    @classmethod
    def from_betas(cls, betas, learn_sigma: bool = True) -> "GaussianDiffusion":
        """A diffusion whose steps are exactly `betas` (timestep_map = identity)."""
        schedule = NoiseSchedule.from_betas(betas)
        return cls(schedule, np.arange(schedule.num_timesteps), learn_sigma)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def model_timesteps(self, t: jnp.ndarray) -> jnp.ndarray:
        """Maps this diffusion's step indices to the original timesteps the model was trained on: int32 [N]."""
        return jnp.asarray(self.timestep_map, dtype=jnp.int32)[t]

    # ------------------------------------------------------------------ forward process and posterior

    def q_sample(self, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        """Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given standard noise."""
        s = self.schedule
        return (
            gather(s.sqrt_alphas_cumprod, t, x0.ndim) * x0 + gather(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def q_posterior_mean_variance(self, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0); variances shaped [N, 1, ..., 1]."""
        s = self.schedule
        mean = gather(s.posterior_mean_coef1, t, x_t.ndim) * x0 + gather(s.posterior_mean_coef2, t, x_t.ndim) * x_t
        variance = gather(s.posterior_variance, t, x_t.ndim)
        log_variance = gather(s.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, variance, log_variance

    def predict_x0_from_eps(self, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
        s = self.schedule
        return (
            gather(s.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - gather(s.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def predict_eps_from_x0(self, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray) -> jnp.ndarray:
        s = self.schedule
        return (gather(s.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / gather(
            s.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
        )

    # ------------------------------------------------------------------ reverse process

    def split_model_output(self, model_output: jnp.ndarray, x_t: jnp.ndarray):
        """(eps [N, ..., C], v [N, ..., C] or None) from a model output, checking its channel count."""
        channels = x_t.shape[-1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape != x_t.shape[:-1] + (expected,):
            raise ValueError(
                f"model output must have shape {x_t.shape[:-1] + (expected,)} (learn_sigma={self.learn_sigma}), "
                f"got {model_output.shape}"
            )
        if not self.learn_sigma:
            return model_output, None
        return model_output[..., :channels], model_output[..., channels:]

    def p_mean_variance(self, model_output: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray, clip_denoised: bool = False):
        """Parameters of p(x_{t-1} | x_t) given the model's output at (x_t, t).

        Returns:
          dict with "mean" [N, ..., C], "variance" and "log_variance" (broadcastable to the mean) and "pred_x0",
          the x0 implied by the predicted eps (clipped to [-1, 1] only when clip_denoised).
        """
        eps, v = self.split_model_output(model_output, x_t)
        s = self.schedule
        if self.learn_sigma:
            # v in [-1, 1] interpolates the log-variance between beta~_t (v=-1) and beta_t (v=+1).
            min_log = gather(s.posterior_log_variance_clipped, t, x_t.ndim)
            max_log = gather(np.log(s.betas), t, x_t.ndim)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            fixed_large = np.append(s.posterior_variance[1], s.betas[1:])
            log_variance = gather(np.log(fixed_large), t, x_t.ndim)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": jnp.exp(log_variance), "log_variance": log_variance, "pred_x0": pred_x0}

    # ------------------------------------------------------------------ training

    def _vb_bits(self, model_output, x0, x_t, t):
        """One term of the variational bound per example, in bits: KL to the posterior, or the decoder NLL at t=0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_per_example(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        log_scales = jnp.broadcast_to(0.5 * out["log_variance"], x0.shape)
        decoder_nll = -mean_per_example(discretized_gaussian_log_likelihood(x0, out["mean"], log_scales))
        return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)

    def training_losses(self, model_fn: ModelFn, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, y):
        """ADM's hybrid loss (loss type MSE) at the given steps.

        Args:
          model_fn: called once as model_fn(x_t, original timesteps, y).
          x0: clean data [N, H, W, C]. t: int [N] steps of this diffusion. noise: standard normal, like x0.
          y: class labels passed through to the model.

        Returns:
          dict of float32 [N]: "mse" = mean (noise - eps_hat)^2; "vb" = the variational-bound term in bits,
          computed with eps_hat frozen so that only v receives its gradient (0 when the variance is fixed);
          "loss" = mse + vb.
        """
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t), y)
        eps, v = self.split_model_output(model_output, x_t)
        mse = mean_per_example((noise - eps) ** 2)
        if self.learn_sigma:
            frozen_output = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
            vb = self._vb_bits(frozen_output, x0, x_t, t)
        else:
            vb = jnp.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ sampling

    def p_sample(self, model_fn: ModelFn, x_t, t, y, key: jax.Array, clip_denoised: bool = False) -> jnp.ndarray:
        """One ancestral step x_t -> x_{t-1}; no noise is added where t == 0."""
        out = self.p_mean_variance(model_fn(x_t, self.model_timesteps(t), y), x_t, t, clip_denoised)
        noise = standard_normal(key, x_t.shape).astype(x_t.dtype)
        return out["mean"] + _nonzero_mask(t, x_t.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(
        self, model_fn: ModelFn, x_t, t, y, key: jax.Array, eta: float = 0.0, clip_denoised: bool = False
    ) -> jnp.ndarray:
        """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12); eta=0 is deterministic, eta=1 matches DDPM's variance."""
        out = self.p_mean_variance(model_fn(x_t, self.model_timesteps(t), y), x_t, t, clip_denoised)
        # Re-derived from pred_x0 so that clipping, when on, is reflected in eps too.
        eps = self.predict_eps_from_x0(x_t, t, out["pred_x0"])
        alpha_bar = gather(self.schedule.alphas_cumprod, t, x_t.ndim)
        alpha_bar_prev = gather(self.schedule.alphas_cumprod_prev, t, x_t.ndim)
        sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_x0"] * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        noise = standard_normal(key, x_t.shape).astype(x_t.dtype)
        return mean + _nonzero_mask(t, x_t.ndim) * sigma * noise

    def _sample_loop(self, step_fn, shape, key: jax.Array, noise) -> jnp.ndarray:
        steps_key, x = initial_noise(key, shape, noise)

        def body(i, x):
            t = jnp.full((shape[0],), self.num_timesteps - 1 - i, dtype=jnp.int32)
            return step_fn(x, t, fold_in(steps_key, i))

        return jax.lax.fori_loop(0, self.num_timesteps, body, x)

    def p_sample_loop(
        self, model_fn: ModelFn, shape, key: jax.Array, y, noise=None, clip_denoised: bool = False
    ) -> jnp.ndarray:
        """Ancestral (DDPM) sampling over every step of this diffusion, from x_T ~ N(0, I) (or `noise`) to x_0.

        Args:
          shape: (N, H, W, C) of the samples. y: labels [N] passed to the model. noise: optional x_T.
          key: a PRNG key, or keys [N], one per example (see `initial_noise`).
        Returns:
          float32 samples, `shape`.
        """

        def step(x, t, step_key):
            return self.p_sample(model_fn, x, t, y, step_key, clip_denoised)

        return self._sample_loop(step, shape, key, noise)

    def ddim_sample_loop(
        self, model_fn: ModelFn, shape, key: jax.Array, y, noise=None, eta: float = 0.0, clip_denoised: bool = False
    ) -> jnp.ndarray:
        """DDIM sampling over every step of this diffusion (respace it for fewer steps); see p_sample_loop."""

        def step(x, t, step_key):
            return self.ddim_sample(model_fn, x, t, y, step_key, eta, clip_denoised)

        return self._sample_loop(step, shape, key, noise)


def initial_noise(key: jax.Array, shape, noise=None) -> tuple[jax.Array, jnp.ndarray]:
    """(key for the sampling steps, x_T): x_T ~ N(0, I) of `shape` drawn from `key`, or the given `noise`.

    With keys [N], one per example, example i's x_T and step noise come from keys[i] alone: the sample of a key
    is the same in any batch.
    """
    init_key, steps_key = split_key(key)
    x = standard_normal(init_key, shape) if noise is None else noise
    if x.shape != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {x.shape}")
    return steps_key, x


def _nonzero_mask(t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """1.0 where t != 0, else 0.0, shaped [N, 1, ..., 1]."""
    return (t != 0).astype(jnp.float32).reshape(t.shape + (1,) * (ndim - 1))
