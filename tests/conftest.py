"""Test-wide setup. Every test process sees 8 fake CPU devices, so the mesh tests run
alongside the single-device ones (which use device 0). It must be set before jax loads."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
