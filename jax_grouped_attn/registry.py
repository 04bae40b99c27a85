"""The one list of backends, and how a user's ``backend=`` / ``config=`` map to them.

An entry is a :class:`jax_grouped_attn.backend.Backend`. Adding a kernel
family is one folder (kernels, launcher, heuristics, a ``backend.py`` with its
entry) plus one line in ``ENTRIES`` (see notes/architecture.md). ``ALIASES``
name a choice among entries; "auto" is the fastest available entry on GPU and
the reference elsewhere.
"""

from __future__ import annotations

import dataclasses
import warnings

from jax_grouped_attn import tuning
from jax_grouped_attn.backend import Backend
from jax_grouped_attn.config import PASSES, AttentionConfig
from jax_grouped_attn.pallas.backend import PALLAS_TRITON
from jax_grouped_attn.pallas.mosaic.backend import PALLAS_MOSAIC
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.platform import current_platform, warn_if_gpu_unused
from jax_grouped_attn.reference import XLA
from jax_grouped_attn.triton.backend import TRITON

ENTRIES: tuple[Backend, ...] = (XLA, PALLAS_MOSAIC, TRITON, PALLAS_TRITON)
# alias -> entries it may stand for, in order of preference ("pallas": Mosaic
# GPU on Hopper for 16-bit inputs, the Triton lowering elsewhere).
ALIASES: dict[str, tuple[str, ...]] = {"pallas": ("pallas_mosaic", "pallas_triton")}
# "auto" on a GPU: per pass, the fastest of these in the tuned table, else the
# first usable (H100, 2026-11-26: Mosaic forward 1.05x cuDNN, Triton 0.85x).
AUTO_GPU: tuple[str, ...] = ("pallas_mosaic", "triton", "pallas_triton")

_BY_NAME = {b.name: b for b in ENTRIES}


def names() -> tuple[str, ...]:
  """Every name ``backend=`` accepts."""
  return ("auto",) + tuple(_BY_NAME) + tuple(ALIASES)


def get(name: str) -> Backend:
  """The entry called ``name`` (no alias resolution)."""
  try:
    return _BY_NAME[name]
  except KeyError:
    raise ValueError(f"backend={name!r} is not an entry; entries: {tuple(_BY_NAME)}.") from None


def kernel_entries() -> tuple[Backend, ...]:
  """Every entry except the reference."""
  return tuple(b for b in ENTRIES if not b.native_autodiff)


def available(name: str, platform: str | None = None) -> bool:
  return get(name).unavailable(platform or current_platform()) is None


def _takes(entry: Backend, config: AttentionConfig) -> bool:
  """Whether every pass with given configs has one ``entry`` takes."""
  for pass_ in PASSES:
    given = config.given(pass_)
    if given and entry.config_class(pass_) not in {type(c) for c in given}:
      return False
  return True


def _platform_interpret(entry: Backend, interpret, platform: str) -> bool:
  """The interpret flag ``entry`` runs with on ``platform`` (or a clear error)."""
  reason = entry.unavailable(platform)
  if reason is not None:
    raise ValueError(reason)
  if entry.native_autodiff:
    if interpret:
      raise ValueError(f"interpret=True has no meaning for backend={entry.name!r} (plain jnp).")
    return False
  if platform == "cpu":
    if interpret is False or not entry.interpretable:
      raise ValueError(
          f"backend={entry.name!r} with interpret=False needs a GPU, and JAX sees none "
          "here; leave interpret=None (interpreted on CPU) or use backend='xla'."
          if entry.interpretable else
          f"backend={entry.name!r} needs a GPU (it has no interpreter); use backend='xla' "
          "or 'triton' on CPU.")
    return True
  return bool(interpret)


def _usable(name: str, platform: str, config: AttentionConfig, problem, dtype,
            interpret) -> bool:
  entry = get(name)
  if entry.unavailable(platform) is not None or not _takes(entry, config):
    return False
  if platform == "cpu" and not (entry.interpretable or entry.native_autodiff):
    return False
  if interpret and not (entry.interpretable or entry.native_autodiff):
    return False
  return problem is None or entry.supports(problem, dtype) is None


