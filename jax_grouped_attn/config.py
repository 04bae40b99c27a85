"""Kernel configurations: one frozen, hashable dataclass per pass.

Heuristic defaults live in :func:`default_forward_config` /
:func:`default_backward_config`; tuned tables (per GPU) are read by
``jax_grouped_attn.tuning`` and kept apart from the kernels.
"""

from __future__ import annotations

import dataclasses
import typing


def _is_pow2(x: int) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x > 0 and (x & (x - 1)) == 0


class Tiles(typing.NamedTuple):
  """One kernel's tiles and launch parameters."""

  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
  """Tile sizes and launch parameters of the forward kernel.

  block_q: query rows per program (power of two, >= 16).
  block_k: keys per inner-loop step (power of two, >= 16).
  num_warps / num_stages: Triton launch parameters (GPU only).
  """

  block_q: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    _check_blocks(type(self).__name__, self)


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
  """Tile sizes of the backward kernels.

  block_q: query rows per inner step of dK/dV (and per program of dQ, unless
    dq_block_q is set).
  block_k: keys per program of dK/dV (and per inner step of dQ, unless
    dq_block_k is set).
  num_warps / num_stages: launch parameters of dK/dV (and dQ, unless set).
  dq_block_q, dq_block_k, dq_num_warps, dq_num_stages: the dQ kernel's own
    tiles; None takes the dK/dV value. The dK/dV kernel holds a key tile and
    streams query tiles, dQ the reverse, so each wants its held tile large.
  """

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  dq_block_q: int | None = None
  dq_block_k: int | None = None
  dq_num_warps: int | None = None
  dq_num_stages: int | None = None

  def __post_init__(self):
    _check_blocks(type(self).__name__, self)
    _check_blocks(type(self).__name__, self.dq, prefix="dq_")

  @property
  def dkdv(self) -> "Tiles":
    """The dK/dV (and delta) kernels' tiles and launch parameters."""
    return Tiles(self.block_q, self.block_k, self.num_warps, self.num_stages)

  @property
  def dq(self) -> "Tiles":
    """The dQ kernel's tiles and launch parameters (Nones filled in)."""
    pick = lambda own, shared: shared if own is None else own
    return Tiles(pick(self.dq_block_q, self.block_q), pick(self.dq_block_k, self.block_k),
                 pick(self.dq_num_warps, self.num_warps),
                 pick(self.dq_num_stages, self.num_stages))


def _check_blocks(name, cfg, prefix: str = "") -> None:
  for field in ("block_q", "block_k"):
    value = getattr(cfg, field)
    if not _is_pow2(value) or value < 16 or value > 256:
      raise ValueError(
          f"{name}.{prefix}{field}={value!r} is not usable: it must be a power of two "
          "in [16, 256] (Triton tiles and tensor-core dots need that).")
  if isinstance(cfg.num_warps, bool) or cfg.num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(
        f"{name}.{prefix}num_warps={cfg.num_warps!r} must be one of 1, 2, 4, 8, 16.")
  if isinstance(cfg.num_stages, bool) or not isinstance(cfg.num_stages, int) or not 1 <= cfg.num_stages <= 8:
    raise ValueError(f"{name}.{prefix}num_stages={cfg.num_stages!r} must be an int in [1, 8].")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Per-pass configs; ``None`` fields take the heuristic/tuned default."""

  forward: ForwardConfig | None = None
  backward: BackwardConfig | None = None

  def __post_init__(self):
    if self.forward is not None and not isinstance(self.forward, ForwardConfig):
      raise TypeError(f"AttentionConfig.forward must be a ForwardConfig, got {self.forward!r}.")
    if self.backward is not None and not isinstance(self.backward, BackwardConfig):
      raise TypeError(f"AttentionConfig.backward must be a BackwardConfig, got {self.backward!r}.")


def as_attention_config(config) -> AttentionConfig:
  """Accepts None, a ForwardConfig, a BackwardConfig or an AttentionConfig."""
  if config is None:
    return AttentionConfig()
  if isinstance(config, AttentionConfig):
    return config
  if isinstance(config, ForwardConfig):
    return AttentionConfig(forward=config)
  if isinstance(config, BackwardConfig):
    return AttentionConfig(backward=config)
  raise TypeError(
      f"config must be None, ForwardConfig, BackwardConfig or AttentionConfig, "
      f"got {type(config).__name__}.")


def padded_head_dim(d: int) -> int:
  """Kernels tile head_dim by a power of two; 80 -> 128, 96 -> 128, 192 -> 256."""
  p = 16
  while p < d:
    p *= 2
  return p


def default_forward_config(head_dim: int, backend: str, seq_len: int | None = None,
                           dtype=None) -> ForwardConfig:
  """This GPU's tuned forward tiles (``jax_grouped_attn.tuning``), else a
  heuristic for an H100-class GPU. ``seq_len`` (the key length) and ``dtype``
  pick the table's bucket; None takes its best-overall entry."""
  from jax_grouped_attn import tuning  # noqa: PLC0415 (tuning imports this module)
  tuned = tuning.tuned_config("forward", head_dim, backend, seq_len=seq_len, dtype=dtype)
  if tuned is not None:
    return tuned
  dp = padded_head_dim(head_dim)
  if backend == "triton" and dtype is not None and str(dtype) == "float32":
    # Triton fp32 dots are exact IEEE FMA dots (no tensor cores) holding whole
    # operand rows in registers: small tiles, or they spill (and 128x128
    # 3-stage K/V tiles exceed H100 shared memory). sm_90 ptxas registers /
    # shared bytes, causal with segments (triton/compile_check.py, 2026-11-24):
    if dp <= 32:
      return ForwardConfig(block_q=128, block_k=32, num_warps=8, num_stages=2)  # 128 / 41088
    if dp <= 64:
      return ForwardConfig(block_q=64, block_k=32, num_warps=8, num_stages=2)   # 208 / 41344
    if dp <= 128:
      return ForwardConfig(block_q=32, block_k=16, num_warps=8, num_stages=2)   # 80 / 35008
    # 32x32 spills 336 B under triton 3.6 at d=256; 32x16 spills under neither.
    return ForwardConfig(block_q=32, block_k=16, num_warps=8, num_stages=2)
  if dp <= 64:
    if backend == "triton":
      # 4 warps spill 24 B with segments under triton 3.6; 8 warps spill under neither.
      return ForwardConfig(block_q=128, block_k=64, num_warps=8, num_stages=3)
    return ForwardConfig(block_q=128, block_k=64, num_warps=4, num_stages=3)
  if dp <= 128:
    if backend == "triton":
      # 128x128x3 needs 262144 B of shared memory with triton 3.6 on the H100
      # (229376 B when compiled by triton 3.9): over the 232448 B limit.
      return ForwardConfig(block_q=128, block_k=64, num_warps=8, num_stages=3)
    # H100, S8192 H32 D128 bf16 causal, Pallas: (128,128,8,3) 1.40 ms,
    # (128,64,8,3) 1.44 ms, (128,64,8,2) 1.89 ms (2026-11-24).
    return ForwardConfig(block_q=128, block_k=128, num_warps=8, num_stages=3)
  if backend == "triton":
    # 4 warps spill ~4.5 KB at d=256 under triton 3.6 (164096 B smem with 8 warps).
    return ForwardConfig(block_q=64, block_k=32, num_warps=8, num_stages=3)
  return ForwardConfig(block_q=64, block_k=32, num_warps=4, num_stages=2)


