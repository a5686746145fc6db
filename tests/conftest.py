"""Test-session setup. Runs before any test module imports jax."""

import importlib.util
import os
import sys

import pytest

# Eight host devices on CPU, so mesh and sharding code runs in tests. XLA reads the flag when jax initialises.
_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _HOST_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_HOST_DEVICES_FLAG}".strip()


def _let_torchvision_import_on_cpu_torch():
    """torchvision (pulled in by pytorch-fid, the FID Inception reference) ships CUDA builds on the registry: with a
    CPU-only PyTorch its compiled ops do not load, and its import then fails registering fake kernels for two of
    them ("operator torchvision::nms does not exist"), which also breaks diffusers (it imports torchvision when
    installed). Its Python modules work without those ops: defining the two op schemas, never called, lets it
    import. Nothing changes where torchvision's ops load."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    import torch

    try:
        import torchvision  # noqa: F401
        return None
    except RuntimeError:
        for name in [name for name in sys.modules if name.startswith("torchvision")]:
            del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return library  # the definitions live as long as this object


_TORCHVISION_OPS = _let_torchvision_import_on_cpu_torch()


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
