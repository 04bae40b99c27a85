"""The registry entry of the Triton-lowered Pallas kernels (``pallas_call``
with ``jax.experimental.pallas.triton`` compiler params; Pallas interpret mode
on CPU)."""

from __future__ import annotations

from jax_grouped_attn import vma
from jax_grouped_attn.backend import TileKernelBackend
from jax_grouped_attn.pallas import heuristics


class PallasTritonBackend(TileKernelBackend):
  name = "pallas_triton"
  heuristics = heuristics
  interpretable = True
  supports_softcap = True
  interpret_vma = False
  launcher_module = "jax_grouped_attn.pallas.launch"

  def unavailable(self, platform: str) -> str | None:
    if platform not in ("gpu", "cpu"):
      return (f"backend={self.name!r} cannot run on platform {platform!r}: its kernels "
              "are Pallas kernels lowered through Triton for NVIDIA GPUs (interpretable "
              "on CPU). Use backend='xla' here.")
    return None


  def check_launchable(self, problem, dtype, interpret, *arrays):
    if interpret and not self.interpret_vma and vma.union(*arrays) and vma.checking():
      raise ValueError(
          f"backend={self.name!r} in interpret mode (no GPU) cannot run inside "
          "jax.shard_map with check_vma=True: JAX's Pallas interpreter fails the "
          "varying-axes check. Pass check_vma=False to shard_map, or use "
          "backend='triton' or 'xla' on CPU (the compiled GPU Pallas kernels are fine).")


PALLAS_TRITON = PallasTritonBackend()
