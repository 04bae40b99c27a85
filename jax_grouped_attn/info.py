"""``python -m jax_grouped_attn.info [--shape BxSxHqxHkxD] ...``: what this machine runs.

Prints the GPU, the tuned table it uses (and every table found), then
:func:`jax_grouped_attn.explain.explain` for one causal self-attention shape.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from jax_grouped_attn import tuning
from jax_grouped_attn.explain import explain


def _shape(text: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(x) for x in text.lower().split("x"))
  except ValueError:
    dims = ()
  if len(dims) != 5 or min(dims) < 1:
    raise argparse.ArgumentTypeError(
        f"--shape={text!r} must be BxSxHqxHkxD with positive ints, e.g. 1x8192x32x8x128.")
  return dims


def _window(text: str):
  parts = text.split(",")
  try:
    vals = tuple(None if p.strip().lower() == "none" else int(p) for p in parts)
  except ValueError:
    vals = ()
  if len(vals) not in (1, 2):
    raise argparse.ArgumentTypeError(f"--window={text!r} must be W or LEFT,RIGHT.")
  return vals[0] if len(vals) == 1 else vals


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", type=_shape, default=(1, 8192, 32, 8, 128), help="BxSxHqxHkxD")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  ap.add_argument("--non-causal", action="store_true")
  ap.add_argument("--window", type=_window, default=None, help="W or LEFT,RIGHT")
  ap.add_argument("--backend", default="auto")
  args = ap.parse_args(argv)
  b, s, hq, hk, d = args.shape
  dtype = jnp.dtype(args.dtype)
  q = jax.ShapeDtypeStruct((b, s, hq, d), dtype)
  kv = jax.ShapeDtypeStruct((b, s, hk, d), dtype)
  found = tuning.table_files(tuning.table_dirs())
  lines = [f"jax {jax.__version__}; tables searched: {', '.join(tuning.table_dirs())}"]
  lines += [f"  {os.path.basename(p)}" for p in found]
  lines.append(f"call: causal={not args.non_causal} local_window_size={args.window} "
               f"backend={args.backend!r} shape q={q.shape} k=v={kv.shape} {dtype}")
  lines.append(str(explain(q, kv, kv, causal=not args.non_causal, backend=args.backend,
                           local_window_size=args.window)))
  text = "\n".join(lines)
  print(text)
  return text


if __name__ == "__main__":
  main()
