"""Configs of the Mosaic GPU kernels: frozen, hashable, validated on creation."""

from __future__ import annotations

import dataclasses
import typing


def _check_tile(name: str, field: str, value, *, lo: int = 64, hi: int = 256) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value % 64 or not lo <= value <= hi:
    raise ValueError(
        f"{name}.{field}={value!r} is not usable: it must be a multiple of 64 in "
        f"[{lo}, {hi}] (a wgmma tile is 64 rows; TMA boxes hold at most 256).")


def _check_int(name: str, field: str, value, lo: int, hi: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    raise ValueError(f"{name}.{field}={value!r} must be an int in [{lo}, {hi}].")


@dataclasses.dataclass(frozen=True)
class MosaicForwardConfig:
  """Forward tiles.

  block_q: query rows per compute warpgroup (64: one wgmma M tile).
  block_kv: keys per pipeline step.
  max_concurrent_steps: K/V shared-memory ring depth (TMA stages, >= 2).
  compute_wgs: compute warpgroups per CTA (1 or 2); a CTA owns
    compute_wgs * block_q rows (one row of the forward work table).
  overlap: within each compute warpgroup, issue QK^T of kv block j with PV
    of block j - 1 and run block j's softmax while PV runs (FA3's
    intra-warpgroup overlap, on top of the ping-pong between warpgroups).
    Opt-in until measured on a GPU (notes/mosaic.md, runs 8 and 16).
  """

  PASS: typing.ClassVar[str] = "forward"

  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2
  compute_wgs: int = 2
  overlap: bool = False

  def __post_init__(self):
    name = type(self).__name__
    _check_tile(name, "block_q", self.block_q, hi=64)
    _check_tile(name, "block_kv", self.block_kv)
    _check_int(name, "max_concurrent_steps", self.max_concurrent_steps, 2, 8)
    _check_int(name, "compute_wgs", self.compute_wgs, 1, 2)
    if not isinstance(self.overlap, bool):
      raise ValueError(f"{name}.overlap={self.overlap!r} must be a bool.")

  @property
  def rows_per_cta(self) -> int:
    return self.block_q * self.compute_wgs


@dataclasses.dataclass(frozen=True)
class MosaicBackwardConfig:
  """Backward tiles.

  block_q / block_kv: the dK/dV kernel's q rows per step and keys per
    compute warpgroup (a CTA owns compute_wgs * block_kv keys).
  dq_block_q / dq_block_kv: the dQ kernel's q rows per compute warpgroup
    (a CTA owns compute_wgs * dq_block_q rows) and keys per step.
  max_concurrent_steps: shared-memory ring depth of both kernels (>= 2).
  compute_wgs: compute warpgroups per CTA of both kernels (1 or 2).
  head_split: 1: each compute warpgroup owns its own block_kv keys (dK/dV)
    or dq_block_q rows (dQ); 2: the two compute warpgroups share one tile
    and each owns half of head_dim's output columns (one computes S and P,
    the other dP and dS, exchanged through shared memory). 2 is what fits
    D256: one warpgroup cannot hold two 64x256 fp32 accumulators.
  fused_dq: False: dQ has its own kernel, each output written once (bitwise
    deterministic). True: the dK/dV kernel also computes dQ = dS K and
    TMA-adds it into an fp32 accumulator (five matmuls instead of seven; the
    order of the adds varies, so it needs ``deterministic=False``). Takes
    block_q 64, head_split 1 and q/k head_dim padded to 64 or 128; the dq_*
    tiles must stay at their defaults (there is no dQ kernel).
  ordered: with fused_dq, the dQ adds into each q block run in a fixed order
    (plan.E_TURN: the kv blocks launched first add first; a grid-wide
    semaphore per (batch, q head, q block) and a writer warp), so dQ is
    bitwise deterministic again; the kv blocks launch lightest first.
  kv_major: the launch order of the dK/dV (or fused) kernel's CTAs: False,
    kv head by kv head (each head's kv blocks heaviest first); True, kv block
    by kv block across all kv heads (heaviest first over the whole grid; a
    scheduling model put it at 1.01x the ideal makespan against 1.24x,
    notes/mosaic.md).
  overlap: the dK/dV (or fused) kernel issues S^T and dP^T together and
    computes P^T while dP^T runs (two wgmma waits a step instead of three;
    FA3's order); head_split=1 only; without a soft cap (with one the
    kernel keeps its three-wait order, which does not spill). Opt-in until
    measured on a GPU.
  """

  PASS: typing.ClassVar[str] = "backward"

  block_q: int = 64
  block_kv: int = 64
  dq_block_q: int = 64
  dq_block_kv: int = 64
  max_concurrent_steps: int = 2
  compute_wgs: int = 2
  head_split: int = 1
  fused_dq: bool = False
  ordered: bool = False
  kv_major: bool = False
  overlap: bool = False

  def __post_init__(self):
    name = type(self).__name__
    for field in ("block_q", "block_kv", "dq_block_q", "dq_block_kv"):
      _check_tile(name, field, getattr(self, field), hi=128)
    _check_int(name, "max_concurrent_steps", self.max_concurrent_steps, 2, 8)
    _check_int(name, "compute_wgs", self.compute_wgs, 1, 2)
    _check_int(name, "head_split", self.head_split, 1, 2)
    if self.head_split == 2 and self.compute_wgs != 2:
      raise ValueError(f"{name}.head_split=2 splits head_dim between two compute warpgroups: "
                       f"it needs compute_wgs=2, got {self.compute_wgs=}.")
    for field in ("fused_dq", "ordered", "kv_major", "overlap"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"{name}.{field}={getattr(self, field)!r} must be a bool.")
    if self.fused_dq:
      if self.head_split != 1 or self.block_q != 64:
        raise ValueError(f"{name}.fused_dq=True takes head_split=1 and block_q=64; got "
                         f"{self.head_split=}, {self.block_q=}.")
      if (self.dq_block_q, self.dq_block_kv) != (64, 64):
        raise ValueError(f"{name}.fused_dq=True has no dQ kernel, so dq_block_q and "
                         f"dq_block_kv mean nothing: leave them at 64; got "
                         f"{self.dq_block_q=}, {self.dq_block_kv=}.")
    if self.overlap and self.head_split != 1:
      raise ValueError(f"{name}.overlap=True is a step order of the head_split=1 kernels; got "
                       f"{self.head_split=}.")
    if self.ordered and not self.fused_dq:
      raise ValueError(f"{name}.ordered=True orders the fused backward's dQ adds: it needs "
                       f"fused_dq=True (the dQ kernel writes each tile once anyway).")

  @property
  def kv_per_cta(self) -> int:
    """Keys of one dK/dV CTA."""
    return self.block_kv * self.compute_wgs // self.head_split

  @property
  def dq_rows_per_cta(self) -> int:
    """Rows of one dQ CTA."""
    return self.dq_block_q * self.compute_wgs // self.head_split


def padded_head_dim(d: int) -> int:
  """The head dim the kernels run at: a multiple of 64 (the 128-byte swizzle's
  width) up to 256, so 192 stays 192 (MLA's q/k) and smaller dims pad to 64."""
  if d > 256:
    raise ValueError(f"Mosaic GPU kernels take head_dim <= 256, got {d=}.")
  return max(64, -(-d // 64) * 64)


# Shared memory one CTA may take (sm_90: 227 KiB), less what Mosaic adds for
# barriers and alignment (128-key forward tiles at D128 with 3 stages need
# 229,376 B of tiles and were refused by 120 B).
SMEM_BYTES = 232448 - 3 * 1024


def forward_smem_bytes(config: MosaicForwardConfig, dqk: int, dv: int, itemsize: int = 2) -> int:
  """Shared memory of the forward kernel at padded widths (dqk, dv): Q tiles
  (O overwrites Q's first dv columns when dv <= dqk, else has its own), the
  K and V rings and the lse rows."""
  rows = config.rows_per_cta
  tiles = rows * dqk + config.max_concurrent_steps * config.block_kv * (dqk + dv)
  if dv > dqk:
    tiles += rows * dv
  return tiles * itemsize + rows * 4


def fused_smem_bytes(config: MosaicBackwardConfig, dqk: int, dv: int, itemsize: int = 2) -> int:
  """Shared memory of the fused backward kernel (config.fused_dq) at padded
  widths (dqk, dv): K, V of every warpgroup, the Q / dO / lse2 / delta ring,
  the 2-step dS^T ring and the f32 dQ staging shares."""
  wgs, bq, bkv = config.compute_wgs, config.block_q, config.block_kv
  stages = config.max_concurrent_steps
  tiles = wgs * bkv * (dqk + dv) + stages * bq * (dqk + dv) + 2 * wgs * bkv * bq
  return tiles * itemsize + stages * bq * 2 * 4 + wgs * bq * DQ_SHARE * 4


def fits_forward(config: MosaicForwardConfig, dqk: int, dv: int) -> bool:
  return forward_smem_bytes(config, dqk, dv) <= SMEM_BYTES


def column_parts(width: int, first: int) -> tuple[int, ...]:
  """A ``width``-column tile as parts [0, first) and [first, width)."""
  return (first, width - first) if 0 < first < width else (width,)


def split_columns(dqk: int, dv: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
  """head_split=2's column parts at padded widths (dqk, dv): (dK/dV kernel's
  q/k parts, its v/dO parts, dQ kernel's first q/k part width).

  Warpgroup 0 computes S (dqk wide), warpgroup 1 dP (dv wide); each then
  accumulates its part of every output. The parts are multiples of 64 (the
  swizzle) that give both warpgroups the same wgmma work: dK/dV, dqk + a + b
  = dv + (dqk - a) + (dv - b); dQ, dqk + a = dv + (dqk - a). Ties go to the
  evener split. (D256: halves of 128; MLA 192/128: 64 | 128 and 64 | 64.)"""
  if min(dqk, dv) < 128:
    raise ValueError(f"MosaicBackwardConfig.head_split=2 needs q/k and v padded head_dims of "
                     f"at least 128 (two parts of 64+ columns for the 128-byte swizzle); got "
                     f"{dqk=}, {dv=}.")
  even = lambda a, w: abs(2 * a - w)
  dkdv = min(((a, b) for a in range(64, dqk, 64) for b in range(64, dv, 64)),
             key=lambda ab: (abs(2 * (ab[0] + ab[1]) - 2 * dv), even(ab[0], dqk) + even(ab[1], dv)))
  dq = min(range(64, dqk, 64), key=lambda a: (abs(2 * a - dv), even(a, dqk)))
  return column_parts(dqk, dkdv[0]), column_parts(dv, dkdv[1]), dq


# The fused backward's dQ share: the columns one compute warpgroup adds per
# step (one 128-byte swizzle of bf16 K, a [block_q, 64] f32 TMA-add box).
DQ_SHARE = 64


def fused_dq_split(dqk: int, wgs: int) -> str:
  """How the fused backward's warpgroups share dQ = dS K at padded q/k width
  ``dqk``: "halves" (each adds DQ_SHARE columns over every warpgroup's keys,
  which it reads from shared memory: dqk == wgs * 64) or "own" (each adds all
  columns over its own keys: dqk == 64)."""
  if dqk == wgs * DQ_SHARE:
    return "halves"
  if dqk == DQ_SHARE:
    return "own"
  raise ValueError(
      f"MosaicBackwardConfig.fused_dq=True takes q/k head_dims padded to 64 or {wgs * DQ_SHARE} "
      f"(each compute warpgroup adds a {DQ_SHARE}-column share of dQ); got {dqk}. Use "
      "fused_dq=False.")


def fused_unfit(config: MosaicBackwardConfig, dqk: int, dv: int) -> str | None:
  """Why the fused backward (config.fused_dq) cannot run at padded widths
  (dqk, dv) (None: it can): dQ shares need q/k at 64 or compute_wgs * 64,
  the two accumulators v at most 128, and the buffers shared memory."""
  try:
    fused_dq_split(dqk, config.compute_wgs)
  except ValueError as e:
    return str(e)
  need = fused_smem_bytes(config, dqk, dv)
  if dv > 128 or need > SMEM_BYTES:
    return (f"MosaicBackwardConfig.fused_dq=True at q/k width {dqk} and v width {dv} needs "
            f"{need} B of shared memory (at most {SMEM_BYTES}) and v's width <= 128; use "
            f"fused_dq=False or fewer stages ({config=}).")
  return None


def tuning_candidates(pass_: str, head_dim: int, mode: str) -> list:
  """Configs the tuner tries (``mode`` "smoke" / "quick" / "full"); the ones that
  cannot fit shared memory at ``head_dim`` are left out."""
  if pass_ == "forward":
    kv = (64, 128) if head_dim <= 128 else (64,)
    grid = [MosaicForwardConfig(64, bkv, stages, wgs) for bkv in kv for stages in (2, 3, 4)
            for wgs in (2, 1)]
    # 128-key tiles with 3+ stages exceed shared memory at D128 (by 120 B).
    grid = [c for c in grid if not (head_dim >= 128 and c.block_kv == 128
                                    and c.max_concurrent_steps > 2)]
    # The intra-warpgroup overlap on the two-stage tiles (opt-in until measured).
    grid += [dataclasses.replace(c, overlap=True) for c in grid
             if c.compute_wgs == 2 and c.max_concurrent_steps == 2]
  else:
    if head_dim <= 128:
      grid = [MosaicBackwardConfig(bq, 64, 64, dkv, stages, w) for bq in (64, 128)
              for dkv in (64, 128) for stages in (2, 3) for w in (2, 1)]
      if head_dim == 128:   # halves of 64 columns: the 128-byte swizzle's width
        grid += [MosaicBackwardConfig(bq, 64, 64, 64, stages, 2, 2) for bq in (64, 128)
                 for stages in (2, 3)]
      # dQ fused into the dK/dV kernel, its adds ordered (deterministic), in both
      # launch orders; the unordered fused kernel is never a default.
      grid += [MosaicBackwardConfig(fused_dq=True, ordered=True, kv_major=kv)
               for kv in (False, True)]
      # S^T and dP^T in flight together: two kernels, and fused with ordered adds.
      grid += [MosaicBackwardConfig(overlap=True),
               MosaicBackwardConfig(fused_dq=True, ordered=True, overlap=True)]
    else:
      # D256: 2 stages of 64-row tiles is all that fits with two warpgroups
      # (K, V 64 KiB + Q, dO 128 KiB + P, dS 32 KiB); one warpgroup takes more.
      grid = [MosaicBackwardConfig(64, 64, 64, 64, 2, 2, 2)]
      grid += [MosaicBackwardConfig(bq, 64, 64, dkv, stages, 1) for bq in (64, 128)
               for dkv in (64, 128) for stages in (2, 3)]
  if mode == "smoke":
    return grid[:1]
  if mode == "quick":
    # Two compute warpgroups only (one was 1.3-1.5x slower everywhere the
    # H100 and H200 tuners measured it): both key tiles and both layouts.
    if pass_ == "backward" and head_dim <= 128:
      return [c for c in grid if c.compute_wgs == 2 and c.block_q == 64]
    overlap = [c for c in grid if c.overlap]
    plain = [c for c in grid if (c.compute_wgs == 2 or head_dim > 128) and c not in overlap]
    return plain[:4] + overlap[:2]
  return grid
