"""Triton kernels (jax_triton.triton_call on GPU, Triton interpreter on CPU)."""
