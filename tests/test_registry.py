"""The backend seam: registry entries, config routing, and one-way imports."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_grouped_attn as ga
from jax_grouped_attn import registry
from jax_grouped_attn.backend import Backend, KernelBackend
from jax_grouped_attn.config import AttentionConfig, BackwardConfig, ForwardConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(seed=0, t=32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((1, t, 4, 32)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((1, t, 2, 32)), jnp.float32)
  return q, kv


def test_every_entry_is_a_backend_with_a_unique_name():
  names = [b.name for b in registry.ENTRIES]
  assert len(names) == len(set(names)) and "xla" in names
  for b in registry.ENTRIES:
    assert isinstance(b, Backend) and b.name
    hash(b)   # entries travel as static (hashable) data
    for pass_ in ("forward", "backward"):
      cls = b.config_class(pass_)
      assert cls is None or getattr(cls, "PASS") == pass_
  for alias, targets in registry.ALIASES.items():
    assert alias not in names and all(t in names for t in targets)
  assert set(registry.names()) == {"auto", *names, *registry.ALIASES}


def test_kernel_entries_declare_launchers_and_tuning_spaces():
  for b in registry.kernel_entries():
    assert isinstance(b, KernelBackend) and b.launcher_module
    for pass_ in ("forward", "backward"):
      cls = b.config_class(pass_)
      default = b.heuristic_config(pass_, 128, "bfloat16")
      assert isinstance(default, cls)
      space = b.tuning_candidates(pass_, 128, "quick")
      assert space and all(isinstance(c, cls) for c in space)


def test_resolve_names_aliases_and_auto_without_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("checks the CPU resolution")
  get = registry.get
  assert registry.resolve("auto", None) == ((get("xla"), get("xla")), False)
  assert registry.resolve("pallas", None) == ((get("pallas_triton"),) * 2, True)
  assert registry.resolve("triton", None) == ((get("triton"),) * 2, True)
  with pytest.raises(ValueError, match="backend='nope' is unknown"):
    registry.resolve("nope", None)


def test_attention_config_holds_one_config_per_class():
  fwd, bwd = ForwardConfig(32, 16), BackwardConfig(16, 16)
  cfg = AttentionConfig(forward=(fwd,), backward=bwd)
  assert cfg.forward == fwd and cfg.get("backward", BackwardConfig) == bwd
  assert cfg.get("forward", BackwardConfig) is None
  with pytest.raises(ValueError, match="two ForwardConfigs"):
    AttentionConfig(forward=(fwd, ForwardConfig()))
  with pytest.raises(TypeError, match="AttentionConfig.forward must hold forward"):
    AttentionConfig(forward=bwd)
  q, kv = _inputs()
  with pytest.raises(TypeError, match="config must be None"):
    ga.attention(q, kv, kv, config="fast")


def test_a_config_the_backend_cannot_use_is_an_error():
  from jax_grouped_attn.pallas.mosaic.config import MosaicForwardConfig
  q, kv = _inputs()
  with pytest.raises(ValueError, match=r"config.forward=.*backend='triton'.*ForwardConfig"):
    ga.attention(q, kv, kv, backend="triton", config=MosaicForwardConfig())
  # The reference has no tiles; code switching to it keeps its config.
  out = ga.attention(q, kv, kv, backend="xla", config=ForwardConfig(32, 16))
  assert out.shape == q.shape


def test_given_config_reaches_the_kernel_and_matches_the_default():
  # Tiles change the launch, never the result beyond rounding.
  q, kv = _inputs(1, t=48)
  base = ga.attention(q, kv, kv, causal=True, backend="triton")
  tiny = ga.attention(q, kv, kv, causal=True, backend="triton",
                      config=AttentionConfig(forward=ForwardConfig(16, 16),
                                             backward=BackwardConfig(16, 16)))
  ref = ga.attention(q, kv, kv, causal=True, backend="xla")
  np.testing.assert_allclose(np.asarray(tiny), np.asarray(ref), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(base), np.asarray(ref), atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------ import graph --

_LAYERS = {   # module -> rank; a module may import only modules of lower or equal rank
    "jax_grouped_attn.flax": 6, "jax_grouped_attn.api": 5, "jax_grouped_attn.dropin": 5,
    "jax_grouped_attn.explain": 5, "jax_grouped_attn.info": 6,
    # Context parallelism: the front of cp/ over its strategies over the kernel
    # choice (spec, layout, permute, ring_schedule, axes: rank 1, no kernels).
    "jax_grouped_attn.cp": 4.3, "jax_grouped_attn.cp.global_arrays": 4.3,
    # call.Kernels (rank 1, with config.py): the resolved choice every layer takes.
    "jax_grouped_attn.cp.local": 4.2, "jax_grouped_attn.cp.two_d": 4.1,
    "jax_grouped_attn.cp.allgather": 4, "jax_grouped_attn.cp.ulysses": 4,
    "jax_grouped_attn.cp.ring": 4, "jax_grouped_attn.cp.run": 3.5,
    "jax_grouped_attn.autodiff": 3, "jax_grouped_attn.registry": 2,
    "jax_grouped_attn.tuning": 2,
}


def _modules():
  mods = {}
  for top, pkg in (("jax_grouped_attn", "jax_grouped_attn"),):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, top))[:-3]
          name = pkg + ("" if rel == "__init__" else "." + rel.replace(os.sep, ".")
                        .removesuffix(".__init__"))
          mods[name] = os.path.join(dirpath, f)
  return mods


def _imports(name, path, mods):
  """Project modules ``name`` imports anywhere in its file (functions included)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      cands = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      cands = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for c in cands:
      while c and c not in mods:
        c = c.rpartition(".")[0]
      if c and c != name and not name.startswith(c + "."):
        out.add(c)
  return out


