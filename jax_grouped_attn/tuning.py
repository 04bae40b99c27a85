"""Per-GPU tuned kernel configs (written by ``benchmarks/tune.py``).

A table is ``jax_grouped_attn/tuned/<gpu slug>.json`` (shipped as package
data) or a file of that name in ``$JAX_GROUPED_ATTN_TUNED_DIR`` (searched
first; ``os.pathsep``-separated). Its entries are keyed::

    entries[backend][pass][dtype][head_dim][seq_bucket] = {field: value, ...}

with backend a registry entry's name, pass "forward" | "backward", head_dim
as a string ("128"), seq_bucket the upper edge of a key-length bucket (see
``SEQ_BUCKETS``) or "any" (the best config across buckets, used when the
length is unknown), and the fields those of the backend's config class for
that pass (fields whose default is None may be left out).

``registry.config_for`` asks :func:`tuned_config` first and falls back to
the backend's heuristic for an unknown GPU, a missing entry, or an unusable
one. Set ``JAX_GROUPED_ATTN_NO_TUNED=1``
to ignore every table; ``JAX_GROUPED_ATTN_GPU_NAME`` pretends another GPU
(tests, or trying a table from another machine).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings

from jax_grouped_attn.config import PASSES, padded_head_dim

FORMAT = 1
ENV_DIR = "JAX_GROUPED_ATTN_TUNED_DIR"
ENV_GPU = "JAX_GROUPED_ATTN_GPU_NAME"
ENV_OFF = "JAX_GROUPED_ATTN_NO_TUNED"

# Key-length buckets: a length n falls in the first edge >= n (the last edge
# takes everything longer). The tuner measures at the edges.
SEQ_BUCKETS = (2048, 8192, 32768, 131072)

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def fields(config_class) -> tuple[str, ...]:
  """The fields a table entry for ``config_class`` may hold, in constructor order."""
  return tuple(f.name for f in dataclasses.fields(config_class))


def required_fields(config_class) -> tuple[str, ...]:
  """The fields an entry must hold (those whose default is not None)."""
  return tuple(f.name for f in dataclasses.fields(config_class) if f.default is not None)


def slug(name: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
  s = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
  return s or "unknown"


def seq_bucket(n: int) -> int:
  for edge in SEQ_BUCKETS:
    if n <= edge:
      return edge
  return SEQ_BUCKETS[-1]


def gpu_name() -> str | None:
  """$JAX_GROUPED_ATTN_GPU_NAME, else the first device's kind on a GPU, else None."""
  forced = os.environ.get(ENV_GPU)
  if forced:
    return forced
  try:
    import jax  # noqa: PLC0415
    if jax.default_backend() != "gpu":
      return None
    return jax.devices()[0].device_kind
  except Exception:  # noqa: BLE001 -- no backend: no table
    return None


def table_dirs() -> list[str]:
  extra = [d for d in os.environ.get(ENV_DIR, "").split(os.pathsep) if d]
  return extra + [PACKAGE_DIR]


def table_path(gpu: str | None = None) -> str | None:
  """The table file for ``gpu`` (default: this machine's), or None."""
  if os.environ.get(ENV_OFF, "").lower() in ("1", "true", "yes"):
    return None
  gpu = gpu or gpu_name()
  if not gpu:
    return None
  for d in table_dirs():
    path = os.path.join(d, slug(gpu) + ".json")
    if os.path.isfile(path):
      return path
  return None


@functools.lru_cache(maxsize=32)
def _load(path: str, mtime: float) -> dict | None:
  del mtime  # part of the cache key only: an updated file is re-read
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    warnings.warn(f"ignoring tuned table {path}: {e}", stacklevel=3)
    return None
  if not isinstance(table, dict) or not isinstance(table.get("entries"), dict):
    warnings.warn(f"ignoring tuned table {path}: no 'entries' mapping", stacklevel=3)
    return None
  if table.get("format", FORMAT) != FORMAT:
    warnings.warn(f"ignoring tuned table {path}: format {table.get('format')} != {FORMAT}",
                  stacklevel=3)
    return None
  return table


def load_table(gpu: str | None = None) -> dict | None:
  path = table_path(gpu)
  if path is None:
    return None
  return _load(path, os.path.getmtime(path))


def clear_cache() -> None:
  _load.cache_clear()


def _dtype_keys(dtype) -> list[str]:
  if dtype is None:
    return ["bfloat16", "float16"]
  try:
    import numpy as np  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415,F401 -- registers bfloat16 with numpy
    name = np.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name in ("bfloat16", "float16"):   # same tile limits: either table serves
    return [name, "float16" if name == "bfloat16" else "bfloat16"]
  return [name]


def _pick_bucket(by_bucket: dict, seq_len: int | None):
  if seq_len is not None:
    want = seq_bucket(int(seq_len))
    if str(want) in by_bucket:
      return by_bucket[str(want)]
    numeric = [int(k) for k in by_bucket if k.isdigit()]
    if numeric:
      near = min(numeric, key=lambda e: (abs(math.log2(e) - math.log2(want)), e))
      return by_bucket[str(near)]
  return by_bucket.get("any")


def lookup(pass_: str, backend: str, config_class, head_dim: int, *,
           seq_len: int | None = None, dtype=None, gpu: str | None = None) -> dict | None:
  """The raw table entry (a dict with ``config_class``'s fields) for this GPU, or None."""
  if pass_ not in PASSES:
    raise ValueError(f"pass_={pass_!r} must be one of {PASSES}.")
  table = load_table(gpu)
  if table is None:
    return None
  need = required_fields(config_class)
  by_pass = table["entries"].get(backend, {}).get(pass_, {})
  for dkey in _dtype_keys(dtype):
    by_dim = by_pass.get(dkey, {})
    for hkey in dict.fromkeys((str(head_dim), str(padded_head_dim(head_dim)))):
      if hkey in by_dim and isinstance(by_dim[hkey], dict):
        entry = _pick_bucket(by_dim[hkey], seq_len)
        if isinstance(entry, dict) and all(f in entry for f in need):
          return entry
  return None


def tuned_config(pass_: str, backend: str, config_class, head_dim: int, *, seq_len=None,
                 dtype=None):
  """A ``config_class`` instance from this GPU's table, or None (use the heuristic)."""
  entry = lookup(pass_, backend, config_class, head_dim, seq_len=seq_len, dtype=dtype)
  if entry is None:
    return None
  try:
    return config_class(**{f: int(entry[f]) for f in fields(config_class)
                           if entry.get(f) is not None})
  except (TypeError, ValueError) as e:
    warnings.warn(f"unusable tuned {pass_} entry {entry}: {e}; using the heuristic",
                  stacklevel=2)
    return None
