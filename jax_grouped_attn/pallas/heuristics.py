"""Heuristic default tiles of the Triton-lowered Pallas kernels (when no tuned
table entry applies)."""

from __future__ import annotations

from jax_grouped_attn.config import BackwardConfig, ForwardConfig, padded_head_dim


def forward_config(head_dim: int, dtype=None) -> ForwardConfig:
  del dtype  # Pallas fp32 dots fit the same tiles (measured on the H100 suite)
  dp = padded_head_dim(head_dim)
  if dp <= 64:
    return ForwardConfig(block_q=128, block_k=64, num_warps=4, num_stages=3)
  if dp <= 128:
    # H100, S8192 H32 D128 bf16 causal: (128,128,8,3) 1.40 ms,
    # (128,64,8,3) 1.44 ms, (128,64,8,2) 1.89 ms (2026-11-24).
    return ForwardConfig(block_q=128, block_k=128, num_warps=8, num_stages=3)
  return ForwardConfig(block_q=64, block_k=32, num_warps=4, num_stages=2)


def backward_config(head_dim: int, dtype=None) -> BackwardConfig:
  dp = padded_head_dim(head_dim)
  if dtype is not None and str(dtype) == "float32":
    # IEEE fp32 dots (no tensor cores) hold operand rows in registers: the
    # 16-bit tiles spill heavily. sm_90 registers per thread, dK/dV / dQ:
    if dp <= 128:
      return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)  # 108 / 109
    return BackwardConfig(block_q=16, block_k=16, num_warps=8, num_stages=2)    # 90 / 92
  if dp <= 64:
    return BackwardConfig(block_q=64, block_k=64, num_warps=4, num_stages=3)
  if dp <= 128:
    return BackwardConfig(block_q=64, block_k=64, num_warps=8, num_stages=2)
  return BackwardConfig(block_q=32, block_k=32, num_warps=8, num_stages=2)
