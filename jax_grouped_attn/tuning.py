"""Per-GPU tuned kernel configs (written by ``benchmarks/tune.py``).

A table is ``jax_grouped_attn/tuned/<gpu slug>.json`` (shipped as package
data) or a file of that name in ``$JAX_GROUPED_ATTN_TUNED_DIR`` (searched
first; ``os.pathsep``-separated). Its entries are keyed::

    entries[backend][pass][dtype][head_dim][seq_bucket] = {field: value, ...}

with backend a registry entry's name, pass "forward" | "backward", head_dim
as a string ("128"), seq_bucket the upper edge of a key-length bucket (see
``SEQ_BUCKETS``) or "any" (the best config across buckets, used when the
length is unknown), and the fields those of the backend's config class for
that pass (fields whose default is None may be left out). A bucket entry the
tuner wrote also keeps every candidate it timed (``candidates``: config
tuple in constructor order and ms, or why it was skipped).

Which table a GPU uses (:func:`find_table`): the one named after it; else the
nearest table of the same compute capability (closest multiprocessor count);
else the nearest of the same major version; else none. A table says its
GPU's ``compute_capability`` ("9.0") and ``sm_count``.

Without a table entry, an sm_90-family GPU gets :func:`derived_config`: per
(backend, pass, head_dim) the candidate that the shipped tables of that
major version measured closest to each bucket's best (no hand-copied
numbers); other GPUs and CPUs get the backend's own heuristic.

``registry.default_choice`` walks that order. Set ``JAX_GROUPED_ATTN_NO_TUNED=1``
to ignore every table (derived defaults included); ``JAX_GROUPED_ATTN_GPU_NAME``
pretends another GPU and ``JAX_GROUPED_ATTN_GPU_ARCH`` ("9.0") its compute
capability (tests, or trying a table from another machine).
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
ENV_ARCH = "JAX_GROUPED_ATTN_GPU_ARCH"

# Key-length buckets: a length n falls in the first edge >= n (the last edge
# takes everything longer). The tuner measures at the edges.
SEQ_BUCKETS = (2048, 8192, 32768, 131072)

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def fields(config_class) -> tuple[str, ...]:
  """The fields a table entry for ``config_class`` may hold, in constructor order."""
  return tuple(f.name for f in dataclasses.fields(config_class))


def required_fields(config_class) -> tuple[str, ...]:
  """The fields an entry must hold: those whose default is not None or a bool
  (a switch an older table has no key for keeps its default)."""
  return tuple(f.name for f in dataclasses.fields(config_class)
               if f.default is not None and not isinstance(f.default, bool))


def _field_value(config_class, name: str, value):
  """A table value as the field's type: bool switches, else int tiles."""
  default = {f.name: f.default for f in dataclasses.fields(config_class)}[name]
  return bool(value) if isinstance(default, bool) else int(value)


