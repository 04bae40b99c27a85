"""The resolved kernel choice, the one carrier every strategy hands down to
autodiff."""

from __future__ import annotations

import dataclasses

from jax_grouped_attn import autodiff
from jax_grouped_attn.plan import Problem


@dataclasses.dataclass(frozen=True)
class Run:
  """backend: an entry name, or a (forward, backward) pair of them; config: an
  AttentionConfig; interpret, backward: resolved (see autodiff.attention)."""

  backend: object
  config: object
  interpret: bool
  backward: str

  def attention(self, problem: Problem, q, k, v, qs, ks):
    """(out, lse) of one grouped launch, differentiable (autodiff's custom_vjp)."""
    return autodiff.attention(problem, self.backend, self.config, self.interpret,
                              self.backward, q, k, v, qs, ks)

  def forward(self, problem: Problem, q, k, v, qs, ks):
    """(out, lse) of the forward kernel alone (for a strategy's own custom_vjp)."""
    return autodiff.attention_fwd(problem, self.backend, self.config, self.interpret,
                                  q, k, v, qs, ks)

  def gradients(self, problem: Problem, q, k, v, qs, ks, out, lse, dout, dlse):
    """(dq, dk, dv) of the backward kernel, given the (possibly merged) out, lse."""
    return autodiff.attention_bwd(problem, self.backend, self.config, self.interpret,
                                  self.backward, q, k, v, qs, ks, out, lse, dout, dlse)
