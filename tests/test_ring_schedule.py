"""The ring's schedule (cp.ring_schedule) against a brute-force numpy mask, no JAX.

For W ranks with zigzag shards of 2c rows, step s pairs rank r's queries with
the keys of rank (r - s) mod W. Over the whole schedule every (query, key)
pair of the global causal / windowed mask must be computed exactly once, and
the skipped steps must be exactly those where no rank sees a visiting key.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_grouped_attn.cp import ring_schedule as rs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positions(rank, world, c):
  """Global positions of rank's local rows: chunks rank and 2W-1-rank of c rows."""
  return np.concatenate([np.arange(rank * c, (rank + 1) * c),
                         np.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])


def _global_mask(q_pos, k_pos, causal, window):
  """[len(q_pos), len(k_pos)] bool: the global mask on sequence positions."""
  qp, kp = q_pos[:, None], k_pos[None, :]
  m = np.ones((len(q_pos), len(k_pos)), bool)
  if causal:
    m &= kp <= qp
  left, right = window if window is not None else (None, None)
  if left is not None:
    m &= kp >= qp - left
  if right is not None:
    m &= kp <= qp + right
  return m


def _call_mask(call, c):
  """[2c, 2c] int: the (local row, visiting row) pairs ``call`` computes, from
  the QueryGroup contract (groups.py) written out again here."""
  got = np.zeros((2 * c, 2 * c), int)
  assert 0 <= call.q_start < call.q_stop <= 2 * c and 0 <= call.kv_start < call.kv_stop <= 2 * c
  n_rows = call.q_stop - call.q_start
  covered = np.zeros(n_rows, int)
  left, right = call.window if call.window is not None else (None, None)
  for g in call.groups:
    covered[g.q_start:g.q_end] += 1
    for i in range(g.q_len):
      pos = g.q_pos + i
      j = np.arange(call.kv_stop - call.kv_start)
      seen = j < g.kv_len
      if call.causal:
        seen &= j <= pos
      if left is not None:
        seen &= j >= pos - left
      if right is not None:
        seen &= j <= pos + right
      got[call.q_start + g.q_start + i, call.kv_start:call.kv_stop] += seen
  assert (covered == 1).all(), f"the groups of {call} do not partition its rows"
  return got


def _step_calls(world, c, causal, window):
  """{step: [calls of rank r for r in range(world)]} as the schedule runs them."""
  out = {}
  for seg in rs.ring_schedule(world, c, causal, window):
    assert len(seg.table) == len(seg.steps)
    for i, s in enumerate(seg.steps):
      out[s] = [seg.kinds[seg.table[i][r]] for r in range(world)]
  return out


CAUSAL_WINDOWS = [None, (0, None), (1, None), (3, None), (4, None), (5, None), (9, None),
                  (13, None), (100, None)]