def test_no_import_cycles_and_layers_import_downward():
  mods = _modules()
  graph = {m: _imports(m, p, mods) for m, p in mods.items()}
  # No cycles (a package __init__ re-exporting its children is not a cycle back).
  state = {}

  def visit(m, stack):
    state[m] = 1
    for n in graph[m]:
      if n == "jax_grouped_attn" or n == "jax_grouped_attn.pallas":
        continue
      if state.get(n) == 1:
        raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
      if n not in state:
        visit(n, stack + [m])
    state[m] = 2

  for m in graph:
    if m not in state and m not in ("jax_grouped_attn", "jax_grouped_attn.pallas"):
      visit(m, [])
  rank = lambda m: _LAYERS.get(m, 1)
  for m, deps in graph.items():
    if m in ("jax_grouped_attn", "jax_grouped_attn.pallas"):
      continue
    for d in deps:
      assert d != "jax_grouped_attn", f"{m} imports the package root (the public API)"
      assert rank(d) <= rank(m), f"{m} (layer {rank(m)}) imports {d} (layer {rank(d)})"
  # Nothing below the API calls it; the Flax adapters and the jax.nn drop-in
  # (public entry points that translate their callers' arguments) may.
  callers = ("jax_grouped_attn", "jax_grouped_attn.flax", "jax_grouped_attn.dropin")
  assert "jax_grouped_attn.api" not in set().union(
      *(graph[m] for m in graph if m not in callers))


def test_devtools_are_not_on_the_import_path():
  import subprocess
  import sys
  code = ("import sys, jax_grouped_attn, jax_grouped_attn.registry; "
          "print(any(m.startswith('devtools') or m.endswith('compile_check') "
          "for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_forward_and_backward_may_come_from_different_entries():
  from jax_grouped_attn import autodiff
  from jax_grouped_attn.call import Kernels
  from jax_grouped_attn.groups import QueryGroup
  from jax_grouped_attn.plan import Problem
  q, kv = _inputs(2, t=40)
  rng = np.random.default_rng(3)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  problem = Problem((QueryGroup(0, 24, 16, 40), QueryGroup(24, 16, 0, 17)), 1, 40, 40, 4, 2,
                    32, True, 32 ** -0.5, False)
  small = AttentionConfig(forward=ForwardConfig(16, 16), backward=BackwardConfig(16, 16))

  def grads(backend):
    interpret = backend != "xla"
    fwd, bwd = (backend, backend) if isinstance(backend, str) else backend
    kernels = Kernels(fwd, bwd, small, interpret)
    f = lambda q, k, v: autodiff.differentiable(problem, kernels, q, k, v, None, None)[0]
    out, vjp = jax.vjp(f, q, kv, kv)
    return (out,) + vjp(dout)

  want = grads("xla")
  got = grads(("pallas_triton", "triton"))
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4, err_msg=name)


