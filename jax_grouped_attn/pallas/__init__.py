"""Pallas (Triton-lowered on GPU, interpreted on CPU) kernels of jax_grouped_attn."""
