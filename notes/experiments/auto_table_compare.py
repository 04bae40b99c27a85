import os
from jax_grouped_attn import registry, tuning
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.plan import Problem
def auto(b, s, hq, hk, d):
  p = Problem((QueryGroup(0, s, 0, s),), b, s, s, hq, hk, d, True, d ** -0.5, False)
  out = []
  for pass_ in ("forward", "backward"):
    cands = [n for n in registry.AUTO_GPU if registry.get(n).auto_candidate(pass_, d, "bfloat16")]
    name = registry._fastest(pass_, cands, p, "bfloat16") or cands[0]
    c = registry.config_for(registry.get(name), pass_, p, "bfloat16", registry.AttentionConfig())
    out.append((name, c))
  return out
res = {}
for gpu in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
  os.environ[tuning.ENV_GPU] = gpu; tuning.clear_cache()
  res[gpu] = {w: auto(*w) for w in [(1,8192,32,8,128),(4,4096,16,16,64),(1,8192,16,16,256),(1,65536,32,8,128)]}
for w in res["NVIDIA H200"]:
  a, b = res["NVIDIA H200"][w], res["NVIDIA H100 80GB HBM3"][w]
  print(w, "SAME" if a == b else "DIFF", a if a == b else (a, b))
