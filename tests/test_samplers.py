"""DPM-Solver++(2M) against the exact ODE solution of Gaussian data and against diffusers' implementation, per-image
random streams, and each identity of upsample guidance on analytic inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from flax import nnx

from dig_jax.diffusion import create_diffusion
from dig_jax.diffusion.dpm_solver import dpm_solver_2m_sample_loop
from dig_jax.diffusion.schedule import log_alpha_at
from dig_jax.diffusion.upsample_guidance import (
    UpsampleGuidance,
    alphas_cumprod_at,
    average_pool,
    guidance_weight,
    matched_timestep,
    nearest_upsample,
    power,
    upsample_guided_model_fn,
)
from dig_jax.models import at_input_size, create_model
from dig_jax.models.layers import sincos_2d
from dig_jax.sampling import generate, image_keys

ALPHAS_CUMPROD = create_diffusion().schedule.alphas_cumprod  # the training schedule, 1000 steps
DATA_MEAN, DATA_STD = 0.5, 0.8  # the toy data: every pixel ~ N(0.5, 0.8^2), independently
TOY_SHAPE = (64, 1, 1, 1)


def _alpha_sigma(t, xp):
    alpha_bar = xp.exp(2 * log_alpha_at(ALPHAS_CUMPROD, t, xp))
    return xp.sqrt(alpha_bar), xp.sqrt(1 - alpha_bar)


def exact_eps(x, t):
    """E[eps | x_t] for the toy data: sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2), at real timesteps t [N]."""
    alpha, sigma = (v[:, None, None, None] for v in _alpha_sigma(jnp.asarray(t, jnp.float32), jnp))
    return sigma * (x - alpha * DATA_MEAN) / (alpha**2 * DATA_STD**2 + sigma**2)


def exact_model(x, t, y):
    """The exact denoiser with a (zero) variance half, as a learned-sigma model outputs."""
    eps = exact_eps(x, t)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)


def exact_flow(x, t_from: float, t_to: float):
    """The probability-flow ODE maps Gaussian data's x_t affinely, keeping (x_t - alpha mu) / std(x_t)."""
    def mean_std(t):
        alpha, sigma = _alpha_sigma(np.float64(t), np)
        return alpha * DATA_MEAN, np.sqrt(alpha**2 * DATA_STD**2 + sigma**2)

    (mean_from, std_from), (mean_to, std_to) = mean_std(t_from), mean_std(t_to)
    return mean_to + std_to * (np.asarray(x, np.float64) - mean_from) / std_from


def _toy_noise():
    return jnp.asarray(np.random.default_rng(0).standard_normal(TOY_SHAPE), jnp.float32)


def _labels():
    return jnp.zeros((TOY_SHAPE[0],), jnp.int32)


def test_dpm_solver_converges_at_second_order_and_ddim_at_first_order():
    noise, step_counts = _toy_noise(), [25, 50, 100, 200]
    # DPM-Solver++ ends at timestep 0; DDIM goes on to x0, the x0 prediction at timestep 0.
    exact_at_0 = exact_flow(noise, 999, 0)
    exact_x0 = (exact_at_0 - np.sqrt(1 - ALPHAS_CUMPROD[0]) * np.asarray(exact_eps(jnp.asarray(exact_at_0, jnp.float32),
                                                                                   jnp.zeros(TOY_SHAPE[0])))
                ) / np.sqrt(ALPHAS_CUMPROD[0])
    dpm_errors, ddim_errors = [], []
    for steps in step_counts:
        dpm = dpm_solver_2m_sample_loop(exact_model, TOY_SHAPE, jax.random.key(0), _labels(), ALPHAS_CUMPROD,
                                        num_steps=steps, noise=noise)
        dpm_errors.append(np.abs(np.asarray(dpm) - exact_at_0).max())
        # DDIM with `steps` model evaluations, the first at timestep 999 and the last at 0, like DPM-Solver's.
        ddim = create_diffusion(str(steps)).ddim_sample_loop(exact_model, TOY_SHAPE, jax.random.key(0), _labels(),
                                                             noise=noise)
        ddim_errors.append(np.abs(np.asarray(ddim) - exact_x0).max())

    dpm_order = -np.polyfit(np.log(step_counts), np.log(dpm_errors), 1)[0]
    ddim_order = -np.polyfit(np.log(step_counts), np.log(ddim_errors), 1)[0]
    assert 1.8 < dpm_order < 2.3, (dpm_order, dpm_errors)
    assert 0.85 < ddim_order < 1.15, (ddim_order, ddim_errors)
    assert dpm_errors[-1] < ddim_errors[-1] / 5


