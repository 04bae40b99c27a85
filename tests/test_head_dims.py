"""Every supported head_dim (multiples of 8 in [8, 256]) on every backend that
runs here: forward and gradients against the fp32 reference (xla itself, the
Triton kernels and the Triton-lowered Pallas kernels, interpreted on CPU), and
the Mosaic GPU kernels lowered for CUDA at small dims (they pad to 64).

Kernels pad head_dim inside (config.padded_head_dim: a power of two >= 16, so
Triton dots get K, N >= 16; Mosaic: 64, 128 or 256).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from cases import KERNEL_BACKENDS, Case, check_forward, check_grads
from jax_grouped_attn import validate
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.pallas.mosaic.backend import PALLAS_MOSAIC
from jax_grouped_attn.plan import Problem

HEAD_DIMS = list(range(validate.MIN_HEAD_DIM, validate.MAX_HEAD_DIM + 1, 8))
# Small, but two q blocks and two kv blocks of the SMALL tiles, causal with an
# offset, GQA: float32 keeps the interpreted kernels' runtime low.
BASE = Case("head_dim", (QueryGroup(0, 20, 4, 24),), 24, hq=2, hk=1, batch=1)
# The kernels run every dim; "xla" is the reference itself, so a few dims
# show that validation and the reference accept them.
PARAMS = ([(d, "xla") for d in (8, 16, 24, 40, 256)]
          + [(d, b) for b in KERNEL_BACKENDS if b != "pallas_mosaic" for d in HEAD_DIMS])


def test_range():
  assert HEAD_DIMS[0] == 8 and HEAD_DIMS[-1] == 256 and len(HEAD_DIMS) == 32


@pytest.mark.parametrize("d,backend", PARAMS, ids=[f"{b}-d{d}" for d, b in PARAMS])
def test_head_dim_forward_and_grads(d, backend):
  case = dataclasses.replace(BASE, name=f"head_dim_{d}", d=d)
  check_forward(case, backend)
  check_grads(case, backend)


@pytest.mark.parametrize("d", [8, 24, 56])
def test_mosaic_lowers_at_small_head_dims(d):
  p = Problem((QueryGroup(0, 64, 0, 64),), 1, 64, 64, 2, 1, d, True, 1 / math.sqrt(d), False)
  assert PALLAS_MOSAIC.padded_head_dim(d) == 64
  ks = jax.random.split(jax.random.key(d), 4)
  q = jax.random.normal(ks[0], (1, 64, 2, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, 64, 1, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, 64, 1, d), jnp.bfloat16)
  lower = lambda fn, *a: jax.jit(fn).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
  text = lower(lambda q, k, v: PALLAS_MOSAIC.forward(p, None, False, q, k, v, None, None),
               q, k, v)
  assert "mosaic_gpu" in text
  lse = jax.ShapeDtypeStruct((1, 2, 64), jnp.float32)
  text = lower(lambda q, k, v, o, l, do, dl: PALLAS_MOSAIC.backward(
      p, None, False, q, k, v, None, None, o, l, do, dl), q, k, v, q, lse, q, lse)
  assert text.count("mosaic_gpu") >= 2


# On a GPU: compiled kernels (Mosaic included) at the dims that pad the most
# and odd multiples of 8, in bf16 (what Mosaic takes), with a sliding window
# case too.
GPU_DIMS = [8, 16, 24, 40, 56, 72, 136, 200]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d", GPU_DIMS)
def test_head_dim_on_gpu(d, backend):
  for window in (None, (5, 0)):
    case = dataclasses.replace(BASE, name=f"head_dim_{d}_gpu", d=d, dtype=jnp.bfloat16,
                               hq=4, hk=2, batch=2, window=window)
    check_forward(case, backend, config=None)
    check_grads(case, backend, config=None)
