"""Gaussian diffusion: schedules, posterior, likelihoods, respacing, losses, samplers and guidance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.diffusion import (
    GaussianDiffusion,
    cfg_model_fn,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    mean_per_example,
    normal_kl,
    respaced,
    sample_timesteps,
    space_timesteps,
)

SHAPE = (2, 4, 4, 3)


def _normal(rng, shape):
    # Test inputs come from numpy: eager jax.random calls would each cost a compilation.
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _pixels(rng, shape=SHAPE):
    """Random uint8 images rescaled to [-1, 1], the data the decoder likelihood assumes."""
    return jnp.asarray(rng.integers(0, 256, size=shape) / 127.5 - 1.0, jnp.float32)


def test_linear_schedule_final_alphas_cumprod_matches_closed_form_product():
    betas = linear_beta_schedule(1000)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    closed_form = math.prod(1.0 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    alphas_cumprod = create_diffusion().schedule.alphas_cumprod
    assert alphas_cumprod[999] == pytest.approx(closed_form, rel=1e-12)
    assert alphas_cumprod[999] == pytest.approx(4.0358297654e-5, rel=1e-9)
    # "keep every step" is respaced like the reference yet equals the plain schedule.
    np.testing.assert_allclose(create_diffusion().schedule.betas, betas, rtol=1e-12)


def test_posterior_matches_gaussian_conditioning():
    diffusion = create_diffusion()
    s = diffusion.schedule
    x0, x_t = np.random.default_rng(0).normal(size=(2, 4, 1, 1, 1))
    t = np.array([1, 10, 500, 999])
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(jnp.asarray(x0), jnp.asarray(x_t), t)
    # q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
    # times q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t).
    abar_prev, beta = s.alphas_cumprod[t - 1], s.betas[t]
    precision = 1.0 / (1.0 - abar_prev) + (1.0 - beta) / beta
    expected_variance = 1.0 / precision
    expected_mean = expected_variance[:, None, None, None] * (
        (np.sqrt(abar_prev) / (1.0 - abar_prev))[:, None, None, None] * x0
        + (np.sqrt(1.0 - beta) / beta)[:, None, None, None] * x_t
    )
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5)
    np.testing.assert_allclose(variance.ravel(), expected_variance, rtol=1e-5)
    np.testing.assert_allclose(log_variance.ravel(), np.log(expected_variance), rtol=1e-5)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == np.log(s.posterior_variance[1])


def test_normal_kl_zero_for_equal_and_hand_value_for_unequal():
    assert float(normal_kl(0.3, jnp.log(2.0), 0.3, jnp.log(2.0))) == pytest.approx(0.0, abs=1e-7)
    # KL(N(1, 1) || N(0, 4)) = 0.5 (ln 4 + 1/4 + 1/4 - 1).
    assert float(normal_kl(1.0, 0.0, 0.0, jnp.log(4.0))) == pytest.approx(0.44314718, rel=1e-6)


@pytest.mark.parametrize("mean,std", [(0.0, 0.05), (-0.95, 0.3), (0.4, 2.0)])
def test_discretized_gaussian_bins_sum_to_one(mean, std):
    x = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    log_probs = discretized_gaussian_log_likelihood(x, jnp.full_like(x, mean), jnp.full_like(x, math.log(std)))
    assert float(jnp.sum(jnp.exp(log_probs))) == pytest.approx(1.0, abs=1e-5)
    # The bin holding the mean approximates the exact Gaussian mass of a width-2/255 bin.
    k = round((mean + 1.0) * 127.5)
    exact = 0.5 * (
        math.erf((float(x[k]) + 1 / 255 - mean) / (std * math.sqrt(2)))
        - math.erf((float(x[k]) - 1 / 255 - mean) / (std * math.sqrt(2)))
    )
    assert float(jnp.exp(log_probs[k])) == pytest.approx(exact, rel=2e-3, abs=1e-6)


def test_space_timesteps_250_is_evenly_rounded():
    steps = space_timesteps(1000, "250")
    assert steps == {round(i * 999 / 249) for i in range(250)}
    assert len(steps) == 250
    assert {0, 4, 8, 12, 991, 995, 999} <= steps and not {1, 3, 998} & steps


def test_space_timesteps_ddim_and_sections():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))
    with pytest.raises(ValueError, match="exactly 999"):
        space_timesteps(1000, "ddim999")
    # ADM's example: 300 steps in three sections of 100, taking 10, 15 and 20 steps from them.
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45 and steps[:3] == [0, 11, 22] and steps[9] == 99
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299
    assert space_timesteps(300, [10, 15, 20]) == set(steps)
    with pytest.raises(ValueError, match="cannot take 101 steps"):
        space_timesteps(200, "101,1")


def test_respaced_betas_keep_marginals_and_map_timesteps():
    base = create_diffusion()
    kept = sorted(space_timesteps(1000, "25,25,50"))
    spaced = respaced(base, kept)
    abar = base.schedule.alphas_cumprod[kept]
    np.testing.assert_allclose(spaced.schedule.betas, 1.0 - abar / np.append(1.0, abar[:-1]), rtol=1e-12)
    np.testing.assert_allclose(spaced.schedule.alphas_cumprod, abar, rtol=1e-12)
    np.testing.assert_array_equal(spaced.timestep_map, kept)
    np.testing.assert_array_equal(spaced.model_timesteps(jnp.array([0, 1, 99])), [kept[0], kept[1], kept[99]])
    # Respacing a respaced diffusion still reports original timesteps.
    np.testing.assert_array_equal(respaced(spaced, [0, 50, 99]).timestep_map, [kept[0], kept[50], kept[99]])


def _oracle_model(x0, learn_sigma):
    """Predicts the exact eps that produced x_t from the known x0, indexing abar by ORIGINAL timesteps."""
    abar = jnp.asarray(create_diffusion().schedule.alphas_cumprod, jnp.float32)

    def model_fn(x_t, t, y):
        a = abar[t][:, None, None, None]
        eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return jnp.concatenate([eps, jnp.full_like(eps, 0.3)], -1) if learn_sigma else eps

    return model_fn


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_oracle_denoiser_recovers_x0_with_ddpm_and_ddim(learn_sigma):
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1.0, 1.0, size=SHAPE), jnp.float32)
    diffusion = create_diffusion("8", learn_sigma=learn_sigma)
    model_fn = _oracle_model(x0, learn_sigma)
    y = jnp.zeros((SHAPE[0],), jnp.int32)

    @jax.jit
    def sample_both(key):
        ddpm_key, ddim_key = jax.random.split(key)
        return (
            diffusion.p_sample_loop(model_fn, SHAPE, ddpm_key, y),
            diffusion.ddim_sample_loop(model_fn, SHAPE, ddim_key, y),
        )

    ddpm, ddim = sample_both(jax.random.key(1))
    np.testing.assert_allclose(ddpm, x0, atol=1e-3)
    np.testing.assert_allclose(ddim, x0, atol=1e-3)


def test_p_sample_noise_scale_and_no_noise_at_step_zero():
    diffusion = create_diffusion("10")
    shape = (2, 64, 64, 3)
    x_t = _normal(np.random.default_rng(0), shape)
    output = jnp.concatenate([0.1 * x_t, jnp.full_like(x_t, -0.5)], -1)
    y = jnp.zeros((2,), jnp.int32)
    t = jnp.array([5, 0])

    @jax.jit
    def residual_and_variance(key):
        out = diffusion.p_mean_variance(output, x_t, t)
        sample = diffusion.p_sample(lambda x, tt, yy: output, x_t, t, y, key)
        return sample - out["mean"], out["variance"]

    residual, variance = residual_and_variance(jax.random.key(1))
    assert float(jnp.std(residual[0])) == pytest.approx(float(jnp.sqrt(variance[0, 0, 0, 0])), rel=0.03)
    assert float(jnp.max(jnp.abs(residual[1]))) == 0.0


def test_learned_range_interpolates_between_posterior_and_beta():
    diffusion = create_diffusion()
    s = diffusion.schedule
    x_t = jnp.zeros((3, 2, 2, 4))
    t = jnp.array([0, 7, 999])
    for v, expected in [(-1.0, s.posterior_log_variance_clipped[t]), (1.0, np.log(s.betas[t]))]:
        output = jnp.concatenate([x_t, jnp.full_like(x_t, v)], -1)
        log_variance = diffusion.p_mean_variance(output, x_t, t)["log_variance"]
        np.testing.assert_allclose(log_variance[:, 0, 0, 0], expected, rtol=1e-6)
    fixed = create_diffusion(learn_sigma=False)
    fixed_large = np.log(np.append(s.posterior_variance[1], s.betas[1:]))[t]
    np.testing.assert_allclose(fixed.p_mean_variance(x_t, x_t, t)["log_variance"].ravel(), fixed_large, rtol=1e-6)
    with pytest.raises(ValueError, match="model output must have shape"):
        diffusion.p_mean_variance(x_t, x_t, t)


def _losses_of_output(diffusion, output, x0, t, noise):
    return diffusion.training_losses(lambda x, tt, y: output, x0, t, noise, None)


def test_vb_gradient_reaches_only_variance_channels():
    diffusion = create_diffusion()
    rng = np.random.default_rng(1)
    x0, noise, output = _pixels(rng), _normal(rng, SHAPE), _normal(rng, SHAPE[:-1] + (6,))
    t = jnp.array([0, 400])

    @jax.jit
    def grads(output):
        def term(name):
            return jax.grad(lambda o: _losses_of_output(diffusion, o, x0, t, noise)[name].sum())(output)

        return term("vb"), term("mse")

    grad_vb, grad_mse = grads(output)
    assert float(jnp.max(jnp.abs(grad_vb[..., :3]))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(grad_vb[..., 3:]), axis=(1, 2, 3)))) > 0.0
    assert float(jnp.max(jnp.abs(grad_mse[..., 3:]))) == 0.0
    np.testing.assert_allclose(grad_mse[..., :3], -2.0 * (noise - output[..., :3]) / 48, rtol=1e-5)


def test_training_losses_terms_match_their_definitions():
    diffusion = create_diffusion()
    rng = np.random.default_rng(2)
    x0, noise, output = _pixels(rng), _normal(rng, SHAPE), 0.5 * _normal(rng, SHAPE[:-1] + (6,))
    t = jnp.array([0, 123])

    @jax.jit
    def reference_terms():
        x_t = diffusion.q_sample(x0, t, noise)
        p = diffusion.p_mean_variance(output, x_t, t)
        true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
        log_scales = jnp.broadcast_to(0.5 * p["log_variance"], SHAPE)
        decoder_nll = -mean_per_example(discretized_gaussian_log_likelihood(x0, p["mean"], log_scales))
        kl = mean_per_example(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]))
        return decoder_nll / math.log(2), kl / math.log(2)

    losses = jax.jit(_losses_of_output, static_argnums=0)(diffusion, output, x0, t, noise)
    decoder_nll, kl = reference_terms()
    np.testing.assert_allclose(losses["vb"], [decoder_nll[0], kl[1]], rtol=1e-5)
    np.testing.assert_allclose(losses["mse"], mean_per_example((noise - output[..., :3]) ** 2), rtol=1e-6)
    np.testing.assert_allclose(losses["loss"], losses["mse"] + losses["vb"], rtol=1e-6)
    fixed = _losses_of_output(create_diffusion(learn_sigma=False), output[..., :3], x0, t, noise)
    np.testing.assert_array_equal(fixed["vb"], 0.0)
    np.testing.assert_allclose(fixed["loss"], losses["mse"], rtol=1e-6)


def test_cfg_scale_one_is_conditional_and_guides_only_eps_channels():
    rng = np.random.default_rng(3)
    x, table = _normal(rng, (2, 4, 4, 4)), _normal(rng, (1001, 8))
    t, y = jnp.array([10, 20]), jnp.array([3, 7])

    def model_fn(x, t, y):
        return jnp.concatenate([x, x], -1) * 0.1 + table[y][:, None, None, :] + t[:, None, None, None] * 1e-3

    @jax.jit
    def predictions():
        return (
            model_fn(x, t, y),
            model_fn(x, t, jnp.full_like(y, 1000)),
            cfg_model_fn(model_fn, 1.0)(x, t, y),
            cfg_model_fn(model_fn, 4.0)(x, t, y),
            cfg_model_fn(model_fn, 4.0, guided_channels=None)(x, t, y),
        )

    cond, uncond, scale_one, guided, guided_all = predictions()
    np.testing.assert_allclose(scale_one, cond, atol=1e-6)
    np.testing.assert_allclose(guided[..., :3], uncond[..., :3] + 4.0 * (cond[..., :3] - uncond[..., :3]), atol=1e-5)
    np.testing.assert_array_equal(guided[..., 3:], cond[..., 3:])
    np.testing.assert_allclose(
        guided_all[..., :4], uncond[..., :4] + 4.0 * (cond[..., :4] - uncond[..., :4]), atol=1e-5
    )
    np.testing.assert_array_equal(guided_all[..., 4:], cond[..., 4:])


def test_sample_timesteps_uniform_range():
    t = sample_timesteps(jax.random.key(0), 20000)
    assert t.shape == (20000,) and t.dtype == jnp.int32
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert float(t.mean()) == pytest.approx(499.5, rel=0.02)


def test_invalid_timestep_map_rejected():
    diffusion = create_diffusion()
    with pytest.raises(ValueError, match="timestep_map"):
        GaussianDiffusion(diffusion.schedule, np.arange(10))
