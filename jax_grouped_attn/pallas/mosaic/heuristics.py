"""Heuristic default tiles of the Mosaic GPU kernels (when no tuned table entry applies)."""

from __future__ import annotations

from jax_grouped_attn.pallas.mosaic.config import (
  MosaicBackwardConfig,
  MosaicForwardConfig,
  fits_forward,
  padded_head_dim,
)


def _widths(head_dim: int, head_dim_v: int | None) -> tuple[int, int]:
  """The padded (q/k, v) widths the kernels run at."""
  return padded_head_dim(head_dim), padded_head_dim(head_dim_v or head_dim)


def forward_config(head_dim: int, dtype=None, head_dim_v: int | None = None
                   ) -> MosaicForwardConfig:
  """Heuristic forward tiles for an H100: 128-key tiles where two stages of
  them fit shared memory at the padded widths of q/k and v, else 64.

  H100, causal Hq32 Hk8 bf16, S=8192, vs cuDNN in the same run (notes/mosaic.md):
  D128 (64, 128, 2, 2) 1.046-1.059x, (64, 64, 3, 2) 0.85x, (64, 128, 3, 2)
  exceeds shared memory by 120 B; D64 0.965x; D256 (64, 64, 2, 2) 0.981x.
  """
  del dtype   # bf16 and f16 only, one tiling
  dqk, dv = _widths(head_dim, head_dim_v)
  wide = MosaicForwardConfig(block_q=64, block_kv=128, max_concurrent_steps=2, compute_wgs=2)
  if fits_forward(wide, dqk, dv):
    return wide
  return MosaicForwardConfig(block_q=64, block_kv=64, max_concurrent_steps=2, compute_wgs=2)


def backward_config(head_dim: int, dtype=None, head_dim_v: int | None = None
                    ) -> MosaicBackwardConfig:
  """Heuristic backward tiles for an H100: one warpgroup per tile up to
  padded width 128; above it, when both q/k and v are 128+ wide, the two
  warpgroups share one tile (head_split=2, config.split_columns).

  H100, D128 S=8192 fwd+bwd vs cuDNN (notes/mosaic.md): the default 0.913-0.922x;
  block_q=128 0.75x, dq_block_kv=128 0.91x, 3 stages 0.90x. At D256 two
  warpgroups fit shared memory only sharing one tile: head_split=2, 2.02x the
  one-warpgroup layout on the H200 tuner (notes/mosaic.md run 12).
  """
  del dtype
  dqk, dv = _widths(head_dim, head_dim_v)
  if max(dqk, dv) <= 128 or min(dqk, dv) < 128:
    return MosaicBackwardConfig()
  return MosaicBackwardConfig(compute_wgs=2, head_split=2)