def test_auto_picks_each_pass_from_the_tuned_timings(tmp_path, monkeypatch):
  import json

  from jax_grouped_attn import tuning
  from jax_grouped_attn.groups import QueryGroup
  from jax_grouped_attn.plan import Problem
  entry = lambda ms: {"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 2, "ms": ms}
  table = {"format": tuning.FORMAT, "gpu": "Fake GPU", "entries": {
      # triton: forward 1.0, backward 3.0 - 1.0 = 2.0; pallas_triton: 1.5 and 4.0 - 1.5 = 2.5.
      "triton": {"forward": {"bfloat16": {"128": {"8192": entry(1.0)}}},
                 "backward": {"bfloat16": {"128": {"8192": entry(3.0)}}}},
      "pallas_triton": {"forward": {"bfloat16": {"128": {"8192": entry(1.5)}}},
                        "backward": {"bfloat16": {"128": {"8192": entry(3.2)}}}}}}
  (tmp_path / (tuning.slug("Fake GPU") + ".json")).write_text(json.dumps(table))
  monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
  monkeypatch.setenv(tuning.ENV_GPU, "Fake GPU")
  monkeypatch.delenv(tuning.ENV_OFF, raising=False)
  tuning.clear_cache()
  try:
    problem = Problem((QueryGroup(0, 8192, 0, 8192),), 1, 8192, 8192, 32, 8, 128, True,
                      0.1, False)
    names = ("triton", "pallas_triton")
    assert registry._fastest("forward", names, problem, "bfloat16") == "triton"
    assert registry._fastest("backward", names, problem, "bfloat16") == "pallas_triton"
    assert registry._fastest("forward", names, problem, "float32") is None
    # An untimed candidate: no choice from the table (the preference order decides).
    assert registry._fastest("forward", names + ("pallas_mosaic",), problem, "bfloat16") is None
  finally:
    tuning.clear_cache()


def test_shipped_h200_table_takes_mosaics_split_backward_at_d256(monkeypatch):
  """benchmarks/results/h200_2026-12-02b: the head_split=2 Mosaic backward is
  2x Triton's at D256, so the H200 table makes it auto's backward there."""
  from jax_grouped_attn import tuning
  from jax_grouped_attn.groups import QueryGroup
  from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig
  from jax_grouped_attn.plan import Problem
  monkeypatch.setenv(tuning.ENV_GPU, "NVIDIA H200")
  monkeypatch.delenv(tuning.ENV_OFF, raising=False)
  tuning.clear_cache()
  try:
    problem = Problem((QueryGroup(0, 8192, 0, 8192),), 1, 8192, 8192, 16, 16, 256, True,
                      0.0625, False)
    names = ("pallas_mosaic", "triton", "pallas_triton")
    assert registry._fastest("backward", names, problem, "bfloat16") == "pallas_mosaic"
    cfg = tuning.tuned_config("backward", "pallas_mosaic", MosaicBackwardConfig, 256,
                              seq_len=8192, dtype="bfloat16")
    assert cfg.head_split == 2 and cfg.compute_wgs == 2
  finally:
    tuning.clear_cache()


def test_every_kernel_entry_supplies_small_test_configs():
  """tests/cases.SMALL is built from these: a new backend's tiny test
  problems cross its block boundaries without an edit in tests/."""
  for entry in registry.kernel_entries():
    for pass_, cfg in zip(("forward", "backward"), entry.small_configs()):
      assert isinstance(cfg, entry.config_class(pass_)), (entry.name, pass_, cfg)


# ------------------------------------------------------------ deterministic --

def _problem(d, dv=None):
  from jax_grouped_attn.groups import QueryGroup
  from jax_grouped_attn.plan import Problem
  return Problem((QueryGroup(0, 8192, 0, 8192),), 1, 8192, 8192, 32, 8, d, True,
                 d ** -0.5, False, head_dim_v=dv)


def test_deterministic_false_picks_mosaics_fused_backward_only_where_it_fits():
  from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig
  mosaic = registry.get("pallas_mosaic")
  pick = lambda p, det, pass_="backward": registry.config_choice(
      mosaic, pass_, p, "bfloat16", AttentionConfig(), det)
  got = pick(_problem(128), False)
  assert got.config == MosaicBackwardConfig(fused_dq=True)
  assert got.source == "deterministic=False" and "varies" in got.detail
  for p in (_problem(64), _problem(128, 64), _problem(40)):
    assert pick(p, False).config.fused_dq, p
  for p in (_problem(256), _problem(192, 128), _problem(128, 192)):
    assert not pick(p, False).config.fused_dq, p
  assert not pick(_problem(128), True).config.fused_dq       # the default never fuses
  assert pick(_problem(128), False, "forward") == pick(_problem(128), True, "forward")
  for name in ("triton", "pallas_triton"):                   # deterministic kernels only
    e = registry.get(name)
    assert (registry.config_choice(e, "backward", _problem(128), "bfloat16", AttentionConfig(),
                                   False)
            == registry.config_choice(e, "backward", _problem(128), "bfloat16",
                                      AttentionConfig(), True))


def test_a_fused_config_needs_deterministic_false():
  from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig
  entries = (registry.get("pallas_mosaic"),) * 2
  fused = AttentionConfig(backward=MosaicBackwardConfig(fused_dq=True))
  with pytest.raises(ValueError, match=r"config.backward=.*fused_dq=True.* not deterministic"
                                       r".*deterministic=False"):
    registry.check_config(entries, fused)
  registry.check_config(entries, fused, deterministic=False)
  registry.check_config(entries, AttentionConfig(backward=MosaicBackwardConfig()))


@pytest.mark.parametrize("call", ["attention", "grouped_attention", "dot_product_attention",
                                  "make_attention_fn"])
def test_deterministic_must_be_a_bool(call):
  q, kv = _inputs()
  fns = {
      "attention": lambda d: ga.attention(q, kv, kv, deterministic=d),
      "grouped_attention": lambda d: ga.grouped_attention(
          q, kv, kv, [ga.QueryGroup(0, 32, 0, 32)], deterministic=d),
      "dot_product_attention": lambda d: ga.dot_product_attention(q, kv, kv, deterministic=d),
      "make_attention_fn": lambda d: __import__(
          "jax_grouped_attn.flax", fromlist=["x"]).make_attention_fn(deterministic=d),
  }
  with pytest.raises(TypeError, match="deterministic must be a bool, got 'no'"):
    fns[call]("no")
  fns[call](False)


def test_deterministic_false_reaches_the_backward_config(monkeypatch):
  # The opt-in travels in call.Kernels to the backward's config choice (also
  # under context parallelism, whose strategies call autodiff with the same Kernels).
  seen = []
  real = registry.config_for

  def spy(entry, pass_, problem, dtype, config, deterministic=True):
    seen.append((pass_, deterministic))
    return real(entry, pass_, problem, dtype, config, deterministic)

  monkeypatch.setattr(registry, "config_for", spy)
  q, kv = _inputs()
  f = lambda q, k, v: ga.attention(q, k, v, causal=True, backend="triton",
                                   deterministic=False).sum()
  jax.grad(f, argnums=(0, 1, 2))(q, kv, kv)
  assert ("backward", False) in seen


def test_a_table_never_makes_the_default_backward_non_deterministic(monkeypatch):
  from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig
  fused = MosaicBackwardConfig(fused_dq=True)
  monkeypatch.setattr(registry, "default_choice",
                      lambda *a, **k: registry.ConfigChoice(fused, "table", "a table"))
  mosaic = registry.get("pallas_mosaic")
  got = registry.config_choice(mosaic, "backward", _problem(128), "bfloat16", AttentionConfig())
  assert not got.config.fused_dq and got.source == "heuristic" and "fused_dq=True" in got.detail
  assert registry.config_choice(mosaic, "backward", _problem(128), "bfloat16", AttentionConfig(),
                                False).config == fused
