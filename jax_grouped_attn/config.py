"""Kernel configurations: frozen, hashable dataclasses, and the per-call holder.

Each kernel backend declares the config classes it takes (one per pass, see
``jax_grouped_attn.registry``). :class:`ForwardConfig` / :class:`BackwardConfig`
describe Triton-style tiles (power-of-two blocks, warps, stages) and are taken by
the Triton kernels and the Triton-lowered Pallas kernels; other kernel families
bring their own classes. Heuristic defaults live beside each backend's kernels;
per-GPU tuned tables are read by ``jax_grouped_attn.tuning``.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing

PASSES = ("forward", "backward")


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
  """Tile sizes and launch parameters of a Triton-style forward kernel.

  block_q: query rows per program (power of two, >= 16).
  block_k: keys per inner-loop step (power of two, >= 16).
  num_warps / num_stages: Triton launch parameters (GPU only).
  """

  PASS: typing.ClassVar[str] = "forward"

  block_q: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    _check_blocks(type(self).__name__, self)


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
  """Tile sizes of the Triton-style backward kernels.

  block_q: query rows per inner step of dK/dV (and per program of dQ, unless
    dq_block_q is set).
  block_k: keys per program of dK/dV (and per inner step of dQ, unless
    dq_block_k is set).
  num_warps / num_stages: launch parameters of dK/dV (and dQ, unless set).
  dq_block_q, dq_block_k, dq_num_warps, dq_num_stages: the dQ kernel's own
    tiles; None takes the dK/dV value. The dK/dV kernel holds a key tile and
    streams query tiles, dQ the reverse, so each wants its held tile large.
  """

  PASS: typing.ClassVar[str] = "backward"

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

  def normalized(self) -> "BackwardConfig":
    """The same kernels' config with the dQ fields spelled out (None filled in)."""
    return dataclasses.replace(self, **{f"dq_{k}": v for k, v in self.dq._asdict().items()
                                        if k != "block_k"}, dq_block_k=self.dq.block_k)

  @property
  def dkdv(self) -> Tiles:
    """The dK/dV (and delta) kernels' tiles and launch parameters."""
    return Tiles(self.block_q, self.block_k, self.num_warps, self.num_stages)

  @property
  def dq(self) -> Tiles:
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
  if (isinstance(cfg.num_stages, bool) or not isinstance(cfg.num_stages, int)
      or not 1 <= cfg.num_stages <= 8):
    raise ValueError(f"{name}.{prefix}num_stages={cfg.num_stages!r} must be an int in [1, 8].")


def config_pass(cfg) -> str | None:
  """"forward" / "backward" for a kernel config instance (its class's PASS), else None."""
  if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
    return None
  pass_ = getattr(type(cfg), "PASS", None)
  return pass_ if pass_ in PASSES else None


