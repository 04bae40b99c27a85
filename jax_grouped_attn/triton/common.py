"""Launch helpers shared by the Triton forward and backward launchers."""

from __future__ import annotations

import jax.numpy as jnp


def input_precision(dtype) -> str:
  """tl.dot's input_precision: IEEE fp32 dots for fp32 inputs (no silent tf32);
  16-bit dots ignore it."""
  return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


def contiguous_strides(shape) -> tuple[int, ...]:
  """Element strides of a row-major array of ``shape``."""
  strides, acc = [], 1
  for n in reversed(shape):
    strides.append(acc)
    acc *= int(n)
  return tuple(reversed(strides))
