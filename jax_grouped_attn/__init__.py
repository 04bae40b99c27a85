"""jax_grouped_attn: exact flash attention for JAX with grouped (zigzag) queries."""

from jax_grouped_attn.api import attention, grouped_attention, segment_ids_from_cu_seqlens
from jax_grouped_attn.config import AttentionConfig, BackwardConfig, ForwardConfig
from jax_grouped_attn.dropin import dot_product_attention
from jax_grouped_attn.explain import explain
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.parallel import ContextParallel, context_parallel_attention
from jax_grouped_attn.zigzag import (
                                  zigzag_groups,
                                  zigzag_permute,
                                  zigzag_positions,
                                  zigzag_unpermute,
)

__all__ = [
    "AttentionConfig", "BackwardConfig", "ForwardConfig", "QueryGroup",
    "attention", "dot_product_attention", "explain", "grouped_attention",
    "segment_ids_from_cu_seqlens",
    "zigzag_groups", "zigzag_positions",
    "ContextParallel", "context_parallel_attention", "zigzag_permute",
    "zigzag_unpermute",
]
__version__ = "0.1.0"
