"""Which backends can run here, and what "auto" means."""

from __future__ import annotations

import functools
import importlib.util

import jax

BACKENDS = ("auto", "xla", "pallas", "triton")


@functools.lru_cache(maxsize=None)
def _module_available(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def current_platform() -> str:
  """'gpu', 'cpu' or 'tpu' -- the platform computations are placed on by default."""
  return jax.default_backend()


def triton_available() -> bool:
  return _module_available("triton") and _module_available("jax_triton")


def resolve_backend(backend: str, interpret: bool | None) -> tuple[str, bool]:
  """Maps the user's ``backend``/``interpret`` to (concrete backend, interpret).

  On a GPU the kernels are compiled; without one, "pallas" runs in Pallas
  interpret mode and "triton" runs the same @triton.jit kernels under Triton's
  interpreter. "auto" is the fastest kernel on GPU and "xla" elsewhere.
  """
  if not isinstance(backend, str) or backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}.")
  if interpret is not None and not isinstance(interpret, bool):
    raise TypeError(f"interpret must be None or a bool, got {interpret!r}.")
  platform = current_platform()
  if backend == "auto":
    if platform == "gpu":
      backend = "triton" if triton_available() else "pallas"
    else:
      backend = "xla"
  if backend == "xla":
    if interpret:
      raise ValueError("interpret=True has no meaning for backend='xla' (plain jnp).")
    return backend, False
  if platform not in ("gpu", "cpu"):
    raise ValueError(
        f"backend={backend!r} cannot run on platform {platform!r}: its kernels "
        "are Triton kernels for NVIDIA GPUs (interpretable on CPU). Use "
        "backend='xla' here.")
  if backend == "triton" and not triton_available():
    raise ValueError(
        "backend='triton' needs the packages 'triton' and 'jax-triton', which "
        "are not importable here. Install them (pip install jax-triton triton) "
        "or use backend='pallas' or 'xla'.")
  if platform == "cpu":
    if interpret is False:
      raise ValueError(
          f"backend={backend!r} with interpret=False needs a GPU, and JAX sees "
          "none here; leave interpret=None (interpreted on CPU) or use "
          "backend='xla'.")
    return backend, True
  return backend, bool(interpret)
