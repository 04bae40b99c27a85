"""Pallas Mosaic GPU (Hopper: TMA + wgmma, warp-specialised) kernels of jax_grouped_attn."""
