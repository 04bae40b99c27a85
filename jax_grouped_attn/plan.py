"""Static launch plans shared by every kernel backend.

A plan is built at trace time from the (hashable) problem description. It
fixes the padded row layout of q, the padded key length, and the forward work
table: one row per (group, q block), sorted so the most expensive q blocks
(longest visible kv range) come first. Kernels launch the grid
``(n_work, B * Hq)``; program ``(w, bh)`` processes work row ``w`` for batch
``bh // Hq`` and head ``bh % Hq``. Grid axis 0 varies fastest, so all q blocks of
one (batch, head) -- and the heads sharing one kv head -- run next to each
other and reuse K,V tiles from L2.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jax_grouped_attn.groups import QueryGroup, kv_range

# exp(x) == exp2(x * LOG2E): kernels compute softmax in base 2.
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Columns of the forward work table (int32 [n_work, TABLE_WIDTH]).
ROW0 = 0       # first row of the q block in the padded q layout
QPOS0 = 1      # sequence position of that row
KV_LEN = 2     # the group's kv prefix length
N_FULL = 3     # one past the last kv block that needs no mask
N_BLOCKS = 4   # one past the last kv block to visit (the rest are fully masked)
GROUP = 5      # index of the group (into the sorted groups)
N_ROWS = 6     # valid (non-padding) rows in this q block
FIRST = 7      # first kv block to visit (> 0 only with a left window)
FULL0 = 8      # first kv block that needs no mask
TABLE_WIDTH = 16
# A q block visits kv blocks [FIRST, N_BLOCKS): [FIRST, FULL0) and
# [N_FULL, N_BLOCKS) masked, [FULL0, N_FULL) not, with
# FIRST <= FULL0 <= N_FULL <= N_BLOCKS. Without a window FIRST = FULL0 = 0.


@dataclasses.dataclass(frozen=True)
class Problem:
  """Everything static about one attention call (hashable)."""

  groups: tuple[QueryGroup, ...]
  batch: int
  tq: int
  tk: int
  hq: int
  hk: int
  head_dim: int
  causal: bool
  scale: float
  has_segments: bool
  # (left, right): a row at position p sees keys in [p - left, p + right]; a
  # side that is None is unbounded; None: no window (validate.check_window).
  window: tuple[int | None, int | None] | None = None
  # Logit soft-capping (Gemma 2): scores s = scale * q.k become c * tanh(s / c)
  # before masking; None: off (validate.check_softcap).
  softcap: float | None = None
  # v's head_dim when it differs from q/k's (MLA: Dqk 192, Dv 128); None: the same.
  head_dim_v: int | None = None

  @property
  def dv(self) -> int:
    """v's (and out's) head_dim."""
    return self.head_dim if self.head_dim_v is None else self.head_dim_v

  @property
  def tile_head_dim(self) -> int:
    """The head_dim kernel tiles are sized (and configs looked up) for: the larger
    of q/k's and v's (kernels zero-pad the other to it)."""
    return max(self.head_dim, self.dv)

  @property
  def group_size(self) -> int:
    return self.hq // self.hk

  @property
  def window_left(self) -> int:
    """Left window as a kernel constant: -1 when unbounded."""
    return -1 if self.window is None or self.window[0] is None else self.window[0]

  @property
  def window_right(self) -> int:
    """Right window as a kernel constant: -1 when unbounded."""
    return -1 if self.window is None or self.window[1] is None else self.window[1]

  @property
  def kernel_window(self) -> tuple[int, int]:
    """(window_left, window_right): the kernels' static window argument."""
    return (self.window_left, self.window_right)


def _next_pow2(x: int) -> int:
  p = 1
  while p < x:
    p *= 2
  return p


