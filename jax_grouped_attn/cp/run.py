"""Run: the resolved kernel choice (call.Kernels) as every strategy uses it."""

from __future__ import annotations

import dataclasses

from jax_grouped_attn import autodiff
from jax_grouped_attn.call import Kernels
from jax_grouped_attn.plan import Problem


@dataclasses.dataclass(frozen=True)
class Run:
  """The API's Kernels, with the three ways a strategy launches them."""

  kernels: Kernels

  def launch(self, problem: Problem, q, k, v, qs, ks):
    """(out, lse) of one grouped launch, differentiable (autodiff's custom_vjp)."""
    return autodiff.differentiable(problem, self.kernels, q, k, v, qs, ks)

  def forward(self, problem: Problem, q, k, v, qs, ks):
    """(out, lse) of the forward kernel alone (for a strategy's own custom_vjp)."""
    return autodiff.forward(problem, self.kernels, q, k, v, qs, ks)

  def gradients(self, problem: Problem, q, k, v, qs, ks, out, lse, dout, dlse):
    """(dq, dk, dv) of the backward kernel, given the (possibly merged) out, lse."""
    return autodiff.backward(problem, self.kernels, q, k, v, qs, ks, out, lse, dout, dlse)