WINDOWS = [None, (0, 0), (None, 0), (0, None), (2, 5), (4, None), (None, 9), (12, 1),
           (3, 3), (None, 100)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("c", [1, 4])
def test_every_visible_pair_is_computed_exactly_once(world, c, causal):
  for window in CAUSAL_WINDOWS if causal else WINDOWS:
    calls = _step_calls(world, c, causal, window)
    for r in range(world):
      for s in range(world):
        src = (r - s) % world
        want = _global_mask(_positions(r, world, c), _positions(src, world, c), causal, window)
        got = np.zeros((2 * c, 2 * c), int)
        for call in calls.get(s, [()] * world)[r]:
          got += _call_mask(call, c)
        err = f"{world=} {c=} {causal=} {window=} rank {r} step {s} (source {src})"
        assert got.max() <= 1, f"{err}: a pair is computed twice"
        np.testing.assert_array_equal(got, want.astype(int), err_msg=err)


@pytest.mark.parametrize("causal", [True, False])
def test_skipped_steps_are_those_no_rank_sees(causal):
  for world in (1, 2, 3, 4, 6, 8):
    for c in (1, 3, 16):
      for window in CAUSAL_WINDOWS if causal else WINDOWS:
        seen = [any(_global_mask(_positions(r, world, c),
                                 _positions((r - s) % world, world, c), causal, window).any()
                    for r in range(world)) for s in range(world)]
        want = tuple(s for s in range(world) if seen[s])
        assert rs.ring_steps(world, c, causal, window) == want, (world, c, causal, window)


def test_causal_window_runs_2n_plus_1_steps():
  # With a causal window of left size L, n = ceil(L / c): steps 0..n and W-n..W-1.
  for world in (1, 2, 3, 4, 8, 16):
    for c in (1, 4, 16):
      for left in (0, 1, c - 1, c, c + 1, 3 * c, 1000):
        n = math.ceil(left / c)
        steps = rs.ring_steps(world, c, True, (left, None))
        want = sorted(set(range(min(n, world - 1) + 1)) | set(range(max(world - n, 1), world)))
        assert steps == tuple(want) and len(steps) == min(world, 2 * n + 1), (world, c, left)


@pytest.mark.parametrize("window", [None, (5, None), (17, None)])
def test_segments_move_kv_by_the_gaps_between_steps(window):
  # Each segment is reached by `arrival` ranks and left by `next_shift`; a loop
  # segment moves K, V one rank per step; the K, V shards go round once in all.
  for world in (1, 2, 4, 5, 8):
    segments = rs.ring_schedule(world, 4, True, window)
    steps = [s for seg in segments for s in seg.steps]
    assert steps == sorted(steps) and steps[0] == 0 and segments[0].arrival == 0
    assert segments[-1].next_shift == 0
    for a, b in zip(segments, segments[1:]):
      assert a.next_shift == b.arrival == b.steps[0] - a.steps[-1] > 0
    for seg in segments:
      if seg.loop:
        assert len(seg.steps) >= 2 and list(seg.steps) == list(
            range(seg.steps[0], seg.steps[-1] + 1))
      else:
        assert len(seg.steps) == 1
      # The table points into kinds, and every kind is used.
      used = {k for row in seg.table for k in row}
      assert used == set(range(len(seg.kinds))) and all(len(row) == world for row in seg.table)


def test_without_a_window_there_are_three_kinds_of_step():
  # Causal zigzag: diagonal, lower source (first visiting chunk), higher source
  # (second local chunk); non-causal: one.
  for world in (3, 4, 8):
    kinds = {k for seg in rs.ring_schedule(world, 4, True, None) for k in seg.kinds}
    assert len(kinds) == 3 and all(len(k) == 1 for k in kinds)
    assert rs.ring_steps(world, 4, True, None) == tuple(range(world))
    kinds = {k for seg in rs.ring_schedule(world, 4, False, None) for k in seg.kinds}
    assert len(kinds) == 1


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="rank must be an int in"):
    rs.zigzag_ring_calls(4, 0, 4, 8)
  with pytest.raises(ValueError, match="world_size must be a positive int"):
    rs.zigzag_ring_step(0, 0, 0, 8)
  with pytest.raises(ValueError, match="chunk_len must be a positive int"):
    rs.zigzag_ring_calls(0, 0, 2, 0, window=(1, None))


def test_the_schedule_imports_without_jax():
  # Its package's __init__ imports JAX, so load the module (and the project
  # modules it imports) under stub packages, with `import jax` failing.
  code = f"""
import importlib, sys, types
sys.modules["jax"] = None
for name, path in (("jax_grouped_attn", {ROOT!r} + "/jax_grouped_attn"),
                   ("jax_grouped_attn.cp", {ROOT!r} + "/jax_grouped_attn/cp")):
  pkg = types.ModuleType(name)
  pkg.__path__ = [path]
  sys.modules[name] = pkg
rs = importlib.import_module("jax_grouped_attn.cp.ring_schedule")
print(rs.ring_steps(8, 1024, True, (512, None)), any(m.startswith("jax.") for m in sys.modules))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["(0,", "1,", "7)", "False"], out.stdout
