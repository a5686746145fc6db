"""Test-session setup. Runs before any test module imports jax."""

import os

# Eight host devices on CPU, so mesh and sharding code runs in tests. XLA reads the flag when jax initialises.
_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _HOST_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_HOST_DEVICES_FLAG}".strip()