def slug(name: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
  s = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
  return s or "unknown"


def seq_bucket(n: int) -> int:
  for edge in SEQ_BUCKETS:
    if n <= edge:
      return edge
  return SEQ_BUCKETS[-1]


@dataclasses.dataclass(frozen=True)
class Gpu:
  """The GPU configs are looked up for: its device kind, compute capability
  ("9.0", or None when unknown) and multiprocessor count (or None)."""

  name: str
  compute_capability: str | None = None
  sm_count: int | None = None

  @property
  def major(self) -> int | None:
    return None if self.compute_capability is None else int(self.compute_capability.split(".")[0])


def _device_gpu():
  try:
    import jax  # noqa: PLC0415
    if jax.default_backend() != "gpu":
      return None
    dev = jax.devices()[0]
  except Exception:  # noqa: BLE001 -- no backend: no GPU
    return None
  cc = getattr(dev, "compute_capability", None)
  sms = getattr(dev, "core_count", None)
  return Gpu(dev.device_kind, None if cc is None else _cc(cc),
             sms if isinstance(sms, int) else None)


def _cc(value) -> str | None:
  """'9.0' from '9.0', 9.0 or '90'; None for anything else."""
  text = str(value).strip()
  m = re.fullmatch(r"(\d+)\.(\d+)", text) or re.fullmatch(r"(\d)(\d)", text)
  return f"{int(m.group(1))}.{int(m.group(2))}" if m else None


def this_gpu() -> Gpu | None:
  """This machine's GPU, with $JAX_GROUPED_ATTN_GPU_NAME / _GPU_ARCH applied;
  None without a GPU (and nothing forced)."""
  real = _device_gpu()
  forced_name = os.environ.get(ENV_GPU)
  forced_cc = os.environ.get(ENV_ARCH)
  if forced_cc is not None and _cc(forced_cc) is None:
    raise ValueError(f"${ENV_ARCH}={forced_cc!r} must be a compute capability like '9.0'.")
  if not forced_name:
    if real is None:
      return None
    return real if not forced_cc else dataclasses.replace(real, compute_capability=_cc(forced_cc))
  cc, sms = (real.compute_capability, real.sm_count) if real else (None, None)
  if forced_cc:
    cc = _cc(forced_cc)
  elif real is None:
    # A forced name on a machine without a GPU: the arch its own table states.
    meta = _exact_meta(forced_name)
    cc, sms = (meta.compute_capability, meta.sm_count) if meta else (None, None)
  return Gpu(forced_name, cc, sms)


def gpu_name() -> str | None:
  """$JAX_GROUPED_ATTN_GPU_NAME, else the first device's kind on a GPU, else None."""
  gpu = this_gpu()
  return None if gpu is None else gpu.name


def table_dirs() -> list[str]:
  extra = [d for d in os.environ.get(ENV_DIR, "").split(os.pathsep) if d]
  return extra + [PACKAGE_DIR]


def tables_off() -> bool:
  return os.environ.get(ENV_OFF, "").lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class TableChoice:
  """The table a GPU uses and why: ``match`` is "exact" (named after the GPU),
  "compute capability" (the nearest table of the same one) or "major" (the
  nearest of the same major version)."""

  path: str
  table_gpu: str
  match: str

  def describe(self) -> str:
    how = {"exact": "tuned table", "compute capability": "family fallback: same compute "
           "capability", "major": "family fallback: same major compute capability"}
    return f"{how[self.match]}, {os.path.basename(self.path)} (measured on {self.table_gpu})"


def table_files(dirs) -> list[str]:
  out = []
  for d in dirs:
    if os.path.isdir(d):
      out += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".json")]
  return out


def _meta(path: str) -> Gpu | None:
  table = _load_path(path)
  if table is None or not isinstance(table.get("gpu"), str):
    return None
  sms = table.get("sm_count")
  return Gpu(table["gpu"], _cc(table["compute_capability"]) if "compute_capability" in table
             else None, sms if isinstance(sms, int) else None)


def _exact_path(name: str) -> str | None:
  for d in table_dirs():
    path = os.path.join(d, slug(name) + ".json")
    if os.path.isfile(path):
      return path
  return None


def _exact_meta(name: str) -> Gpu | None:
  path = _exact_path(name)
  return None if path is None else _meta(path)


def find_table(gpu: Gpu | str | None = None) -> TableChoice | None:
  """The table ``gpu`` (default: this machine's) uses, or None (see the module doc)."""
  if tables_off():
    return None
  if gpu is None:
    gpu = this_gpu()
  elif isinstance(gpu, str):
    gpu = Gpu(gpu, *(lambda m: (m.compute_capability, m.sm_count) if m else (None, None))(
        _exact_meta(gpu)))
  if gpu is None:
    return None
  path = _exact_path(gpu.name)
  if path is not None and _load_path(path) is not None:
    return TableChoice(path, gpu.name, "exact")
  if gpu.compute_capability is None:
    return None
  metas = [(p, m) for p in table_files(table_dirs()) if (m := _meta(p)) and m.major]
  for match, same in (("compute capability",
                       lambda m: m.compute_capability == gpu.compute_capability),
                      ("major", lambda m: m.major == gpu.major)):
    pool = [(p, m) for p, m in metas if same(m)]
    if pool:
      minor = lambda m: abs(float(m.compute_capability) - float(gpu.compute_capability))
      sms = lambda m: (abs(m.sm_count - gpu.sm_count) if m.sm_count and gpu.sm_count
                       else 1 << 20)
      path, meta = min(pool, key=lambda pm: (minor(pm[1]), sms(pm[1]), pm[1].name))
      return TableChoice(path, meta.name, match)
  return None


