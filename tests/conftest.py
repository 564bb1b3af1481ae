"""Test-wide setup: eight virtual CPU devices, so every mesh layout can be exercised on one host.

The flag must be in the environment before jax initialises its backends; conftest.py is imported by
pytest before any test module, so the order of imports inside the test modules cannot break it.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} {_DEVICE_FLAG}".strip()
