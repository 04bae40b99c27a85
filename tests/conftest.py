import os
import sys

# Multi-device CPU tests (context parallel) need several host devices; this must
# be set before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def _interpreter_rounds_bf16_to_nearest():
  """Triton's interpreter converts fp32 -> bf16 by truncating the mantissa
  (``x.to(tl.bfloat16)``: create_fp_trunc, no rounding mode); the GPU rounds
  to nearest even (cvt.rn.bf16.f32). Truncation doubles every bf16 rounding
  error (P before the PV dot, dS, the outputs), so interpreted Triton would
  look twice as imprecise as the same kernel on the GPU and the calibrated
  tolerances (tolerance.py) could not tell it from a precision bug. Round
  like the GPU here (ml_dtypes rounds to nearest even);
  test_tolerance.py checks that this patch is in effect."""
  try:
    import ml_dtypes
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
  except ImportError:
    return
  builder = interpreter.InterpreterBuilder
  original = builder.cast_impl
  if getattr(original, "rounds_to_nearest", False):
    return

  def cast_impl(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
      data = np.asarray(src.data, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
      return interpreter.TensorHandle(data, dst_type.scalar)
    return original(self, src, dst_type)

  cast_impl.rounds_to_nearest = True
  builder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest()


def has_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def pytest_sessionfinish(session):
  """JGA_CALIBRATION_REPORT=prefix: every passing calibrated check of this
  process (cases.CHECKS) to prefix.<worker>.tsv; summarise them with
  ``python tests/tolerance.py prefix.*.tsv``."""
  prefix = os.environ.get("JGA_CALIBRATION_REPORT")
  if not prefix or "cases" not in sys.modules:
    return
  import cases
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(f"{prefix}.{worker}.tsv", "w") as f:
    for dtype, c in cases.CHECKS:
      f.write(f"{dtype}\t{c.ratio:.4f}\t{c.max_err:.3e}\t{c.lowp_max_err:.3e}\t{c.mean_err:.3e}"
              f"\t{c.lowp_mean_err:.3e}\t{c.name}\n")