def table_path(gpu: str | None = None) -> str | None:
  """The path of the table ``gpu`` (default: this machine's) uses, or None."""
  choice = find_table(gpu)
  return None if choice is None else choice.path


def _load_path(path: str) -> dict | None:
  try:
    mtime = os.path.getmtime(path)
  except OSError:
    return None
  return _load(path, mtime)


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
  choice = find_table(gpu)
  return None if choice is None else _load_path(choice.path)


def clear_cache() -> None:
  _load.cache_clear()
  _derived.cache_clear()


def _dtype_keys(dtype) -> list[str]:
  if dtype is None:
    return ["bfloat16", "float16"]
  try:
    import jax.numpy as jnp  # noqa: PLC0415,F401 -- registers bfloat16 with numpy
    import numpy as np  # noqa: PLC0415
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


def head_dim_keys(head_dim: int, head_dim_v: int | None = None, padded=None) -> list[str]:
  """Table keys of a head dim, most specific first: "<Dqk>x<Dv>" when v's
  differs (MLA), then the wider one as is and at the width the backend's
  kernels pad it to (``padded``, a backend's ``padded_head_dim``; default:
  the next power of two, the Triton-style kernels' width)."""
  wide = head_dim if head_dim_v is None else max(head_dim, head_dim_v)
  own = [] if head_dim_v in (None, head_dim) else [f"{head_dim}x{head_dim_v}"]
  return list(dict.fromkeys(own + [str(wide), str((padded or padded_head_dim)(wide))]))


def _by_dim(table: dict, pass_: str, backend: str, head_dim: int, dtype,
            head_dim_v: int | None = None, padded=None):
  """The ``{bucket: entry}`` maps of ``table`` for this key, most specific first."""
  by_pass = table["entries"].get(backend, {}).get(pass_, {})
  for dkey in _dtype_keys(dtype):
    by_dim = by_pass.get(dkey, {})
    for hkey in head_dim_keys(head_dim, head_dim_v, padded):
      if isinstance(by_dim.get(hkey), dict):
        yield by_dim[hkey]


def lookup(pass_: str, backend: str, config_class, head_dim: int, *,
           seq_len: int | None = None, dtype=None, gpu: str | None = None,
           head_dim_v: int | None = None, padded=None) -> dict | None:
  """The raw table entry (a dict with ``config_class``'s fields) for this GPU, or
  None; ``head_dim_v`` (v's head_dim where it differs) and ``padded`` pick the
  keys (head_dim_keys)."""
  if pass_ not in PASSES:
    raise ValueError(f"pass_={pass_!r} must be one of {PASSES}.")
  table = load_table(gpu)
  if table is None:
    return None
  need = required_fields(config_class)
  for by_bucket in _by_dim(table, pass_, backend, head_dim, dtype, head_dim_v, padded):
    entry = _pick_bucket(by_bucket, seq_len)
    if isinstance(entry, dict) and all(f in entry for f in need):
      return entry
  return None


def _instance(config_class, values: dict, what: str):
  try:
    return config_class(**{f: _field_value(config_class, f, values[f])
                           for f in fields(config_class) if values.get(f) is not None})
  except (TypeError, ValueError) as e:
    warnings.warn(f"unusable {what} {values}: {e}; using the heuristic", stacklevel=3)
    return None


def tuned_config(pass_: str, backend: str, config_class, head_dim: int, *, seq_len=None,
                 dtype=None, head_dim_v: int | None = None, padded=None):
  """A ``config_class`` instance from this GPU's table, or None (use the heuristic)."""
  entry = lookup(pass_, backend, config_class, head_dim, seq_len=seq_len, dtype=dtype,
                 head_dim_v=head_dim_v, padded=padded)
  if entry is None:
    return None
  return _instance(config_class, entry, f"tuned {pass_} entry")


