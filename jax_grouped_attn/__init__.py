"""jax_grouped_attn: exact flash attention for JAX with grouped (zigzag) queries."""

from jax_grouped_attn.api import (attention, grouped_attention,
                                  segment_ids_from_cu_seqlens)
from jax_grouped_attn.config import (AttentionConfig, BackwardConfig,
                                     ForwardConfig)
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.zigzag import zigzag_groups, zigzag_positions

__all__ = [
    "AttentionConfig", "BackwardConfig", "ForwardConfig", "QueryGroup",
    "attention", "grouped_attention", "segment_ids_from_cu_seqlens",
    "zigzag_groups", "zigzag_positions",
]
__version__ = "0.1.0"
