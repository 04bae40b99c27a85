"""Calibrated tolerances: the one comparison every kernel test and the benchmarks' oracle use.

``python -m jax_grouped_attn.testing prefix.*.tsv`` summarises the margins a
test run recorded (JGA_CALIBRATION_REPORT, tests/conftest.py).

A kernel's error against the exact fp32 reference is compared with the error,
against that same reference, of a *plain low-precision attention*: the
reference computed with its matmul operands in the input dtype (fp32
accumulation, P and dS rounded before their dots, softmax in fp32; see
``reference.py``'s ``compute_dtype``). As in flash-attention's own tests:

    err(kernel) <= FACTOR * err(low-precision reference) + FLOOR * scale

for two error statistics of each tensor (out, lse, dq, dk, dv), both relative
to the tensor's scale (max |reference|): the largest error (a wrong element,
row or tile) and the mean error (a systematic precision loss: a 16-bit
accumulator, a tf32 dot, which raises every element's error a little). The
floor covers what a comparison of two correctly rounded results can differ by
(and, for fp32, where the low-precision reference *is* the reference, the
kernel's own fp32 rounding). Calibration (tests/test_precision.py and the
mutation kit, tests/mutation/): real kernels use well under half of what this
allows; the precision mutants exceed it.

No pytest here: the benchmarks import this module too.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FACTOR = 2.0
# Floors relative to the tensor's scale, by the tensor's dtype: (max, mean).
# 16-bit: half an ulp at the largest element (two correctly rounded results
# may differ by that anywhere) for the max, an eighth of that for the mean.
# fp32 (and lse, always fp32): the kernels' own fp32 rounding with margin.
FLOOR = {
    "float32": (2e-5, 2e-6),
    "bfloat16": (2.0 ** -9, 2.0 ** -12),
    "float16": (2.0 ** -12, 2.0 ** -15),
}


@dataclasses.dataclass(frozen=True)
class Check:
  """Errors of one tensor relative to its scale, and what was allowed."""
  name: str
  scale: float
  max_err: float
  mean_err: float
  lowp_max_err: float
  lowp_mean_err: float
  allowed_max: float
  allowed_mean: float
  why: str = ""          # set when a structural check (shape, NaN, inf) failed

  @property
  def ratio(self) -> float:
    """The larger of err / allowed over both statistics (<= 1 passes)."""
    if self.why:
      return float("inf")
    return max(self.max_err / self.allowed_max, self.mean_err / self.allowed_mean)

  @property
  def ok(self) -> bool:
    return not self.why and self.ratio <= 1.0

  def __str__(self):
    if self.why:
      return f"{self.name}: {self.why}"
    return (f"{self.name}: max err {self.max_err:.3g} (low-precision ref {self.lowp_max_err:.3g}, "
            f"allowed {self.allowed_max:.3g}), mean err {self.mean_err:.3g} (ref "
            f"{self.lowp_mean_err:.3g}, allowed {self.allowed_mean:.3g}); ratio {self.ratio:.2f}, "
            f"scale {self.scale:.3g}")

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(ratio=self.ratio, ok=self.ok)
    return d


def _f32(x) -> np.ndarray:
  return np.asarray(np.asarray(x).astype(np.float32))


def dtype_name(x) -> str:
  name = np.dtype(getattr(x, "dtype", x)).name
  if name not in FLOOR:
    raise ValueError(f"no calibrated floor for dtype {name!r}; known: {sorted(FLOOR)}")
  return name


def judge(name: str, *, scale: float, max_err: float, mean_err: float, lowp_max_err: float,
          lowp_mean_err: float, dtype, factor: float = FACTOR) -> Check:
  """The calibrated rule on errors already measured (relative to ``scale``):
  ``err <= factor * low-precision err + floor`` for the max and the mean.
  ``check`` measures them in numpy; the benchmarks measure them on the device."""
  floor_max, floor_mean = FLOOR[dtype_name(dtype)]
  return Check(name, scale, max_err, mean_err, lowp_max_err, lowp_mean_err,
               factor * lowp_max_err + floor_max, factor * lowp_mean_err + floor_mean)


def check(got, want, lowp, *, name: str = "", dtype=None, factor: float = FACTOR,
          scale: float | None = None) -> Check:
  """Compares ``got`` (kernel) with ``want`` (fp32 reference) given ``lowp`` (the
  low-precision reference on the same inputs). Infinities must match exactly
  (lse = -inf on rows that see nothing); NaN fails. ``dtype`` (default
  ``got``'s) picks the floor; ``factor`` is FACTOR for every kernel of this
  project (a benchmark baseline may declare its own). ``scale``: a larger
  natural scale of the tensor, when it is a cancelling sum of larger terms
  (an fp32 gradient: see cases.cancellation_scales); it only raises the
  floor's share."""
  dtype = got if dtype is None else dtype
  floor_max, floor_mean = FLOOR[dtype_name(dtype)]
  g, w, l = _f32(got), _f32(want), _f32(lowp)
  fail = lambda why: Check(name, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, why)
  if g.shape != w.shape or l.shape != w.shape:
    return fail(f"shapes got {g.shape}, reference {w.shape}, low-precision {l.shape}")
  if np.isnan(g).any():
    return fail(f"NaN at {np.argwhere(np.isnan(g))[:5].tolist()}")
  if np.isnan(w).any() or np.isnan(l).any():
    return fail("NaN in a reference")
  inf_g, inf_w = np.isinf(g), np.isinf(w)
  if not ((inf_g == inf_w).all() and (g[inf_g] == w[inf_w]).all()):
    return fail("infinities differ at "
                f"{np.argwhere((inf_g != inf_w) | (g != w) & inf_w)[:5].tolist()}")
  fin = ~inf_w
  if not fin.any():
    return Check(name, 1.0, 0.0, 0.0, 0.0, 0.0, floor_max, floor_mean)
  w_f = w[fin]
  scale = max(float(np.max(np.abs(w_f))), scale or 0.0) or 1.0
  err = np.abs(g[fin] - w_f) / scale
  lerr = np.abs(np.where(np.isinf(l[fin]), w_f, l[fin]) - w_f) / scale
  return judge(name, scale=scale, max_err=float(err.max()), mean_err=float(err.mean()),
               lowp_max_err=float(lerr.max()), lowp_mean_err=float(lerr.mean()), dtype=dtype,
               factor=factor)


def assert_calibrated(name: str, got, want, lowp, *, what: str = "", dtype=None,
                      scale: float | None = None) -> Check:
  """``check`` and assert; the message says where the largest error is."""
  c = check(got, want, lowp, name=f"{name}{what}", dtype=dtype, scale=scale)
  if not c.ok:
    msg = str(c)
    if not c.why:
      g, w = _f32(got), _f32(want)
      err = np.abs(np.where(np.isinf(w), 0, g - w))
      msg += f"; largest error at {np.unravel_index(err.argmax(), err.shape)}"
    raise AssertionError(msg)
  return c


def _report(paths) -> None:
  """Summary of JGA_CALIBRATION_REPORT files (see conftest.py): per dtype and
  tensor kind, how much of the allowed error the kernels used."""
  import collections
  rows = collections.defaultdict(list)
  for path in paths:
    for line in open(path):
      dtype, ratio, *_, name = line.rstrip("\n").split("\t")
      tensor = next((t for t in ("lse", "dq", "dk", "dv", "out") if f" {t}" in name), "other")
      rows[(dtype, "lse" if tensor == "lse" else "grad" if tensor[0] == "d" else "out")].append(
          (float(ratio), name))
  print("| dtype | tensor | checks | median ratio | max ratio | worst |\n|---|---|---|---|---|---|")
  for (dtype, tensor), r in sorted(rows.items()):
    ratios = np.array([x for x, _ in r])
    worst = max(r)[1]
    print(f"| {dtype} | {tensor} | {len(r)} | {np.median(ratios):.2f} | {ratios.max():.2f} "
          f"| {worst} |")


if __name__ == "__main__":
  import sys
  _report(sys.argv[1:])
