"""The one list of backends, and how a user's ``backend=`` / ``config=`` map to them.

An entry is a :class:`jax_grouped_attn.backend.Backend`. Adding a kernel
family is one folder (kernels, launcher, heuristics, a ``backend.py`` with its
entry) plus one line in ``ENTRIES`` (see notes/architecture.md). ``ALIASES``
name a choice among entries; "auto" is the fastest available entry on GPU and
the reference elsewhere.
"""

from __future__ import annotations

import warnings

from jax_grouped_attn import tuning
from jax_grouped_attn.backend import Backend
from jax_grouped_attn.config import PASSES, AttentionConfig
from jax_grouped_attn.pallas.backend import PALLAS_TRITON
from jax_grouped_attn.platform import current_platform
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.reference import XLA
from jax_grouped_attn.triton.backend import TRITON

ENTRIES: tuple[Backend, ...] = (XLA, TRITON, PALLAS_TRITON)
# alias -> entries it may stand for, in order of preference.
ALIASES: dict[str, tuple[str, ...]] = {"pallas": ("pallas_triton",)}
# "auto" on a GPU: the first available of these.
AUTO_GPU: tuple[str, ...] = ("triton", "pallas_triton")

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


def resolve(backend, interpret, config: AttentionConfig | None = None) -> tuple[Backend, bool]:
  """Maps the user's ``backend`` / ``interpret`` (/ ``config``) to (entry, interpret).

  On a GPU the kernels are compiled; without one, interpretable kernel
  backends run under their interpreter. An alias picks its first available
  entry that takes the given configs.
  """
  if not isinstance(backend, str) or backend not in names():
    raise ValueError(f"backend={backend!r} is unknown; use one of {names()}.")
  if interpret is not None and not isinstance(interpret, bool):
    raise TypeError(f"interpret must be None or a bool, got {interpret!r}.")
  config = config or AttentionConfig()
  platform = current_platform()
  if backend == "auto":
    candidates = AUTO_GPU if platform == "gpu" else ("xla",)
    usable = [n for n in candidates if available(n, platform) and _takes(get(n), config)]
    backend = usable[0] if usable else "xla"
  elif backend in ALIASES:
    usable = [n for n in ALIASES[backend] if available(n, platform)]
    fitting = [n for n in usable if _takes(get(n), config)]
    backend = (fitting or usable or ALIASES[backend])[0]
  entry = get(backend)
  reason = entry.unavailable(platform)
  if reason is not None:
    raise ValueError(reason)
  if entry.native_autodiff:
    if interpret:
      raise ValueError(f"interpret=True has no meaning for backend={entry.name!r} (plain jnp).")
    return entry, False
  if platform == "cpu":
    if interpret is False or not entry.interpretable:
      raise ValueError(
          f"backend={entry.name!r} with interpret=False needs a GPU, and JAX sees none "
          "here; leave interpret=None (interpreted on CPU) or use backend='xla'."
          if entry.interpretable else
          f"backend={entry.name!r} needs a GPU (it has no interpreter); use backend='xla' "
          "or 'triton' on CPU.")
    return entry, True
  return entry, bool(interpret)


def check_config(entry: Backend, config: AttentionConfig) -> None:
  """Raises if a config was given for a pass that ``entry`` cannot use."""
  for pass_ in PASSES:
    given = config.given(pass_)
    cls = entry.config_class(pass_)
    if given and cls not in {type(c) for c in given}:
      takes = cls.__name__ if cls is not None else "no config"
      raise ValueError(
          f"config.{pass_}={given if len(given) > 1 else given[0]!r} cannot be used by "
          f"backend={entry.name!r}, which takes {takes} for the {pass_} pass.")


def default_config(backend: str, pass_: str, head_dim: int, *, seq_len: int | None = None,
                   dtype=None):
  """The config entry ``backend`` uses for ``pass_`` when none is given: this
  GPU's tuned entry (``seq_len``, the key length, picks its bucket), else the
  backend's heuristic; None for a backend without configs."""
  entry = get(backend)
  cls = entry.config_class(pass_)
  if cls is None:
    return None
  try:
    tuned = tuning.tuned_config(pass_, entry.name, cls, head_dim, seq_len=seq_len, dtype=dtype)
  except Exception as e:  # noqa: BLE001 -- a broken table must never break attention
    warnings.warn(f"tuned table lookup failed ({e}); using the heuristic", stacklevel=2)
    tuned = None
  return tuned if tuned is not None else entry.heuristic_config(pass_, head_dim, dtype)


def config_for(entry: Backend, pass_: str, problem: Problem, dtype, config: AttentionConfig):
  """The user's config of ``entry``'s class for ``pass_``, else :func:`default_config`."""
  cls = entry.config_class(pass_)
  given = None if cls is None else config.get(pass_, cls)
  if given is not None:
    return given
  return default_config(entry.name, pass_, problem.head_dim, seq_len=problem.tk, dtype=dtype)
