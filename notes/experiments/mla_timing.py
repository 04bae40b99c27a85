"""MLA shapes (q/k head_dim DQK, v head_dim DV), bf16 causal B1 S8192 H16, one
process, rounds interleaved, medians of 10 calls per round (fwd and fwd+bwd):

  ours          pallas_mosaic with v [.., DV] (tiles sized for each width), at
                its default configs (tuned table / heuristic) and at other tiles
  padded v      the workaround: v zero-padded to DQK, out sliced (this build)
  before        what the workaround ran before tiles were sized apart: q, k, v
                zero-padded to 256 (the old padded width of 192), same scale
  cudnn padv    jax.nn's cuDNN with v zero-padded to DQK (it refuses DV != DQK)

  python3 notes/experiments/mla_timing.py [DQKxDV ...]     (default 192x128 128x64)
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_grouped_attn as ga
from benchmarks.common import time_calls
from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig, MosaicForwardConfig

S, H = 8192, 16
rng = np.random.default_rng(0)


def pad_to(x, d):
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d - x.shape[-1])))


def variants(dqk, dv):
  scale = 1 / np.sqrt(dqk)
  mosaic = lambda cfg=None: lambda q, k, v: ga.attention(q, k, v, causal=True,
                                                           backend="pallas_mosaic", config=cfg)
  out = {"ours": mosaic()}
  if (dqk, dv) == (192, 128):
    out["ours fwd 128-key"] = mosaic(MosaicForwardConfig(64, 128, 2, 2))
    out["ours fwd 64-key 3st"] = mosaic(MosaicForwardConfig(64, 64, 3, 2))
    out["ours bwd 3 stages"] = mosaic(ga.AttentionConfig(
        forward=MosaicForwardConfig(64, 128, 2, 2),
        backward=MosaicBackwardConfig(max_concurrent_steps=3, compute_wgs=2, head_split=2)))
  out["padded v"] = lambda q, k, v: ga.attention(q, k, pad_to(v, dqk), causal=True,
                                                 backend="pallas_mosaic")[..., :dv]
  if dqk == 192:
    out["before (256)"] = lambda q, k, v: ga.attention(
        pad_to(q, 256), pad_to(k, 256), pad_to(v, 256), causal=True, softmax_scale=scale,
        backend="pallas_mosaic")[..., :dv]
  out["cudnn padv"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, pad_to(v, dqk), is_causal=True, implementation="cudnn")[..., :dv]
  return out


def main():
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for spec in sys.argv[1:] or ["192x128", "128x64"]:
    dqk, dv = (int(x) for x in spec.split("x"))
    mk = lambda d: jnp.asarray(rng.standard_normal((1, S, H, d)), jnp.bfloat16)
    sets = [(mk(dqk), mk(dqk), mk(dv)) for _ in range(2)]
    do = mk(dv)
    steps = {}
    for name, f in variants(dqk, dv).items():
      fwd = jax.jit(f)
      both = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](do))
      try:
        jax.block_until_ready((fwd(*sets[0]), both(*sets[0])))
        steps[name] = (fwd, both)
      except Exception as e:  # noqa: BLE001 -- say why a row is missing
        print(f"D{dqk}/{dv} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
              flush=True)
    times = {n: ([], []) for n in steps}
    for _ in range(3):   # interleaved rounds
      for n, (fwd, both) in steps.items():
        times[n][0].append(time_calls(fwd, sets, reps=10, warmup=2)["median_ms"])
        times[n][1].append(time_calls(both, sets, reps=10, warmup=2)["median_ms"])
    med = {n: (float(np.median(a)), float(np.median(b))) for n, (a, b) in times.items()}
    for n, (f, fb) in med.items():
      ratios = "".join(f", {ref}/this fwd {med[ref][0] / f:.2f}x fwd+bwd {med[ref][1] / fb:.2f}x"
                       for ref in ("padded v", "before (256)", "cudnn padv") if ref in med)
      print(f"D{dqk}/{dv} {n}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms{ratios}", flush=True)


if __name__ == "__main__":
  main()
