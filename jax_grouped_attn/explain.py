"""What a call would run: ``explain(q, k, v, ...)`` and ``python -m jax_grouped_attn.info``.

For the arguments of :func:`jax_grouped_attn.attention` (or, with ``groups``,
:func:`jax_grouped_attn.grouped_attention`) it reports, per pass, the backend
``backend=`` resolves to, the kernel config, and where that config came from
(the caller, a tuned table and which file, a family fallback, a default
derived from the family's tables, or the backend's heuristic). Nothing is
traced or run: q, k, v may be ``jax.ShapeDtypeStruct``s.
"""

from __future__ import annotations

import dataclasses

from jax_grouped_attn import registry, tuning, validate
from jax_grouped_attn.config import PASSES, as_attention_config
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.platform import current_platform


@dataclasses.dataclass(frozen=True)
class PassPlan:
  """One pass: the registry entry that runs it, its config and the config's origin."""

  pass_: str
  backend: str
  config: object
  source: str
  detail: str


@dataclasses.dataclass(frozen=True)
class Explanation:
  """The resolved call: platform, GPU (None without one), interpret mode, per-pass plans."""

  platform: str
  gpu: tuning.Gpu | None
  table: tuning.TableChoice | None
  interpret: bool
  passes: tuple[PassPlan, ...]
  backward_mode: str

  def __getitem__(self, pass_: str) -> PassPlan:
    for p in self.passes:
      if p.pass_ == pass_:
        return p
    raise KeyError(f"pass {pass_!r}; passes are {PASSES}")

  def __str__(self) -> str:
    gpu = ("no GPU" if self.gpu is None else
           f"{self.gpu.name} (compute capability {self.gpu.compute_capability or '?'}, "
           f"{self.gpu.sm_count or '?'} SMs)")
    table = "none" if self.table is None else self.table.describe()
    lines = [f"platform: {self.platform}; GPU: {gpu}",
             f"table: {table}",
             f"interpret: {self.interpret}"]
    for p in self.passes:
      lines.append(f"{p.pass_:8}  backend={p.backend!r}  config={p.config!r}")
      lines.append(f"{'':8}  from: {p.source} ({p.detail})")
    if self.backward_mode == "reference":
      lines.append("backward='reference': the backward runs the jnp reference, not a kernel")
    return "\n".join(lines)


def explain(q, k, v, groups=None, *, causal=None, softmax_scale=None, segment_ids=None,
            q_segment_ids=None, kv_segment_ids=None, backend="auto", config=None,
            interpret=None, backward="kernel", local_window_size=None,
            deterministic=True) -> Explanation:
  """Which backend and config each pass of this call would use, and why.

  Args as :func:`jax_grouped_attn.attention` (``groups=None``; ``causal``
  defaults to False) or :func:`jax_grouped_attn.grouped_attention` (``groups``
  given; ``causal`` defaults to True). q: [B, Tq, Hq, D], k, v: [B, Tk, Hk, D]
  arrays or ShapeDtypeStructs. Raises what the call would raise.
  """
  for name, x in (("q", q), ("k", k)):
    validate.check_array(name, x)
  if segment_ids is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("pass segment_ids or q_segment_ids/kv_segment_ids, not both.")
    q_segment_ids = kv_segment_ids = segment_ids
  if groups is None:
    tq, tk = q.shape[1], k.shape[1]
    groups = (QueryGroup(0, tq, tk - tq, tk),)
    causal = False if causal is None else causal
  else:
    causal = True if causal is None else causal
  problem = validate.make_problem(q, k, v, groups, causal=causal, softmax_scale=softmax_scale,
                                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                  local_window_size=local_window_size)
  cfg = as_attention_config(config)
  backward = validate.check_backward_mode(backward)
  deterministic = validate.check_bool("deterministic", deterministic)
  entries, interp = registry.resolve(backend, interpret, cfg, problem, q.dtype)
  registry.check_config(entries, cfg, deterministic)
  plans = []
  for pass_, entry in zip(PASSES, entries):
    choice = registry.config_choice(entry, pass_, problem, q.dtype, cfg, deterministic)
    plans.append(PassPlan(pass_, entry.name, choice.config, choice.source, choice.detail))
  return Explanation(current_platform(), tuning.this_gpu(), tuning.find_table(), interp,
                     tuple(plans), backward)
