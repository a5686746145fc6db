"""dig_jax.vae: parity with diffusers' PyTorch AutoencoderKL, checkpoint mapping and loader errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dig_jax.vae import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AutoencoderKLConfig,
    DiagonalGaussian,
    diffusers_param_shapes,
    load_vae,
    read_vae_config,
    vae_from_state_dict,
)

# config.json of stabilityai/sd-vae-ft-ema (identical architecture for sd-vae-ft-mse).
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SMALL_CONFIG = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "scaling_factor": 0.5,
}

# Three blocks, two resnets per block, odd channel counts, no mid-block attention and no quant_conv.
NO_ATTENTION_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 2,
    "out_channels": 1,
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "latent_channels": 3,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
}

LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _to_legacy_key(key):
    return re.sub(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".attentions.0.{LEGACY_NAMES[m[1]]}.",
                  key)


def _write_folder(folder, config, state_dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    save_file(state_dict, str(folder / WEIGHTS_FILE))
    return folder


def _random_state_dict(config, seed=0):
    rng = np.random.default_rng(seed)
    shapes = diffusers_param_shapes(AutoencoderKLConfig.from_diffusers(config))
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in shapes.items()}


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers (PyTorch, random weights).


def _randomised_torch_vae(config, seed):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):  # default affine is (1, 0): make it non-trivial
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                module.bias.copy_(0.3 * torch.randn_like(module.bias))
            elif getattr(module, "bias", None) is not None:
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return model


def _torch_reference(model, image_nhwc, latent_nhwc):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(image_nhwc).permute(0, 3, 1, 2)).latent_dist
        decoded = model.decode(torch.from_numpy(latent_nhwc).permute(0, 3, 1, 2)).sample
    return tuple(t.permute(0, 2, 3, 1).numpy() for t in (posterior.mean, posterior.logvar, decoded))


@nnx.jit
def _encode_and_decode(vae, image, latent):
    """One compilation per config (the legacy-name case reuses the current-name one's)."""
    return vae.encode(image), vae.decode(latent)


def _check_parity(vae, model, config, spatial=16, batch=2):
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (batch, spatial, spatial, config.get("in_channels", 3))).astype(np.float32)
    latent = rng.normal(size=(batch, spatial // factor, spatial // factor, config["latent_channels"]))
    latent = latent.astype(np.float32)
    want_mean, want_logvar, want_image = _torch_reference(model, image, latent)

    posterior, decoded = _encode_and_decode(vae, image, latent)
    assert decoded.shape == want_image.shape
    # Sanity: the reference is not degenerate (a trivially small output would make the tolerance meaningless).
    assert np.abs(want_image).max() > 0.1 and np.abs(want_mean).max() > 0.1
    np.testing.assert_allclose(posterior.mean, want_mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(posterior.logvar, want_logvar, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decoded, want_image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("legacy_names", [False, True], ids=["to_q_names", "legacy_query_names"])
def test_parity_with_diffusers(tmp_path, legacy_names):
    model = _randomised_torch_vae(SMALL_CONFIG, seed=0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    if legacy_names:
        state = load_file(str(tmp_path / WEIGHTS_FILE))
        renamed = {_to_legacy_key(k): v for k, v in state.items()}
        assert sum(k != _to_legacy_key(k) for k in state) == 16  # 4 projections x (weight, bias) x 2 mid blocks
        save_file(renamed, str(tmp_path / WEIGHTS_FILE))

    vae = load_vae(tmp_path)
    assert vae.scaling_factor == 0.5
    _check_parity(vae, model, SMALL_CONFIG)


def test_parity_without_attention_or_quant_conv(tmp_path):
    model = _randomised_torch_vae(NO_ATTENTION_CONFIG, seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    vae = load_vae(tmp_path)
    assert vae.quant_conv is None and vae.decoder.mid_block.attention is None
    _check_parity(vae, model, NO_ATTENTION_CONFIG)


def test_sd_vae_config_maps_every_diffusers_key(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(SD_VAE_CONFIG))
    config = read_vae_config(tmp_path)
    assert config.scaling_factor == 0.18215 and config.block_out_channels == (128, 256, 512, 512)

    with torch.device("meta"):  # shapes only: no 335 MB of weights
        model = diffusers.AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")})
    want = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert diffusers_param_shapes(config) == want
    assert sum(int(np.prod(shape)) for shape in want.values()) == 83_653_863


# ----------------------------------------------------------------------------------------------------------------
# Loader behaviour without PyTorch.


def test_legacy_conv_shaped_attention_weights_load_like_linear_ones(tmp_path):
    state = _random_state_dict(SMALL_CONFIG)
    conv_shaped = {_to_legacy_key(k): (v[:, :, None, None] if v.ndim == 2 else v) for k, v in state.items()}
    assert any(k.endswith("proj_attn.weight") and v.ndim == 4 for k, v in conv_shaped.items())
    config = AutoencoderKLConfig.from_diffusers(SMALL_CONFIG)
    want = nnx.state(vae_from_state_dict(config, state), nnx.Param)
    got = nnx.state(load_vae(_write_folder(tmp_path, SMALL_CONFIG, conv_shaped)), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_conv_weights_are_transposed_not_flipped():
    state = _random_state_dict(SMALL_CONFIG)
    vae = vae_from_state_dict(AutoencoderKLConfig.from_diffusers(SMALL_CONFIG), state)
    oihw = state["encoder.conv_in.weight"]
    hwio = np.asarray(vae.encoder.conv_in.kernel[...])
    assert hwio[0, 2, 1, 5] == oihw[5, 1, 0, 2]
    linear = state["encoder.mid_block.attentions.0.to_q.weight"]
    np.testing.assert_array_equal(vae.encoder.mid_block.attention.to_q.kernel[...], linear.T)


def test_compute_dtype_keeps_float32_params_and_posterior():
    config = AutoencoderKLConfig.from_diffusers(SMALL_CONFIG)
    vae = vae_from_state_dict(config, _random_state_dict(SMALL_CONFIG), dtype=jnp.bfloat16)
    image = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    posterior, decoded = nnx.eval_shape(_encode_and_decode, vae, image, jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32))
    assert posterior.mean.dtype == jnp.float32 and posterior.mean.shape == (1, 8, 8, 4)
    assert decoded.dtype == jnp.bfloat16 and decoded.shape == (1, 16, 16, 3)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(vae, nnx.Param))} == {jnp.dtype(jnp.float32)}


@jax.jit
def _posterior_and_sample(moments, key):
    posterior = DiagonalGaussian.from_moments(moments)
    return posterior, posterior.sample(key)


def test_diagonal_gaussian_clamps_logvar_and_samples():
    mean = np.broadcast_to(np.arange(4.0, dtype=np.float32), (2, 32, 32, 4))
    logvar = np.full((2, 32, 32, 4), np.log(0.25), np.float32)
    logvar[0, 0, 0, :2] = [-100.0, 100.0]
    posterior, sample = _posterior_and_sample(np.concatenate([mean, logvar], axis=-1), jax.random.key(0))

    np.testing.assert_array_equal(posterior.mode(), mean)
    expected = np.array([-30, 20, np.log(0.25), np.log(0.25)], np.float32)
    np.testing.assert_array_equal(posterior.logvar[0, 0, 0], expected)
    noise = (sample[1] - mean[1]) / 0.5  # std = exp(0.5 * log(0.25))
    assert abs(float(noise.mean())) < 0.03 and abs(float(noise.std()) - 1) < 0.03
    _, other_sample = _posterior_and_sample(np.concatenate([mean, logvar], axis=-1), jax.random.key(1))
    assert not np.allclose(sample, other_sample)


# ----------------------------------------------------------------------------------------------------------------
# Errors.


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _random_state_dict(SMALL_CONFIG)
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing keys \['decoder.conv_out.bias'\].*unexpected keys "
                                         r"\['decoder.extra.weight'\]"):
        load_vae(_write_folder(tmp_path, SMALL_CONFIG, state))


def test_only_missing_key_is_reported(tmp_path):
    state = _random_state_dict(SMALL_CONFIG)
    del state["encoder.mid_block.attentions.0.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['encoder.mid_block.attentions.0.to_k.weight'\], "
                                         r"unexpected keys \[\]"):
        load_vae(_write_folder(tmp_path, SMALL_CONFIG, state))


def test_wrong_shape_is_rejected(tmp_path):
    state = _random_state_dict(SMALL_CONFIG)
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].transpose(2, 3, 1, 0).copy()
    with pytest.raises(ValueError, match="'encoder.conv_in.weight' has shape"):
        load_vae(_write_folder(tmp_path, SMALL_CONFIG, state))


def test_legacy_and_current_name_for_the_same_parameter_is_rejected(tmp_path):
    state = _random_state_dict(SMALL_CONFIG)
    state["decoder.mid_block.attentions.0.query.bias"] = state["decoder.mid_block.attentions.0.to_q.bias"]
    with pytest.raises(ValueError, match="both"):
        load_vae(_write_folder(tmp_path, SMALL_CONFIG, state))


def test_pytorch_pickle_only_folder_explains_conversion(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps(SMALL_CONFIG))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safe_serialization=True"):
        load_vae(tmp_path)


def test_half_precision_checkpoints_load_as_float32(tmp_path):
    state = _random_state_dict(SMALL_CONFIG)
    for dtype in (np.float16, jnp.bfloat16):
        stored = {k: v.astype(dtype) for k, v in state.items()}
        vae = load_vae(_write_folder(tmp_path / np.dtype(dtype).name, SMALL_CONFIG, stored))
        kernel = vae.decoder.conv_out.kernel[...]
        assert kernel.dtype == jnp.float32
        expected = stored["decoder.conv_out.weight"].astype(np.float32).transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(kernel, expected)


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_vae(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(SMALL_CONFIG))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_vae(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),
    ("act_fn", "gelu"),
    ("_class_name", "AutoencoderTiny"),
    ("norm_type", "spatial"),
    ("norm_num_groups", 12),
])
def test_unsupported_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        AutoencoderKLConfig.from_diffusers({**SMALL_CONFIG, key: value})
