"""The Triton backend's registry entry: @triton.jit kernels through jax_triton
on GPU, Triton's interpreter on CPU."""

from __future__ import annotations

from jax_grouped_attn.backend import TileKernelBackend
from jax_grouped_attn.platform import module_available
from jax_grouped_attn.triton import heuristics


class TritonBackend(TileKernelBackend):
  name = "triton"
  heuristics = heuristics
  interpretable = True
  supports_softcap = True
  launcher_module = "jax_grouped_attn.triton.launch"

  def unavailable(self, platform: str) -> str | None:
    if not (module_available("triton") and module_available("jax_triton")):
      return ("backend='triton' needs the packages 'triton' and 'jax-triton', which are "
              "not importable here. Install them (pip install jax-triton triton) or use "
              "backend='pallas' or 'xla'.")
    if platform not in ("gpu", "cpu"):
      return (f"backend='triton' cannot run on platform {platform!r}: its kernels are "
              "Triton kernels for NVIDIA GPUs (interpretable on CPU). Use backend='xla' here.")
    return None


TRITON = TritonBackend()
