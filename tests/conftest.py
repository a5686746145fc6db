"""Test-session setup. Runs before any test module imports jax."""

import os

import pytest

# Eight host devices on CPU, so mesh and sharding code runs in tests. XLA reads the flag when jax initialises.
_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _HOST_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_HOST_DEVICES_FLAG}".strip()


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny random diffusers-format VAE folder (64 px -> 8x8x4), built once for the encode and latent tests."""
    from test_encode import write_tiny_vae

    return write_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="session")
def encoded(tmp_path_factory, vae_dir):
    """A "shapes" split encoded once with `vae_dir` (read only: tests that change it work on copies)."""
    from test_encode import encode_config

    from dig_jax import encode

    out = str(tmp_path_factory.mktemp("latents"))
    encode.run(encode_config(vae_dir), out)
    return out
