"""explain() / python -m jax_grouped_attn.info, and the CPU-only-jaxlib warning."""

import os
import warnings

import jax
import jax.numpy as jnp
import pytest

import jax_grouped_attn as ga
from jax_grouped_attn import info, platform, tuning
from jax_grouped_attn.config import BackwardConfig, ForwardConfig

Q = jax.ShapeDtypeStruct((1, 8192, 32, 128), jnp.bfloat16)
KV = jax.ShapeDtypeStruct((1, 8192, 8, 128), jnp.bfloat16)


@pytest.fixture
def h800(monkeypatch):
  """An sm_90 part without a table of its own."""
  monkeypatch.setenv(tuning.ENV_GPU, "NVIDIA H800")
  monkeypatch.setenv(tuning.ENV_ARCH, "9.0")
  monkeypatch.delenv(tuning.ENV_OFF, raising=False)
  monkeypatch.delenv(tuning.ENV_DIR, raising=False)
  tuning.clear_cache()
  yield
  tuning.clear_cache()


def test_explain_names_backend_config_and_family_table(h800):
  got = ga.explain(Q, KV, KV, causal=True, backend="triton")
  assert got.gpu.name == "NVIDIA H800" and got.table.match == "compute capability"
  for pass_, cls in (("forward", ForwardConfig), ("backward", BackwardConfig)):
    plan = got[pass_]
    assert plan.backend == "triton" and isinstance(plan.config, cls)
    assert plan.source == "table" and os.path.basename(got.table.path) in plan.detail
    assert "family fallback" in plan.detail and "bucket 8192" in plan.detail
  text = str(got)
  assert "NVIDIA H800" in text and "family fallback" in text and "BackwardConfig(" in text


def test_explain_says_given_and_heuristic(h800, monkeypatch):
  given = ForwardConfig(64, 32, 4, 2)
  got = ga.explain(Q, KV, KV, backend="triton", config=given)
  assert got["forward"].config == given and got["forward"].source == "given"
  assert got["backward"].source == "table"
  monkeypatch.setenv(tuning.ENV_OFF, "1")
  got = ga.explain(Q, KV, KV, backend="pallas_triton")
  assert got.table is None and {p.source for p in got.passes} == {"heuristic"}


def test_explain_matches_what_the_call_runs_and_raises_the_same(monkeypatch):
  if jax.default_backend() != "gpu":
    got = ga.explain(Q, KV, KV, causal=True)   # auto without a GPU: the reference
    assert [p.backend for p in got.passes] == ["xla", "xla"] and not got.interpret
    got = ga.explain(Q, KV, KV, backend="triton")
    assert got.interpret
  groups = ga.zigzag_groups(1, 2, 4096)   # rank 1 of 2: 8192 rows against 16384 keys
  kv = jax.ShapeDtypeStruct((1, 16384, 8, 128), jnp.bfloat16)
  got = ga.explain(Q, kv, kv, groups, backend="pallas_triton")
  assert got["forward"].backend == "pallas_triton"
  with pytest.raises(ValueError, match="head_dim"):
    ga.explain(jax.ShapeDtypeStruct((1, 16, 2, 12), jnp.bfloat16),
               jax.ShapeDtypeStruct((1, 16, 2, 12), jnp.bfloat16),
               jax.ShapeDtypeStruct((1, 16, 2, 12), jnp.bfloat16))
  with pytest.raises(ValueError, match="backend='nope'"):
    ga.explain(Q, KV, KV, backend="nope")
  with pytest.raises(ValueError, match="not both"):
    ga.explain(Q, Q, Q, segment_ids=jnp.zeros((1, 8192), jnp.int32),
               q_segment_ids=jnp.zeros((1, 8192), jnp.int32))


def test_info_command(h800, capsys):
  text = info.main(["--shape", "2x4096x16x16x256", "--backend", "triton", "--window", "128,0"])
  assert "NVIDIA H800" in text and "nvidia_h200.json" in text and "family fallback" in text
  assert "(2, 4096, 16, 256)" in text and "local_window_size=(128, 0)" in text
  assert capsys.readouterr().out.strip() == text.strip()
  with pytest.raises(SystemExit):
    info.main(["--shape", "1x2x3"])


def test_warns_once_when_a_gpu_is_visible_but_jax_is_cpu_only(monkeypatch):
  if jax.default_backend() == "gpu":
    pytest.skip("JAX has a GPU here")
  monkeypatch.delenv("JAX_GROUPED_ATTN_NO_GPU_WARNING", raising=False)
  monkeypatch.setattr(platform, "_WARNED", [])
  monkeypatch.setattr(platform, "system_gpus", lambda: ["/dev/nvidia0"])
  x = jax.random.normal(jax.random.key(0), (1, 16, 2, 16), jnp.float32)
  with pytest.warns(RuntimeWarning, match=r"GPU is visible.*/dev/nvidia0.*jax\[cuda13\]"):
    ga.attention(x, x, x, causal=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ga.attention(x, x, x, causal=True)      # once per process
  monkeypatch.setattr(platform, "_WARNED", [])
  monkeypatch.setattr(platform, "system_gpus", lambda: [])
  assert platform.warn_if_gpu_unused() is False
