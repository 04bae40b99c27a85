"""Kernels: the resolved kernel choice of one call, built once by the API.

Everything below the API (autodiff's custom_vjp, every context-parallel
strategy) takes a validated ``Problem`` and this one object, never the user's
loose ``backend`` / ``config`` / ``interpret`` / ``backward`` arguments.
"""

from __future__ import annotations

import dataclasses

from jax_grouped_attn.config import AttentionConfig

MODES = ("kernel", "reference")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """forward / backward: registry entry names per pass (they share the out/lse
  residual contract); config: the AttentionConfig the entries take their
  configs from; interpret: run interpreted; mode: "kernel" (the backward
  entry's kernels) or "reference" (the reference formula, for isolating
  kernel bugs); deterministic: False lets the backward take kernels whose
  float adds run in a varying order (the caller's opt-in, never a default)."""

  forward: str
  backward: str
  config: AttentionConfig = AttentionConfig()
  interpret: bool = False
  mode: str = "kernel"
  deterministic: bool = True

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Kernels.mode={self.mode!r} must be one of {MODES}.")
    if not isinstance(self.deterministic, bool):
      raise ValueError(f"Kernels.deterministic={self.deterministic!r} must be a bool.")

  @classmethod
  def both(cls, name: str, **kw) -> "Kernels":
    """One entry for both passes."""
    return cls(name, name, **kw)
