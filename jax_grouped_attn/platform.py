"""Facts about this machine: the default platform and importable packages."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import warnings

import jax

GPU_INSTALL_HINT = ('pip install -e ".[cuda,test,flax,bench]"  (or: pip install "jax[cuda13]")')


@functools.lru_cache(maxsize=None)
def module_available(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def current_platform() -> str:
  """'gpu', 'cpu' or 'tpu' -- the platform computations are placed on by default."""
  return jax.default_backend()


def triton_available() -> bool:
  return module_available("triton") and module_available("jax_triton")


def system_gpus() -> list[str]:
  """NVIDIA GPUs the operating system shows (driver device files), whatever JAX sees."""
  return sorted(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))


_WARNED = []


def warn_if_gpu_unused() -> bool:
  """Warns once per process when the system shows an NVIDIA GPU but JAX has
  no GPU backend (a CPU-only jaxlib: everything would run on the CPU, the
  kernels in interpret mode). Returns whether it warned now."""
  if _WARNED or os.environ.get("JAX_GROUPED_ATTN_NO_GPU_WARNING"):
    return False
  gpus = system_gpus()
  if not gpus or current_platform() == "gpu":
    return False
  _WARNED.append(True)
  warnings.warn(
      f"An NVIDIA GPU is visible to this system ({gpus[0]}) but JAX's platform is "
      f"{current_platform()!r}: jaxlib has no CUDA backend here, so attention runs on the CPU "
      f"(kernels interpreted, very slow). Install the CUDA build: {GPU_INSTALL_HINT}. "
      "Set JAX_GROUPED_ATTN_NO_GPU_WARNING=1 to silence this.", RuntimeWarning, stacklevel=3)
  return True
