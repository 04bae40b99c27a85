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
  assert registry.resolve("auto", None) == (registry.get("xla"), False)
  assert registry.resolve("pallas", None) == (registry.get("pallas_triton"), True)
  assert registry.resolve("triton", None) == (registry.get("triton"), True)
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
  q, kv = _inputs()
  with pytest.raises(ValueError, match=r"config.forward=.*backend='xla'"):
    ga.attention(q, kv, kv, backend="xla", config=ForwardConfig(32, 16))


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
    "jax_grouped_attn.flax": 6, "jax_grouped_attn.api": 5, "jax_grouped_attn.parallel": 4,
    "jax_grouped_attn.autodiff": 3, "jax_grouped_attn.registry": 2,
    "jax_grouped_attn.tuning": 2,
}


def _modules():
  mods = {}
  for top, pkg in (("jax_grouped_attn", "jax_grouped_attn"), ("pallas", "jax_grouped_attn.pallas")):
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
  assert "jax_grouped_attn.api" not in set().union(
      *(graph[m] for m in graph if m not in ("jax_grouped_attn", "jax_grouped_attn.flax")))


def test_devtools_are_not_on_the_import_path():
  import sys
  import subprocess
  code = ("import sys, jax_grouped_attn, jax_grouped_attn.registry; "
          "print(any(m.startswith('devtools') or m.endswith('compile_check') for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