def _as_tuple(field: str, value) -> tuple:
  if value is None:
    return ()
  items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  seen = set()
  for item in items:
    if config_pass(item) != field:
      raise TypeError(
          f"AttentionConfig.{field} must hold {field} kernel configs (e.g. "
          f"{'ForwardConfig' if field == 'forward' else 'BackwardConfig'}), got {item!r}.")
    if type(item) in seen:
      raise ValueError(
          f"AttentionConfig.{field} holds two {type(item).__name__}s; give at most "
          "one per config class (one per backend).")
    seen.add(type(item))
  return items


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Per-pass kernel configs; unset passes take the tuned/heuristic default.

  ``forward`` / ``backward``: None, one config, or a tuple of configs of
  different classes (one per kernel family, e.g. a ForwardConfig for the
  Triton kernels and a Mosaic config for the Mosaic GPU kernels). A backend
  uses the config of the class it takes; a given config that the chosen
  backend cannot take is an error, not ignored.
  """

  forward: typing.Any = None
  backward: typing.Any = None

  def __post_init__(self):
    for field in PASSES:
      items = _as_tuple(field, getattr(self, field))
      object.__setattr__(self, field, None if not items else
                         items[0] if len(items) == 1 else items)

  def given(self, pass_: str) -> tuple:
    """The configs given for ``pass_`` (possibly empty)."""
    value = getattr(self, pass_)
    return () if value is None else value if isinstance(value, tuple) else (value,)

  def get(self, pass_: str, cls: type):
    """The config of class ``cls`` given for ``pass_``, or None."""
    for item in self.given(pass_):
      if type(item) is cls:
        return item
    return None


def as_attention_config(config) -> AttentionConfig:
  """Accepts None, one forward or backward kernel config, or an AttentionConfig."""
  if config is None:
    return AttentionConfig()
  if isinstance(config, AttentionConfig):
    return config
  pass_ = config_pass(config)
  if pass_ is not None:
    return AttentionConfig(**{pass_: config})
  raise TypeError(
      f"config must be None, a kernel config (ForwardConfig, BackwardConfig, ...) or an "
      f"AttentionConfig, got {type(config).__name__}.")


def padded_head_dim(d: int, minimum: int = 16) -> int:
  """Power-of-two head_dim the kernels tile: 80 -> 128, 96 -> 128, 192 -> 256."""
  p = minimum
  while p < d:
    p *= 2
  return p


# Tuner search spaces of the Triton-style configs (benchmarks/tune.py): few
# candidates per head-dim class for "quick", a grid for "full", tiny ones for
# "smoke" (interpreted). Tuples in constructor order; a backward tuple of four
# values is used for both of its kernels.
_QUICK = {
    "forward": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
                128: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4),
                      (128, 64, 4, 3), (64, 64, 4, 3)],
                256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2)]},
    # Backward: dK/dV tiles, then dQ's (four values: both kernels share them).
    # dK/dV holds keys and streams q rows, dQ the reverse: the split pairs
    # give each kernel its held tile large (H100, D128 kernels timed alone,
    # 2026-11-24: dK/dV 64x64x4x2 2.86 ms; dQ 128x64x8x3 1.58 ms vs 64x64x4x3 1.92).
    "backward": {64: [(64, 128, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2),
                      (64, 64, 4, 3, 128, 64, 8, 3), (64, 64, 4, 3, 128, 64, 4, 3),
                      (64, 128, 8, 2, 128, 64, 8, 3), (64, 64, 4, 2, 128, 32, 4, 3)],
                 128: [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2),
                       (64, 64, 4, 2, 128, 64, 8, 3), (64, 64, 4, 3, 128, 64, 8, 3),
                       (64, 64, 4, 2, 64, 32, 4, 3), (64, 64, 4, 2, 128, 32, 8, 3),
                       (64, 128, 8, 2, 128, 64, 8, 3)],
                 256: [(32, 64, 4, 1), (32, 32, 4, 1), (64, 64, 8, 1),
                       (64, 64, 8, 1, 64, 32, 8, 1), (64, 64, 8, 1, 128, 32, 8, 1),
                       (64, 64, 8, 1, 64, 32, 4, 2), (32, 64, 8, 1, 64, 32, 8, 1)]},
}
_SMOKE = {"forward": [(16, 16, 4, 2), (32, 16, 4, 2)],
         "backward": [(16, 16, 4, 2), (16, 32, 4, 1), (16, 32, 4, 2, 32, 16, 4, 2)]}


def _full_grid(pass_: str, head_dim: int) -> list[tuple]:
  big = head_dim > 128
  if pass_ == "forward":
    bq, bk = ((32, 64, 128), (16, 32, 64)) if big else ((64, 128), (32, 64, 128))
    stages = (1, 2, 3) if big else (2, 3, 4)
  else:
    bq, bk = ((16, 32, 64), (32, 64)) if big else ((32, 64, 128), (32, 64, 128))
    stages = (1, 2) if big else (1, 2, 3)
  grid = list(itertools.product(bq, bk, (4, 8), stages))
  if pass_ == "forward":
    return grid
  # Each dK/dV tile with dQ on the same tiles and on the transposed ones.
  return [c + c for c in grid] + [c + (c[1], c[0]) + c[2:] for c in grid if c[0] != c[1]]


def tile_candidates(pass_: str, head_dim: int, mode: str) -> list:
  """ForwardConfig / BackwardConfig candidates of the tuner's ``mode``
  ("smoke", "quick" or "full") for ``pass_`` at ``head_dim``."""
  if mode == "smoke":
    pool = _SMOKE[pass_]
  elif mode == "quick":
    pool = _QUICK[pass_][min(_QUICK[pass_], key=lambda h: abs(h - head_dim))]
  else:
    pool = _full_grid(pass_, head_dim)
  out = []
  for cand in pool:
    if pass_ == "backward" and len(cand) == 4:
      cand = cand + cand
    try:
      out.append((ForwardConfig if pass_ == "forward" else BackwardConfig)(*cand))
    except ValueError:
      continue
  return out
