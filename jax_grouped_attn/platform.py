"""Facts about this machine: the default platform and importable packages."""

from __future__ import annotations

import functools
import importlib.util

import jax


@functools.lru_cache(maxsize=None)
def module_available(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def current_platform() -> str:
  """'gpu', 'cpu' or 'tpu' -- the platform computations are placed on by default."""
  return jax.default_backend()


def triton_available() -> bool:
  return module_available("triton") and module_available("jax_triton")