def default_backward_config(head_dim: int, backend: str, seq_len: int | None = None,
                            dtype=None) -> BackwardConfig:
  """This GPU's tuned backward tiles, else the heuristic (as the forward).

  The heuristic tiles compile the Triton dK/dV and dQ kernels for sm_90
  without register spills (ptxas -v, triton 3.6 and 3.9, causal: see
  triton/compile_check.py); block_k = 64 keeps enough dK/dV programs when Hk
  is small (GQA).
  """
  from jax_grouped_attn import tuning  # noqa: PLC0415
  tuned = tuning.tuned_config("backward", head_dim, backend, seq_len=seq_len, dtype=dtype)
  if tuned is not None:
    return tuned
  dp = padded_head_dim(head_dim)
  fp32 = dtype is not None and str(dtype) == "float32"
  if backend == "triton":
    # Spill-free dK/dV and dQ under BOTH triton 3.6 (the GPU image) and 3.9,
    # shared memory <= 232448 B (triton/compile_check.py, sm_90, causal, with
    # and without segments). Triton 3.6 allocates registers worse than 3.9:
    # the shared tiles below spill there (3.6 spill bytes, dq): bf16 d128
    # 64x64x8x2 72 B, d256 32x32x8x2 188 B; fp32 d64 32x32x8x2 (dkdv) 44 B.
    # Max registers per thread dK/dV / dQ, triton 3.6 (3.9):
    if fp32:
      if dp <= 32:
        return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)  # 68 / 86 (70 / 69)
      if dp <= 64:
        return BackwardConfig(block_q=16, block_k=32, num_warps=4, num_stages=2)  # 108 / 168 (110 / 78)
      if dp <= 128:
        return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)  # 106 / 244 (108 / 109)
      return BackwardConfig(block_q=16, block_k=16, num_warps=8, num_stages=2)    # 100 / 175 (100 / 102)
    # dQ holds q rows and streams keys, dK/dV the reverse: dQ gets its own
    # tiles with the held side large (H100 D128, kernel alone, 2026-11-24:
    # dQ 64x32x4x3 1.62 ms vs 64x64x4x3 1.92 ms).
    if dp <= 64:
      return BackwardConfig(block_q=64, block_k=64, num_warps=4, num_stages=3,    # 249 / 162 (243 / 132)
                            dq_block_q=128, dq_block_k=64, dq_num_warps=8, dq_num_stages=3)
    if dp <= 128:
      # dK/dV keeps 64-key tiles (wgmma needs 64 rows). 64x64x8x2 (all
      # wgmma) spills 72 B in dQ under 3.6.
      return BackwardConfig(block_q=32, block_k=64, num_warps=8, num_stages=3,    # 204 / 250 (197 / 154)
                            dq_block_q=64, dq_block_k=32, dq_num_warps=4, dq_num_stages=3)
    return BackwardConfig(block_q=16, block_k=32, num_warps=8, num_stages=2)      # 185 / 253 (172 / 127)
  if fp32:
    # IEEE fp32 dots (no tensor cores) hold operand rows in registers: the
    # 16-bit tiles spill heavily. Small tiles always compile.
    # sm_90 registers per thread, dK/dV / dQ, no spills:
    if dp <= 128:
      return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)  # 108 / 109
    return BackwardConfig(block_q=16, block_k=16, num_warps=8, num_stages=2)    # 90 / 92
  if dp <= 64:
    return BackwardConfig(block_q=64, block_k=64, num_warps=4, num_stages=3)
  if dp <= 128:
    return BackwardConfig(block_q=64, block_k=64, num_warps=8, num_stages=2)
  return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)
