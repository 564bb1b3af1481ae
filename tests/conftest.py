"""Test-wide setup: eight virtual CPU devices, so every mesh layout can be exercised on one host.

The flag must be in the environment before jax initialises its backends; conftest.py is imported by
pytest before any test module, so the order of imports inside the test modules cannot break it.

libtpu is installed for tests/test_tpu_compile.py, which compiles for libtpu's compile-only TPU
devices. The suite runs on the CPU platform all the same (``JAX_PLATFORMS=cpu``, inherited by the
commands the tests start), and compile-only use needs neither the GCE metadata server nor libtpu's
one-process lock (two test workers compile side by side).

Commands started by the tests write their log files into one temporary folder of the session.
"""

import os

import pytest

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} {_DEVICE_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(autouse=True, scope="session")
def _command_log_dir(tmp_path_factory):
  """Log files of the commands run in-process or as subprocesses go under the session's tmp."""
  os.environ["MEDLLAMA_LOG_DIR"] = str(tmp_path_factory.mktemp("command_logs"))
