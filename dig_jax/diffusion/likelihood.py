"""Gaussian KL and the discretised Gaussian likelihood that make up the variational bound (all in nats)."""

import math

import jax.numpy as jnp

# Half the width of one of the 256 pixel bins once uint8 values are rescaled to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Bins whose centre lies beyond these thresholds are the edge bins, which absorb the whole tail.
_EDGE = 0.999
_MIN_PROB = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) element-wise; arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF (the one used by GELU's fast form)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability of the pixel bin containing x under N(means, exp(log_scales)^2).

    Args:
      x: targets assumed to be uint8 values rescaled to [-1, 1], any shape.
      means, log_scales: same shape as x; log_scales is the log standard deviation.

    Returns:
      Log-probabilities (nats), shape of x. The lowest and highest bins extend to -inf and +inf, and every
      probability is floored at 1e-12 before the log.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must share one shape, got {x.shape}, {means.shape}, {log_scales.shape}"
        )
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _MIN_PROB))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _MIN_PROB))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _MIN_PROB))
    return jnp.where(x < -_EDGE, log_cdf_plus, jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta))
