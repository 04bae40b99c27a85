"""The registry entry of the Mosaic GPU kernels (Hopper: TMA, wgmma, warp
specialisation). Compiled only: JAX's Mosaic GPU interpreter cannot run them,
so on CPU they are traced and lowered for CUDA in tests, never executed."""

from __future__ import annotations

import functools

import jax

from jax_grouped_attn.backend import KernelBackend
from jax_grouped_attn.pallas.mosaic import config as mosaic_config, heuristics
from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig, MosaicForwardConfig

_DTYPES = ("bfloat16", "float16")


@functools.lru_cache(maxsize=None)
def _compute_capability() -> float | None:
  try:
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return None if cc is None else float(cc)
  except (RuntimeError, ValueError):
    return None


class PallasMosaicBackend(KernelBackend):
  name = "pallas_mosaic"
  forward_config_class = MosaicForwardConfig
  heuristics = heuristics
  backward_config_class = MosaicBackwardConfig
  interpretable = False
  launcher_module = "jax_grouped_attn.pallas.mosaic.launch"
  supports_softcap = True   # head_dim <= 128 (supports says why not above)
  sizes_v_apart = True      # tiles for q/k's width and v's (MLA: 192 and 128)

  def unavailable(self, platform: str) -> str | None:
    if platform != "gpu":
      return (f"backend={self.name!r} runs Mosaic GPU kernels, which need an NVIDIA Hopper "
              f"(sm_90+) GPU; JAX's platform here is {platform!r}. Use 'pallas' (the "
              "Triton-lowered Pallas kernels, interpreted on CPU), 'triton' or 'xla'.")
    cc = _compute_capability()
    if cc is not None and cc < 9.0:
      return (f"backend={self.name!r} needs a Hopper (sm_90+) GPU for TMA and wgmma; this "
              f"GPU is sm_{int(cc * 10)}. Use 'pallas' or 'triton'.")
    return None

  def supports(self, problem, dtype) -> str | None:
    if str(jax.numpy.dtype(dtype)) not in _DTYPES:
      return (f"backend={self.name!r} takes bfloat16/float16 (wgmma); got {dtype}. Use "
              "backend='pallas' (which falls back to the Triton-lowered Pallas kernels for "
              "float32), 'triton' or 'xla'.")
    if problem.softcap is not None and self.padded_head_dim(problem.tile_head_dim) > 128:
      return (f"logits_soft_cap={problem.softcap} with head_dim {problem.tile_head_dim} is not "
              f"supported by backend={self.name!r}: above 128 its backward splits head_dim "
              "between two warpgroups (head_split=2), which pass P through shared memory with "
              "no room for the cap's 1 - tanh^2. Use 'triton', 'pallas_triton' or 'xla' (or "
              "'auto', which picks one).")
    return super().supports(problem, dtype)

  def nondeterministic(self, config) -> str | None:
    if isinstance(config, MosaicBackwardConfig) and config.fused_dq and not config.ordered:
      return "fused_dq=True adds dQ in fp32 in an order that varies run to run"
    return None

  def nondeterministic_config(self, pass_, problem, dtype):
    fused = MosaicBackwardConfig(fused_dq=True)   # where it fits (config.fused_unfit)
    if pass_ != "backward" or mosaic_config.fused_unfit(fused, *self.head_dims(problem)):
      return None
    return fused

  def padded_head_dim(self, head_dim: int) -> int:
    return mosaic_config.padded_head_dim(head_dim)

  def forward_plan(self, problem, config):
    return self.launcher().forward_plan(problem, config)

  def backward_plan(self, problem, config):
    return self.launcher().backward_plan(problem, config)

  def small_configs(self):
    # 64-row tiles are a wgmma's minimum; one warpgroup keeps a CTA at 64 rows.
    return (MosaicForwardConfig(block_q=64, block_kv=64, compute_wgs=1),
            MosaicBackwardConfig(compute_wgs=1))

  def tuning_candidates(self, pass_, head_dim, mode):
    return mosaic_config.tuning_candidates(pass_, self.padded_head_dim(head_dim), mode)


PALLAS_MOSAIC = PallasMosaicBackend()
