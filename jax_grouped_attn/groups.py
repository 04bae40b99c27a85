"""Query groups: the unit of the grouped-attention contract.

A call attends q: [B, Tq, Hq, D] to k, v: [B, Tk, Hk, D]. The rows of q are
partitioned into query groups. For a group ``g = QueryGroup(q_start, q_len,
q_pos, kv_len)``, row ``q_start + i`` (0 <= i < q_len) has sequence position
``q_pos + i`` and may see key ``j`` iff::

    j < kv_len                              (its kv prefix)
    and (not causal or j <= q_pos + i)      (its causal offset)
    and (no segment ids or kv_segment_ids[b, j] == q_segment_ids[b, row])
    and (no window or q_pos + i - left <= j <= q_pos + i + right)

A window ``(left, right)`` (jax.nn's ``local_window_size``; a side that is
None is unbounded) keeps each row to the keys near its own position. Like the
causal rule it compares positions, so it is the same for every group.

Picture for ``QueryGroup(q_start=0, q_len=3, q_pos=4, kv_len=6)`` with Tk=8,
causal (``x`` visible, ``.`` masked)::

            key j:  0 1 2 3 4 5 6 7
    row 0 (pos 4)   x x x x x . . .
    row 1 (pos 5)   x x x x x x . .
    row 2 (pos 6)   x x x x x x . .     <- j=6 is beyond kv_len

A row that sees no key produces out = 0 and lse = -inf.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class QueryGroup:
  """Rows ``[q_start, q_start + q_len)`` of q at positions ``q_pos + i``,
  seeing keys ``< kv_len``."""

  q_start: int
  q_len: int
  q_pos: int
  kv_len: int

  def __post_init__(self):
    for name in ("q_start", "q_len", "q_pos", "kv_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"QueryGroup.{name} must be a Python int, got {value!r} "
            f"({type(value).__name__}); groups are static (trace-time) data.")
      object.__setattr__(self, name, operator.index(value))
    if self.q_start < 0:
      raise ValueError(f"QueryGroup.q_start must be >= 0, got {self.q_start=}.")
    if self.q_len < 0:
      raise ValueError(f"QueryGroup.q_len must be >= 0, got {self.q_len=}.")
    if self.kv_len < 0:
      raise ValueError(f"QueryGroup.kv_len must be >= 0, got {self.kv_len=}.")

  @property
  def q_end(self) -> int:
    return self.q_start + self.q_len


def kv_range(pos_lo: int, pos_hi: int, kv_len: int, causal: bool,
             window=None) -> tuple[int, int]:
  """[start, end) of the keys that rows at positions pos_lo..pos_hi (a run of
  consecutive positions) with prefix ``kv_len`` can see, ignoring segments;
  ``end <= start`` when they see none."""
  left, right = window if window is not None else (None, None)
  start = 0 if left is None else max(pos_lo - left, 0)
  end = kv_len
  if causal:
    end = min(end, pos_hi + 1)
  if right is not None:
    end = min(end, pos_hi + right + 1)
  return start, max(end, 0)


def normalize_groups(groups, tq: int, tk: int) -> tuple[QueryGroup, ...]:
  """Checks that ``groups`` partition rows [0, tq) and fit in tk keys.

  Returns them as a tuple sorted by q_start (hashable, usable as static data).
  """
  if isinstance(groups, QueryGroup):
    groups = (groups,)
  if not isinstance(groups, Sequence) or isinstance(groups, (str, bytes)):
    raise TypeError(
        f"groups must be a sequence of QueryGroup, got {type(groups).__name__}.")
  if len(groups) == 0:
    raise ValueError("groups is empty; pass at least one QueryGroup covering "
                     f"all {tq} query rows.")
  for i, g in enumerate(groups):
    if not isinstance(g, QueryGroup):
      raise TypeError(f"groups[{i}] must be a QueryGroup, got {g!r}.")
    if g.kv_len > tk:
      raise ValueError(
          f"groups[{i}].kv_len={g.kv_len} exceeds the key length Tk={tk} "
          f"(k.shape[1]); a group may only see a prefix of k.")
    if g.q_end > tq:
      raise ValueError(
          f"groups[{i}] covers rows [{g.q_start}, {g.q_end}) but q has only "
          f"Tq={tq} rows (q.shape[1]).")
  ordered = tuple(sorted(groups, key=lambda g: (g.q_start, g.q_len)))
  cursor = 0
  for g in ordered:
    if g.q_len == 0:
      continue
    if g.q_start < cursor:
      raise ValueError(
          f"groups overlap: {g} starts at row {g.q_start} but rows up to "
          f"{cursor} are already covered; groups must partition q's rows.")
    if g.q_start > cursor:
      raise ValueError(
          f"groups leave rows [{cursor}, {g.q_start}) uncovered; groups must "
          f"partition q's rows [0, {tq}) exactly.")
    cursor = g.q_end
  if cursor != tq:
    raise ValueError(
        f"groups leave rows [{cursor}, {tq}) uncovered; groups must partition "
        f"q's rows [0, {tq}) exactly.")
  return ordered


def visible(q_pos, key, kv_len, *, causal: bool, q_seg=None, kv_seg=None, window=None):
  """The mask rule of this module, elementwise on broadcastable numpy or jax
  arrays: key ``key`` is visible to a row at position ``q_pos`` with prefix
  ``kv_len`` (and segment ``q_seg``; keys' segments ``kv_seg``; window
  ``(left, right)``)."""
  seen = key < kv_len
  if causal:
    seen = seen & (key <= q_pos)
  if window is not None:
    left, right = window
    if left is not None:
      seen = seen & (key >= q_pos - left)
    if right is not None:
      seen = seen & (key <= q_pos + right)
  if q_seg is not None:
    seen = seen & (q_seg == kv_seg)
  return seen


def row_positions(groups: Sequence[QueryGroup], tq: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-row (position, kv_len) as int arrays of shape [tq] (static numpy)."""
  pos = np.zeros((tq,), np.int64)
  kv_len = np.zeros((tq,), np.int64)
  for g in groups:
    pos[g.q_start:g.q_end] = g.q_pos + np.arange(g.q_len)
    kv_len[g.q_start:g.q_end] = g.kv_len
  return pos, kv_len


def visible_pairs(groups: Sequence[QueryGroup], causal: bool, window=None) -> int:
  """Number of visible (row, key) pairs per batch row and head, ignoring segments."""
  total = 0
  for g in groups:
    pos = g.q_pos + np.arange(g.q_len)
    left, right = window if window is not None else (None, None)
    start = np.zeros_like(pos) if left is None else np.maximum(pos - left, 0)
    end = np.full_like(pos, g.kv_len)
    if causal:
      end = np.minimum(end, pos + 1)
    if right is not None:
      end = np.minimum(end, pos + right + 1)
    total += int(np.clip(end - start, 0, None).sum())
  return total