def _fastest(pass_: str, names, problem: Problem, dtype) -> str | None:
  """The entry of ``names`` this GPU's tuned table times fastest for ``pass_``
  at ``problem``'s head_dim and length; None unless every one of ``names`` has
  a timing there (an untimed entry is not evidence of a slow one).

  Forward entries hold forward times; backward entries hold fwd+bwd times,
  so a backward's own cost is that minus its forward entry's time.
  """
  times = {}
  for name in names:
    entry = get(name)
    cls = entry.config_class(pass_)
    if cls is None:
      continue
    look = lambda p, c: tuning.lookup(p, name, c, problem.head_dim, seq_len=problem.tk,
                                      dtype=dtype, head_dim_v=problem.head_dim_v,
                                      padded=_padded(entry))
    try:
      got = look(pass_, cls)
      if got is None or not isinstance(got.get("ms"), (int, float)):
        continue
      ms = float(got["ms"])
      if pass_ == "backward":
        fwd = look("forward", entry.config_class("forward"))
        if fwd is None or not isinstance(fwd.get("ms"), (int, float)):
          continue
        ms -= float(fwd["ms"])
    except Exception:  # noqa: BLE001 -- a broken table must never break attention
      continue
    times[name] = ms
  if not times or len(times) < len(names):
    return None
  return min(times, key=times.get)


def resolve(backend, interpret, config: AttentionConfig | None = None,
            problem: Problem | None = None, dtype=None) -> tuple[tuple[Backend, Backend], bool]:
  """Maps the user's ``backend`` / ``interpret`` / ``config`` to ((forward
  entry, backward entry), interpret).

  An entry name runs both passes. An alias picks its first entry that runs
  here, takes the given configs and supports ``problem`` in ``dtype``.
  "auto" on a GPU picks the forward and the backward independently (they
  share the out/lse residual contract): the fastest in this GPU's tuned table,
  else the first usable of ``AUTO_GPU``; elsewhere it is the reference.
  """
  if not isinstance(backend, str) or backend not in names():
    raise ValueError(f"backend={backend!r} is unknown; use one of {names()}.")
  if interpret is not None and not isinstance(interpret, bool):
    raise TypeError(f"interpret must be None or a bool, got {interpret!r}.")
  config = config or AttentionConfig()
  platform = current_platform()
  usable = lambda n: _usable(n, platform, config, problem, dtype, interpret)
  if backend == "auto":
    if platform != "gpu":
      warn_if_gpu_unused()
      picks = ("xla", "xla")
    else:
      picks = []
      for p in PASSES:
        candidates = [n for n in AUTO_GPU if usable(n) and (
            problem is None or get(n).auto_candidate(p, problem.tile_head_dim, dtype))] or ["xla"]
        picks.append((_fastest(p, candidates, problem, dtype) if problem is not None else None)
                     or candidates[0])
      picks = tuple(picks)
  elif backend in ALIASES:
    fitting = [n for n in ALIASES[backend] if usable(n)]
    picks = ((fitting or ALIASES[backend])[0],) * 2
  else:
    picks = (backend, backend)
  entries = tuple(get(n) for n in picks)
  interp = None
  for entry in dict.fromkeys(entries):
    flag = _platform_interpret(entry, interpret, platform)
    interp = flag if interp is None else interp or flag
    if problem is not None:
      why = entry.supports(problem, dtype)
      if why is not None:
        raise ValueError(why)
  return entries, bool(interp)


def check_config(entries: tuple[Backend, Backend], config: AttentionConfig,
                 deterministic: bool = True) -> None:
  """Raises if a config was given for a pass that its kernel entry cannot use,
  or one whose results vary run to run without ``deterministic=False``. (The
  reference has no tiles: code that switches to backend="xla" keeps its
  config argument, as it always could.)"""
  for pass_, entry in zip(PASSES, entries):
    given = config.given(pass_)
    cls = entry.config_class(pass_)
    if entry.native_autodiff:
      continue
    if given and cls not in {type(c) for c in given}:
      takes = cls.__name__ if cls is not None else "no config"
      raise ValueError(
          f"config.{pass_}={given if len(given) > 1 else given[0]!r} cannot be used by "
          f"backend={entry.name!r}, which takes {takes} for the {pass_} pass.")
    for c in given if deterministic else ():
      why = entry.nondeterministic(c) if type(c) is cls else None
      if why is not None:
        raise ValueError(f"config.{pass_}={c!r} is not deterministic: {why}. Pass "
                         "deterministic=False to allow it.")


@dataclasses.dataclass(frozen=True)
class ConfigChoice:
  """A pass's config and where it came from: ``source`` is "given" (the
  caller's), "table" (this GPU's tuned table, or a family fallback: ``detail``
  says which file), "derived" (the best config the shipped tables of this
  GPU's family measured) or "heuristic" (the backend's own rule)."""

  config: object
  source: str
  detail: str = ""