@pytest.mark.parametrize("steps", [9, 27])  # 9: first-order last step in both; 27: second order throughout
def test_dpm_solver_matches_diffusers_dpm_solver_plus_plus_2m(steps):
    # With linspace spacing and sigma_min as the final sigma, diffusers steps on the integer timesteps
    # round(linspace(999, 0, steps + 1)) and ends at timestep 0: ours exactly when 999 / steps is an integer.
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                            timestep_spacing="linspace", final_sigmas_type="sigma_min")
    scheduler.set_timesteps(steps)
    noise = _toy_noise()
    x = torch.tensor(np.asarray(noise))
    for t in scheduler.timesteps:
        eps = exact_eps(jnp.asarray(x.numpy()), jnp.full((TOY_SHAPE[0],), float(t)))
        x = scheduler.step(torch.tensor(np.asarray(eps)), t, x).prev_sample

    ours = dpm_solver_2m_sample_loop(exact_model, TOY_SHAPE, jax.random.key(0), _labels(), ALPHAS_CUMPROD,
                                     num_steps=steps, noise=noise)
    np.testing.assert_allclose(ours, x.numpy(), atol=2e-5)


def _contracting_model(x, t, y):
    return jnp.concatenate([0.1 * x, jnp.zeros_like(x)], axis=-1)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_per_image_keys_make_each_sample_independent_of_its_batch(sampler):
    shape, keys = (3, 4, 4, 2), image_keys(7, 0, 3)

    @jax.jit
    def sample(keys):
        n = keys.shape[0]
        y = jnp.zeros((n,), jnp.int32)
        if sampler == "ddpm":
            return create_diffusion("4").p_sample_loop(_contracting_model, (n, *shape[1:]), keys, y)
        return dpm_solver_2m_sample_loop(_contracting_model, (n, *shape[1:]), keys, y, ALPHAS_CUMPROD,
                                         num_steps=4)

    together = sample(keys)
    np.testing.assert_allclose(sample(keys[2:]), together[2:], rtol=1e-6, atol=1e-6)
    assert not np.allclose(together[0], together[1])


# ---------------------------------------------------------------- upsample guidance


def test_pooling_and_nearest_upsampling():
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in [(2, 6, 6, 3), (2, 2, 2, 3)])
    m = 3
    np.testing.assert_allclose(average_pool(nearest_upsample(y, m), m), y, atol=1e-6)  # D U = I
    # D is U's adjoint up to 1 / m^2: <D x, y> = <x, U y> / m^2.
    np.testing.assert_allclose(jnp.vdot(average_pool(x, m), y), jnp.vdot(x, nearest_upsample(y, m)) / m**2,
                               rtol=1e-5)
    projected = nearest_upsample(average_pool(x, m), m)  # U D: the orthogonal projection on block-constant images
    np.testing.assert_allclose(nearest_upsample(average_pool(projected, m), m), projected, atol=1e-6)
    np.testing.assert_allclose(jnp.vdot(x - projected, projected), 0.0, atol=1e-4)
    with pytest.raises(ValueError, match="not a multiple of the upsample factor 4"):
        average_pool(x, 4)


@pytest.mark.parametrize("t", [999, 800, 420.5])
def test_power_is_the_variance_of_the_pooled_noisy_image(t):
    # Unit-variance signal that is constant on m x m blocks (what D keeps) and unit noise.
    m, rng = 2, np.random.default_rng(1)
    x0 = nearest_upsample(jnp.asarray(rng.standard_normal((4096, 4, 4, 1)), jnp.float32), m)
    eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    alpha_bar = float(alphas_cumprod_at(ALPHAS_CUMPROD, jnp.float32(t)))
    pooled = average_pool(np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * eps, m)
    assert float(jnp.var(average_pool(eps, m))) == pytest.approx(1 / m**2, rel=0.03)
    assert float(jnp.var(pooled)) == pytest.approx(power(alpha_bar, m), rel=0.03)
    assert float(jnp.var(pooled / np.sqrt(power(alpha_bar, m)))) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("m", [2, 3])
