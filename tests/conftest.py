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
  ``python -m jax_grouped_attn.testing prefix.*.tsv``."""
  prefix = os.environ.get("JGA_CALIBRATION_REPORT")
  if not prefix or "cases" not in sys.modules:
    return
  import cases
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(f"{prefix}.{worker}.tsv", "w") as f:
    for dtype, c in cases.CHECKS:
      f.write(f"{dtype}\t{c.ratio:.4f}\t{c.max_err:.3e}\t{c.lowp_max_err:.3e}\t{c.mean_err:.3e}"
              f"\t{c.lowp_mean_err:.3e}\t{c.name}\n")
