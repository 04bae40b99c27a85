"""Heuristic default tiles of the Triton kernels (used when no tuned table entry applies).

Numbers in comments are sm_90 ptxas registers per thread / shared bytes,
causal with segments, from ``devtools/compile_check.py`` (2026-11-24).
"""

from __future__ import annotations

from jax_grouped_attn.config import BackwardConfig, ForwardConfig, padded_head_dim


def _fp32(dtype) -> bool:
  return dtype is not None and str(dtype) == "float32"


def forward_config(head_dim: int, dtype=None) -> ForwardConfig:
  dp = padded_head_dim(head_dim)
  if _fp32(dtype):
    # Triton fp32 dots are exact IEEE FMA dots (no tensor cores) holding whole
    # operand rows in registers: small tiles, or they spill (and 128x128
    # 3-stage K/V tiles exceed H100 shared memory).
    if dp <= 32:
      return ForwardConfig(block_q=128, block_k=32, num_warps=8, num_stages=2)  # 128 / 41088
    if dp <= 64:
      return ForwardConfig(block_q=64, block_k=32, num_warps=8, num_stages=2)   # 208 / 41344
    if dp <= 128:
      return ForwardConfig(block_q=32, block_k=16, num_warps=8, num_stages=2)   # 80 / 35008
    # 32x32 spills 336 B under triton 3.6 at d=256; 32x16 spills under neither.
    return ForwardConfig(block_q=32, block_k=16, num_warps=8, num_stages=2)
  if dp <= 64:
    # 4 warps spill 24 B with segments under triton 3.6; 8 warps spill under neither.
    return ForwardConfig(block_q=128, block_k=64, num_warps=8, num_stages=3)
  if dp <= 128:
    # 128x128x3 needs 262144 B of shared memory with triton 3.6 on the H100
    # (229376 B when compiled by triton 3.9): over the 232448 B limit.
    return ForwardConfig(block_q=128, block_k=64, num_warps=8, num_stages=3)
  # 4 warps spill ~4.5 KB at d=256 under triton 3.6 (164096 B smem with 8 warps).
  return ForwardConfig(block_q=64, block_k=32, num_warps=8, num_stages=3)


def backward_config(head_dim: int, dtype=None) -> BackwardConfig:
  """Spill-free dK/dV and dQ under BOTH triton 3.6 (the GPU image) and 3.9,
  shared memory <= 232448 B (sm_90, causal, with and without segments).

  Triton 3.6 allocates registers worse than 3.9: the shared tiles below
  spill there (3.6 spill bytes, dq): bf16 d128 64x64x8x2 72 B, d256 32x32x8x2
  188 B; fp32 d64 32x32x8x2 (dkdv) 44 B. Comments: max registers per
  thread dK/dV / dQ, triton 3.6 (3.9). block_k = 64 keeps enough dK/dV
  programs when Hk is small (GQA).
  """
  dp = padded_head_dim(head_dim)
  if _fp32(dtype):
    if dp <= 32:
      # 68 / 86 (70 / 69)
      return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)
    if dp <= 64:
      # 108 / 168 (110 / 78)
      return BackwardConfig(block_q=16, block_k=32, num_warps=4, num_stages=2)
    if dp <= 128:
      # 106 / 244 (108 / 109)
      return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)
    # 100 / 175 (100 / 102)
    return BackwardConfig(block_q=16, block_k=16, num_warps=8, num_stages=2)
  # dQ holds q rows and streams keys, dK/dV the reverse: dQ gets its own
  # tiles with the held side large (H100 D128, kernel alone, 2026-11-24:
  # dQ 64x32x4x3 1.62 ms vs 64x64x4x3 1.92 ms).
  if dp <= 64:
    # 249 / 162 (243 / 132)
    return BackwardConfig(block_q=64, block_k=64, num_warps=4, num_stages=3,
                          dq_block_q=128, dq_block_k=64, dq_num_warps=8, dq_num_stages=3)
  if dp <= 128:
    # dK/dV keeps 64-key tiles (wgmma needs 64 rows). 64x64x8x2 (all
    # wgmma) spills 72 B in dQ under 3.6.
    # 204 / 250 (197 / 154)
    return BackwardConfig(block_q=32, block_k=64, num_warps=8, num_stages=3,
                          dq_block_q=64, dq_block_k=32, dq_num_warps=4, dq_num_stages=3)
  # 185 / 253 (172 / 127)
  return BackwardConfig(block_q=16, block_k=32, num_warps=8, num_stages=2)