def test_matched_timestep_has_m_squared_times_the_snr(m):
    t = jnp.asarray([999.0, 850.0, 700.25, 400.0, 120.0], jnp.float32)
    tau = matched_timestep(ALPHAS_CUMPROD, t, m)

    def snr(t):
        alpha_bar = np.asarray(alphas_cumprod_at(ALPHAS_CUMPROD, t), np.float64)
        return alpha_bar / (1 - alpha_bar)

    assert np.all(np.asarray(tau) < np.asarray(t)) and np.all(np.asarray(tau) > 0)
    np.testing.assert_allclose(snr(tau), m**2 * snr(t), rtol=1e-3)
    # Past the least noisy trained step, tau stays at 0.
    assert float(matched_timestep(ALPHAS_CUMPROD, jnp.float32(0.0), m)) == 0.0


def test_guidance_weight_is_theta_on_the_first_eta_of_the_time():
    t = jnp.asarray([999, 800, 699, 698, 300, 0])
    np.testing.assert_array_equal(guidance_weight(t, 1000, theta=1.5, eta=0.3), [1.5, 1.5, 1.5, 0, 0, 0])
    np.testing.assert_array_equal(guidance_weight(t, 1000, theta=1.0, eta=1.0), [1, 1, 1, 1, 1, 1])


def test_guided_eps_follows_the_formula_and_keeps_the_variance_channels():
    m, theta = 2, 0.7
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32)
    t = jnp.asarray([950, 100])  # the second example is past the guided interval
    y = jnp.zeros((2,), jnp.int32)

    def high(x, t, y):  # eps = x * (1 + t / 1000), variance channels 0.25
        return jnp.concatenate([x * (1 + t[:, None, None, None] / 1000), jnp.full_like(x, 0.25)], -1)

    def low(x, t, y):  # eps = 2x + t / 1000 (t real-valued: tau)
        return jnp.concatenate([2 * x + t[:, None, None, None] / 1000, jnp.zeros_like(x)], -1)

    guided = upsample_guided_model_fn(high, low, ALPHAS_CUMPROD, UpsampleGuidance(m, theta=theta))(x, t, y)

    eps = np.asarray(high(x, t, y)[..., :3])
    alpha_bar = np.asarray(alphas_cumprod_at(ALPHAS_CUMPROD, t.astype(jnp.float32)))[:, None, None, None]
    tau = np.asarray(matched_timestep(ALPHAS_CUMPROD, t, m))[:, None, None, None]
    low_eps = 2 * np.asarray(average_pool(x, m)) / np.sqrt(alpha_bar + (1 - alpha_bar) / m**2) + tau / 1000
    term = np.asarray(nearest_upsample(low_eps / m - np.asarray(average_pool(eps, m)), m))
    np.testing.assert_allclose(guided[0, ..., :3], eps[0] + theta * term[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(guided[1, ..., :3], eps[1], rtol=1e-6)
    np.testing.assert_array_equal(guided[..., 3:], 0.25)


def _tiny_dit():
    return create_model("DiT-S/2", input_size=8, in_channels=3, num_classes=5, depth=1, hidden_size=32, num_heads=2,
                        rngs=nnx.Rngs(params=0, label_dropout=1))


def test_at_input_size_shares_the_weights_and_rebuilds_only_the_position_embedding():
    model = _tiny_dit()  # (DiG at twice its size samples in test_sample.py's upsample guidance test)
    large = at_input_size(model, 16)
    assert large.config.input_size == 16 and model.config.input_size == 8
    np.testing.assert_array_equal(large.pos_embed[...], sincos_2d(32, 8))
    np.testing.assert_array_equal(model.pos_embed[...], sincos_2d(32, 4))
    small_params, large_params = nnx.state(model, nnx.Param), nnx.state(large, nnx.Param)
    assert all(a is b for a, b in zip(jax.tree.leaves(small_params), jax.tree.leaves(large_params), strict=True))


def test_upsample_guidance_with_zero_scale_is_plain_sampling_at_the_larger_size():
    model = _tiny_dit()
    # Non-zero final layers, so that the model's eps depends on its input.
    nnx.update(model, jax.tree.map(lambda p: p + 0.02, nnx.state(model, nnx.Param)))
    labels, keys = np.array([1, 3]), image_keys(0, 0, 2)
    settings = dict(num_steps=3, sampler="dpm++2m", cfg_scale=1.5)
    plain = generate(at_input_size(model, 16), labels, keys, **settings)
    off = generate(model, labels, keys, upsample=UpsampleGuidance(2, theta=0.0), **settings)
    assert plain.shape == (2, 16, 16, 3) and bool(jnp.isfinite(plain).all())
    np.testing.assert_array_equal(off, plain)
