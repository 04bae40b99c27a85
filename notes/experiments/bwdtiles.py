"""Times the Triton dK/dV and dQ kernels separately, each with its own tiles
(S8192 Hq32 Hk8 D128 bf16 causal): can split tiles beat the shared config?"""
import math, sys, time, statistics, json, os
import jax, jax.numpy as jnp, numpy as np
import jax_grouped_attn as ga
from jax_grouped_attn import plan as plan_lib, autodiff
from jax_grouped_attn.plan import Problem
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.triton import kernels as K, runtime
from jax_grouped_attn.triton.launch import backward_constexprs

S, HQ, HK, D = 8192, 32, 8, 128
B = 1
rng = np.random.default_rng(0)
mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
q, k, v, do = mk(B, S, HQ, D), mk(B, S, HK, D), mk(B, S, HK, D), mk(B, S, HQ, D)
out, lse = ga.attention(q, k, v, causal=True, backend="triton", return_lse=True)
problem = Problem((QueryGroup(0, S, 0, S),), B, S, S, HQ, HK, D, True, 1 / math.sqrt(D), False)
dlse = jnp.zeros_like(lse)
f32 = jax.ShapeDtypeStruct((B, HQ, S), jnp.float32)
p0 = plan_lib.make_plan(problem, 64, 64)
delta, lse2 = runtime.call(jnp.asarray(p0.valid_rows, jnp.int32), out, do, lse, dlse,
    kernel=K.delta_kernel, out_shape=[f32, f32], grid=(S // 64, B * HQ), name="delta",
    num_warps=4, num_stages=1, interpret=False, HQ=HQ, SQ_B=S*HQ*D, SQ_T=HQ*D, SQ_H=D,
    SL_B=HQ*S, SL_H=S, BLOCK_Q=64, DP=D)

def timeit(fn, reps=20):
  for _ in range(3): jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t = time.perf_counter(); jax.block_until_ready(fn()); ts.append((time.perf_counter() - t) * 1e3)
  return statistics.median(ts)

def dkdv(bq, bk, w, st):
  bp = plan_lib.make_backward_plan(problem, bq, bk)
  c = backward_constexprs(q_shape=q.shape, kv_shape=k.shape, problem=problem, plan=bp.plan,
                          dtype=q.dtype, has_segments=False)
  t = jnp.asarray(bp.plan.table)
  f = jax.jit(lambda q, k, v, do, lse2, delta: runtime.call(
      jnp.asarray(bp.kv_table), jnp.asarray(bp.entries), q, k, v, do, lse2, delta, t, t,
      kernel=K.dkdv_kernel, out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      grid=(bp.n_kv_blocks, B * HK), name="dkdv", HK=HK, num_warps=w, num_stages=st,
      interpret=False, **c))
  return lambda: f(q, k, v, do, lse2, delta)

def dq(bq, bk, w, st):
  p = plan_lib.make_plan(problem, bq, bk)
  c = backward_constexprs(q_shape=q.shape, kv_shape=k.shape, problem=problem, plan=p,
                          dtype=q.dtype, has_segments=False)
  t = jnp.asarray(p.table)
  f = jax.jit(lambda q, k, v, do, lse2, delta: runtime.call(
      t, q, k, v, do, lse2, delta, t, t, kernel=K.dq_kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(p.n_work, B * HQ), name="dq",
      HQ=HQ, num_warps=w, num_stages=st, interpret=False, **c))
  return lambda: f(q, k, v, do, lse2, delta)

pairs = S * (S + 1) / 2 * HQ
res = {}
want = {}
for name, fn, cfgs in [
    ("dkdv", dkdv, [(64, 64, 4, 3), (64, 64, 4, 2), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2),
                    (64, 128, 8, 3), (32, 64, 4, 3), (16, 128, 4, 3), (32, 128, 4, 4), (64, 128, 4, 2),
                    (128, 128, 8, 2), (32, 128, 8, 2)]),
    ("dq", dq, [(64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2),
                (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 4), (128, 64, 4, 2), (128, 128, 8, 2),
                (128, 16, 4, 3), (64, 128, 4, 2)])]:
  for cfg in cfgs:
    try:
      call = fn(*cfg)
      r = call()
      leaves = jax.tree.leaves(r)
      if name not in want: want[name] = leaves
      err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(leaves, want[name]))
      ms = timeit(call)
      flops = (8 if name == "dkdv" else 6) * pairs * D   # dkdv: 4 matmuls, dq: 3
      print(f"{name} {cfg}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TF/s(of its matmuls)  maxdiff_vs_first {err:.3g}", flush=True)
      res[f"{name}{cfg}"] = ms
    except Exception as e:
      print(f"{name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "bwdtiles.json"), "w"), indent=1)
