"""The ContextParallel spec, and the composition of strategies it stands for.

A user names mesh axes and a strategy; :attr:`ContextParallel.composition`
says what runs, with no field whose meaning depends on another: one
:class:`Strategy` over the sequence axes, or :class:`TwoD` (Ulysses over
inner axes around allgather or ring over outer ones).
"""

from __future__ import annotations

import dataclasses

from jax_grouped_attn import validate

STRATEGIES = ("allgather", "ring", "ulysses")


def axis_names(axis) -> tuple[str, ...]:
  """``axis`` (None, a mesh axis or a tuple of them) as a tuple of names."""
  return () if axis is None else (axis if isinstance(axis, tuple) else (axis,))


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One strategy (a name of STRATEGIES) over the mesh axis (or tuple of axes,
  one flattened axis) ``axis_name``."""

  name: str
  axis_name: str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TwoD:
  """2-D context parallelism: Ulysses over ``ulysses_axis_name`` (inner, e.g.
  intra-node), then ``outer`` ("allgather" or "ring") over its axes on the
  tokens each Ulysses group gathered (see ``cp.two_d``)."""

  outer: Strategy
  ulysses_axis_name: str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Shard the sequence over mesh axes in zigzag order.

  axis_name: a mesh axis or a tuple of them (one flattened axis).
  strategy: "allgather" (gather K, V once; one kernel), "ring" (K, V circulate
    with ppermute; memory independent of the world size) or "ulysses"
    (all-to-all to head sharding; needs Hq % W == 0).
  ulysses_axis_name: 2-D context parallelism: Ulysses over these (inner,
    e.g. intra-node) axes, ``strategy`` ("allgather" or "ring") over
    ``axis_name``; the sequence is sharded over ``sequence_axes``.
  """

  axis_name: str | tuple[str, ...]
  strategy: str = "allgather"
  ulysses_axis_name: str | tuple[str, ...] | None = None

  def __post_init__(self):
    validate.check_context_parallel(self.axis_name, self.strategy, self.ulysses_axis_name,
                                    STRATEGIES)

  @property
  def sequence_axes(self) -> tuple[str, ...]:
    """All axes the sequence is sharded over, outer-major: q, k, v take
    ``P(batch_axes, cp.sequence_axes)``."""
    return axis_names(self.axis_name) + axis_names(self.ulysses_axis_name)

  @property
  def composition(self) -> Strategy | TwoD:
    """What runs: ``strategy`` over ``axis_name``, or 2-D when
    ``ulysses_axis_name`` is given."""
    outer = Strategy(self.strategy, self.axis_name)
    return outer if self.ulysses_axis_name is None else TwoD(outer, self.ulysses_axis_name)