# ------------------------------------------------- defaults derived from tables --

@dataclasses.dataclass(frozen=True)
class Derived:
  """A config derived from the shipped tables of one GPU family, and how far
  it was from each measured bucket's best (``worst_slowdown``: the largest
  time / best-time ratio over ``slots``, the (table GPU, key length) pairs)."""

  config: object
  worst_slowdown: float
  slots: tuple[str, ...]


def normalized(config):
  """``config`` in one spelling per kernel behaviour (e.g. BackwardConfig's
  dQ fields filled in), so candidates written two ways compare equal."""
  norm = getattr(config, "normalized", None)
  return norm() if callable(norm) else config


def candidate(config_class, values):
  """The normalized ``config_class`` instance of a tuner candidate tuple, or None."""
  try:
    return normalized(config_class(*values))
  except (TypeError, ValueError):
    return None


def measured_slots(major: int, pass_: str, backend: str, config_class, head_dim: int, dtype,
                   dirs=None, head_dim_v: int | None = None, padded=None) -> dict[str, dict]:
  """``{"<gpu> S<bucket>": {normalized config: ms}}`` from every table of
  compute-capability major ``major`` in ``dirs`` (default: the shipped ones)
  that timed candidates for this key."""
  out = {}
  for path in table_files(dirs or [PACKAGE_DIR]):
    meta = _meta(path)
    if meta is None or meta.major != major:
      continue
    for by_bucket in _by_dim(_load_path(path), pass_, backend, head_dim, dtype, head_dim_v,
                             padded):
      for bucket, entry in by_bucket.items():
        if not (bucket.isdigit() and isinstance(entry, dict)):
          continue
        times = {}
        for c in entry.get("candidates", ()):
          cfg = candidate(config_class, c.get("config", ())) if isinstance(c, dict) else None
          if cfg is not None and isinstance(c.get("ms"), (int, float)):
            times[cfg] = min(float(c["ms"]), times.get(cfg, math.inf))
        if times:
          out[f"{meta.name} S{bucket}"] = times
      break   # the most specific (dtype, head_dim) key only
  return out


@functools.lru_cache(maxsize=256)
def _derived(major: int, pass_: str, backend: str, config_class, head_dim: int,
             dtype_key: str, stamp: tuple, head_dim_v: int | None, padded) -> Derived | None:
  del stamp  # cache key only: shipped tables' mtimes
  slots = measured_slots(major, pass_, backend, config_class, head_dim, dtype_key,
                         head_dim_v=head_dim_v, padded=padded)
  if not slots:
    return None
  everywhere = set.intersection(*(set(t) for t in slots.values()))
  if not everywhere:
    return None
  ratio = lambda c, t: t[c] / min(t.values())
  # Smallest worst-case slowdown first, then the smallest summed log-slowdown.
  score = lambda c: (max(ratio(c, t) for t in slots.values()),
                     sum(math.log(ratio(c, t)) for t in slots.values()),
                     tuple(-1 if x is None else x for x in dataclasses.astuple(c)))
  best = min(everywhere, key=score)
  return Derived(best, max(ratio(best, t) for t in slots.values()), tuple(sorted(slots)))


def derived(pass_: str, backend: str, config_class, head_dim: int, dtype,
            major: int | None, *, head_dim_v: int | None = None, padded=None) -> Derived | None:
  """The default for GPUs of compute-capability ``major`` derived from the
  shipped tables (None: no GPU, no measurements, or tables turned off); keys
  as :func:`lookup`'s."""
  if major is None or config_class is None or tables_off():
    return None
  if _dtype_keys(dtype)[0] not in ("bfloat16", "float16"):
    return None   # the tuner times 16-bit inputs only
  stamp = tuple((p, os.path.getmtime(p)) for p in table_files([PACKAGE_DIR]))
  return _derived(major, pass_, backend, config_class, int(head_dim), _dtype_keys(dtype)[0],
                  stamp, head_dim_v, padded)
