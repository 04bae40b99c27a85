"""jax_grouped_attn: exact flash attention for JAX with grouped (zigzag) queries."""

from jax_grouped_attn.api import (
  attention,
  context_parallel_attention,
  grouped_attention,
  segment_ids_from_cu_seqlens,
)
from jax_grouped_attn.config import AttentionConfig, BackwardConfig, ForwardConfig
from jax_grouped_attn.cp import (
  ContextParallel,
  zigzag_groups,
  zigzag_permute,
  zigzag_positions,
  zigzag_unpermute,
)
from jax_grouped_attn.dropin import dot_product_attention
from jax_grouped_attn.explain import explain
from jax_grouped_attn.groups import QueryGroup

__all__ = [
    "AttentionConfig", "BackwardConfig", "ForwardConfig", "QueryGroup",
    "attention", "dot_product_attention", "explain", "grouped_attention",
    "segment_ids_from_cu_seqlens",
    "zigzag_groups", "zigzag_positions",
    "ContextParallel", "context_parallel_attention", "zigzag_permute",
    "zigzag_unpermute",
]
__version__ = "0.1.0"