def effective_blocks(problem: Problem, block_q: int, block_k: int,
                     min_block: int = 16) -> tuple[int, int]:
  """Shrinks tiles for tiny problems (never below min_block: 16, the smallest
  dot tile, by default; the Mosaic GPU kernels pass 64, their wgmma tile)."""
  max_len = max(g.q_len for g in problem.groups)
  bq = min(block_q, max(min_block, _next_pow2(max_len)))
  bk = min(block_k, max(min_block, _next_pow2(problem.tk)))
  return bq, bk


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  block_q: int
  block_k: int
  tq_pad: int            # rows of the padded q layout
  tk_pad: int            # keys after padding to a block multiple
  identity_layout: bool  # padded layout == original rows (no gather needed)
  src_rows: np.ndarray   # [tq_pad] original row feeding each padded row
  dst_rows: np.ndarray   # [tq] padded row holding each original row
  valid_rows: np.ndarray # [tq_pad] bool: False on padding rows
  table: np.ndarray      # [n_work, TABLE_WIDTH] int32 forward work table

  @property
  def n_work(self) -> int:
    return int(self.table.shape[0])


def _kv_blocks(problem: Problem, g: QueryGroup, q_pos0: int, n_rows: int,
               bk: int) -> tuple[int, int, int, int]:
  """(first, full0, n_full, n_blocks) of a q block whose rows sit at
  q_pos0 .. q_pos0+n_rows-1 (the FIRST, FULL0, N_FULL, N_BLOCKS columns)."""
  pos_hi = q_pos0 + n_rows - 1
  start, end = kv_range(q_pos0, pos_hi, g.kv_len, problem.causal, problem.window)
  if end <= start:
    return 0, 0, 0, 0
  first, n_blocks = start // bk, -(-end // bk)
  if problem.has_segments:
    return first, first, first, n_blocks
  # Block j needs no mask iff every row sees all of keys [j*bk, j*bk + bk):
  # the first row (smallest position) bounds the right edge, the last the left.
  left, right = problem.window if problem.window is not None else (None, None)
  full_end = g.kv_len // bk
  if problem.causal:
    full_end = min(full_end, max(q_pos0 + 1, 0) // bk)
  if right is not None:
    full_end = min(full_end, max(q_pos0 + right + 1, 0) // bk)
  full0 = first if left is None else max(first, -(-max(pos_hi - left, 0) // bk))
  full_end = min(full_end, n_blocks)
  if full0 >= full_end:
    return first, first, first, n_blocks
  return first, full0, full_end, n_blocks


@functools.lru_cache(maxsize=256)
def make_plan(problem: Problem, block_q: int, block_k: int, q_align: int = 1,
              k_align: int = 1, min_block: int = 16) -> Plan:
  """The q layout and forward work table for tiles (block_q, block_k).

  Each group's rows are padded to a multiple of max(block_q, q_align) and the
  keys to a multiple of max(block_k, k_align) (after effective_blocks): two
  plans with the same alignment share one padded layout (the backward's dK/dV
  and dQ tiles). ``min_block`` is effective_blocks' floor.
  """
  bq, bk = effective_blocks(problem, block_q, block_k, min_block)
  qa, ka = max(bq, q_align), max(bk, k_align)
  if qa % bq or ka % bk:
    raise ValueError(f"make_plan: alignment ({q_align=}, {k_align=}) must be a multiple of "
                     f"the tiles ({bq}, {bk}).")
  groups = [g for g in problem.groups if g.q_len > 0]
  identity = problem.tq % qa == 0 and all(g.q_start % qa == 0 for g in groups)
  rows = []      # table rows, columns as ROW0..FULL0
  if identity:
    tq_pad = problem.tq
    src = np.arange(tq_pad)
    dst = np.arange(problem.tq)
    valid = np.ones((tq_pad,), bool)
    bases = [g.q_start for g in groups]
  else:
    bases, cursor = [], 0
    for g in groups:
      bases.append(cursor)
      cursor += -(-g.q_len // qa) * qa
    tq_pad = cursor
    src = np.zeros((tq_pad,), np.int64)
    dst = np.zeros((problem.tq,), np.int64)
    valid = np.zeros((tq_pad,), bool)
    for g, base in zip(groups, bases):
      src[base:base + g.q_len] = np.arange(g.q_start, g.q_end)
      # Padding rows copy the group's last row: finite data, results dropped.
      src[base + g.q_len:base + -(-g.q_len // qa) * qa] = g.q_end - 1
      dst[g.q_start:g.q_end] = np.arange(base, base + g.q_len)
      valid[base:base + g.q_len] = True
  for gi, (g, base) in enumerate(zip(groups, bases)):
    for off in range(0, g.q_len, bq):
      n_rows = min(bq, g.q_len - off)
      q_pos0 = g.q_pos + off
      first, full0, n_full, n_blocks = _kv_blocks(problem, g, q_pos0, n_rows, bk)
      rows.append((base + off, q_pos0, g.kv_len, n_full, n_blocks,
                   problem.groups.index(g), n_rows, first, full0))
  # Heaviest first; ties keep row order so neighbours stay neighbours.
  rows.sort(key=lambda r: (-(r[N_BLOCKS] - r[FIRST]), r[ROW0]))
  table = np.zeros((len(rows), TABLE_WIDTH), np.int32)
  if rows:
    table[:, :FULL0 + 1] = np.asarray(rows, np.int64)
  tk_pad = -(-problem.tk // ka) * ka
  for arr in (src, dst, valid, table):
    arr.setflags(write=False)
  return Plan(bq, bk, tq_pad, tk_pad, identity, src, dst, valid, table)


# ------------------------------------------------------------ backward plan --

# Columns of the dK/dV kv-block table (int32 [n_kv_blocks, KV_TABLE_WIDTH]).
KV_BLOCK = 0       # kv block index (keys [KV_BLOCK * block_k, + block_k))
KV_START = 1       # first entry of this kv block in the entry table
KV_N_FULL = 2      # leading entries that need no mask
KV_N_ENTRIES = 3   # entries (q blocks of all groups) that see this kv block
KV_TABLE_WIDTH = 4

# Columns of the dK/dV entry table (int32 [n_entries, ENTRY_WIDTH]); one entry
# per (kv block, q block that sees it). ROW0/QPOS0/KV_LEN as in the forward table.
E_ROW0 = 0
E_QPOS0 = 1
E_KV_LEN = 2
E_MASKED = 3       # 1 if some pair of (q block, kv block) is invisible
E_GROUP = 4
E_WORK = 5         # row of the forward work table this entry came from
# Ordered dQ adds (the fused backward's deterministic mode): the kv blocks that
# see a q block add into it in kv-table order; this entry's kv block is
# number E_TURN of the q block's E_NTURNS (the same for every head and batch).
E_TURN = 6
E_NTURNS = 7
ENTRY_WIDTH = 8


@dataclasses.dataclass(frozen=True, eq=False)
class BackwardPlan:
  """The backward's shared q layout, the dQ work table and the dK/dV table.

  ``plan`` is the forward-style plan of the dQ tiles: its layout (tq_pad,
  tk_pad, rows) is the one every backward kernel uses, its table is dQ's.
  The dK/dV kernel launches ``(n_kv_blocks, B * Hk)`` with tiles
  ``(block_q, block_k)``; program ``(t, bh)`` owns kv block
  ``kv_table[t, KV_BLOCK]`` and visits entries ``kv_table[t, KV_START] + [0,
  KV_N_ENTRIES)`` (CSR), the first ``KV_N_FULL`` of them unmasked. Kv blocks
  are ordered heavy-first. With ``ordered`` (ordered dQ adds) they are
  lightest-first and each block's masked entries come first (causal: its
  diagonal q block), so the first turn of a q block is the kv block that
  reaches it first.
  """

  plan: Plan
  block_q: int           # dK/dV: q rows per inner step
  block_k: int           # dK/dV: keys per program
  kv_table: np.ndarray   # [n_kv_blocks, KV_TABLE_WIDTH] int32
  entries: np.ndarray    # [max(n_entries, 1), ENTRY_WIDTH] int32
  ordered: bool = False  # lightest kv blocks first, masked entries first

  @property
  def row_block(self) -> int:
    """Rows per block of a row-wise pass (delta): the larger q tile, which
    the layout is padded to."""
    return max(self.block_q, self.plan.block_q)

  @property
  def n_kv_blocks(self) -> int:
    return int(self.kv_table.shape[0])

  @property
  def n_entries(self) -> int:
    return int(self.kv_table[:, KV_N_ENTRIES].sum())


@functools.lru_cache(maxsize=256)
def make_backward_plan(problem: Problem, block_q: int, block_k: int,
                       dq_block_q: int | None = None,
                       dq_block_k: int | None = None,
                       min_block: int = 16, ordered: bool = False) -> BackwardPlan:
  """dK/dV tiles (block_q, block_k), dQ tiles (dq_block_q, dq_block_k)
  (default: the same), one padded layout aligned to both. The dK/dV table
  transposes the forward work table of the dK/dV tiles: for every kv block,
  the q blocks of all groups that see it. ``min_block`` is effective_blocks'
  floor; ``ordered``: BackwardPlan.ordered's order. Every entry gets its turn
  (E_TURN of E_NTURNS): its rank among the q block's kv blocks in table order."""
  dq_block_q, dq_block_k = dq_block_q or block_q, dq_block_k or block_k
  bq, bk = effective_blocks(problem, block_q, block_k, min_block)
  dbq, dbk = effective_blocks(problem, dq_block_q, dq_block_k, min_block)
  qa, ka = max(bq, dbq), max(bk, dbk)
  kv_plan = make_plan(problem, block_q, block_k, qa, ka, min_block)
  plan = make_plan(problem, dq_block_q, dq_block_k, qa, ka, min_block)
  assert (kv_plan.tq_pad, kv_plan.tk_pad) == (plan.tq_pad, plan.tk_pad)
  n_kb = kv_plan.tk_pad // kv_plan.block_k
  per_block = [[] for _ in range(n_kb)]   # kv block -> [(masked, row0, entry)]
  for w, r in enumerate(kv_plan.table):
    for j in range(int(r[FIRST]), int(r[N_BLOCKS])):
      masked = int(not r[FULL0] <= j < r[N_FULL])
      per_block[j].append((masked, int(r[ROW0]),
                           (r[ROW0], r[QPOS0], r[KV_LEN], masked, r[GROUP], w)))
  # Heaviest kv blocks first (they bound the tail of the launch); ties keep
  # key order. Ordered adds: lightest first, ties from the last key, so that
  # a q block's first turn is the kv block that reaches it first.
  if ordered:
    order = sorted(range(n_kb), key=lambda j: (len(per_block[j]), -j))
  else:
    order = sorted(range(n_kb), key=lambda j: (-len(per_block[j]), j))
  kv_table = np.zeros((n_kb, KV_TABLE_WIDTH), np.int32)
  flat = []
  turns: dict[int, int] = {}   # q block row0 -> kv blocks that add into it so far
  for t, j in enumerate(order):
    # Unmasked entries first so the kernel runs them in a mask-free loop
    # (ordered: masked first); then by row so neighbouring q blocks stay
    # neighbours.
    ents = sorted(per_block[j], key=lambda e: (e[0] != ordered, e[1]))
    kv_table[t] = (j, len(flat), sum(1 - e[0] for e in ents), len(ents))
    for e in ents:
      turn = turns.get(e[1], 0)
      turns[e[1]] = turn + 1
      flat.append(e[2] + (turn,))
  entries = np.zeros((max(len(flat), 1), ENTRY_WIDTH), np.int32)
  if flat:
    entries[:len(flat), :E_TURN + 1] = np.asarray(flat, np.int64)
    entries[:len(flat), E_NTURNS] = [turns[int(r)] for r in entries[:len(flat), E_ROW0]]
  for arr in (kv_table, entries):
    arr.setflags(write=False)
  return BackwardPlan(plan, kv_plan.block_q, kv_plan.block_k, kv_table, entries, ordered)