def _padded(entry: Backend):
  """The width ``entry``'s kernels run a head_dim at (the table key after the
  exact one), or None (the power-of-two default)."""
  return getattr(entry, "padded_head_dim", None)


def default_choice(backend: str, pass_: str, head_dim: int, *, seq_len: int | None = None,
                   dtype=None, head_dim_v: int | None = None) -> ConfigChoice:
  """The config ``backend`` uses for ``pass_`` when none is given, and why: this
  GPU's table (exact name, else the nearest of its family; ``seq_len``, the
  key length, picks the bucket), else a default derived from its family's
  tables, else the backend's heuristic. ``head_dim`` is q/k's, ``head_dim_v``
  v's where it differs. The config is None for a backend without configs."""
  entry = get(backend)
  cls = entry.config_class(pass_)
  if cls is None:
    return ConfigChoice(None, "none", f"backend={backend!r} takes no {pass_} config")
  try:
    table = tuning.find_table()
    tuned = None if table is None else tuning.tuned_config(
        pass_, entry.name, cls, head_dim, seq_len=seq_len, dtype=dtype, head_dim_v=head_dim_v,
        padded=_padded(entry))
    if tuned is not None:
      bucket = ("any length" if seq_len is None else
                f"key-length bucket {tuning.seq_bucket(seq_len)}")
      return ConfigChoice(tuned, "table", f"{table.describe()}; {bucket}")
    gpu = tuning.this_gpu()
    major = None if gpu is None else gpu.major
    got = tuning.derived(pass_, entry.name, cls, head_dim, dtype, major, head_dim_v=head_dim_v,
                         padded=_padded(entry))
    if got is not None:
      return ConfigChoice(got.config, "derived", (
          f"no table entry for {gpu.name}; the config the shipped sm_{major}x tables timed "
          f"within {got.worst_slowdown:.2f}x of the best in {len(got.slots)} measurement(s)"))
  except Exception as e:  # noqa: BLE001 -- a broken table must never break attention
    warnings.warn(f"tuned table lookup failed ({e}); using the heuristic", stacklevel=2)
  dims = head_dim if head_dim_v is None else f"{head_dim} (v {head_dim_v})"
  return ConfigChoice(entry.heuristic_config(pass_, head_dim, dtype, head_dim_v=head_dim_v),
                      "heuristic", f"{backend}'s heuristic for head_dim {dims}")


def default_config(backend: str, pass_: str, head_dim: int, *, seq_len: int | None = None,
                   dtype=None, head_dim_v: int | None = None):
  """The config of :func:`default_choice` (None for a backend without configs)."""
  return default_choice(backend, pass_, head_dim, seq_len=seq_len, dtype=dtype,
                        head_dim_v=head_dim_v).config


def config_choice(entry: Backend, pass_: str, problem: Problem, dtype,
                  config: AttentionConfig, deterministic: bool = True) -> ConfigChoice:
  """The user's config of ``entry``'s class for ``pass_``; else, under
  ``deterministic=False``, the entry's non-deterministic config if it has one
  for ``problem``; else :func:`default_choice`."""
  cls = entry.config_class(pass_)
  given = None if cls is None else config.get(pass_, cls)
  if given is not None:
    return ConfigChoice(given, "given", "the config argument")
  if not deterministic:
    fast = entry.nondeterministic_config(pass_, problem, dtype)
    if fast is not None:
      return ConfigChoice(fast, "deterministic=False", entry.nondeterministic(fast) or "")
  choice = default_choice(entry.name, pass_, problem.head_dim, seq_len=problem.tk,
                          dtype=dtype, head_dim_v=problem.head_dim_v)
  why = entry.nondeterministic(choice.config) if deterministic else None
  if why is not None:   # a table never makes the default non-deterministic
    return ConfigChoice(entry.heuristic_config(pass_, problem.head_dim, dtype,
                                               head_dim_v=problem.head_dim_v),
                        "heuristic", f"the table's {choice.config!r} is not deterministic ({why})")
  return choice


def config_for(entry: Backend, pass_: str, problem: Problem, dtype, config: AttentionConfig,
               deterministic: bool = True):
  """The config of :func:`config_choice`."""
  return config_choice(entry, pass_, problem, dtype, config, deterministic).config
