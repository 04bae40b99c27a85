"""The per-GPU tuned table: lookup, buckets, and the heuristic fallback."""

import json

import pytest

from jax_grouped_attn import registry, tuning
from jax_grouped_attn.config import BackwardConfig, ForwardConfig

FAKE = "Fake GPU 9000 (80GB)"


def _entry(bq, bk, w, s, ms=1.0):
  return {"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": s, "ms": ms}


@pytest.fixture
def fake_table(tmp_path, monkeypatch):
  table = {
      "format": tuning.FORMAT, "gpu": FAKE,
      "entries": {
          "triton": {
              "forward": {"bfloat16": {"128": {"8192": _entry(64, 32, 4, 5),
                                               "32768": _entry(128, 64, 8, 4),
                                               "any": _entry(64, 64, 4, 3)}}},
              "backward": {"bfloat16": {"64": {"any": _entry(32, 128, 8, 1)},
                                        "128": {"any": dict(_entry(64, 64, 4, 2),
                                                            dq_block_q=128, dq_block_k=32,
                                                            dq_num_warps=8, dq_num_stages=3)}}},
          },
          "pallas_triton": {"forward": {"bfloat16": {"128": {"8192": _entry(16, 16, 1, 1)}}}},
      },
  }
  path = tmp_path / (tuning.slug(FAKE) + ".json")
  path.write_text(json.dumps(table))
  monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
  monkeypatch.setenv(tuning.ENV_GPU, FAKE)
  monkeypatch.delenv(tuning.ENV_OFF, raising=False)
  tuning.clear_cache()
  yield path
  tuning.clear_cache()


def fwd(head_dim, backend, seq_len=None, dtype=None):
  return registry.default_config(backend, "forward", head_dim, seq_len=seq_len, dtype=dtype)


def bwd(head_dim, backend, seq_len=None, dtype=None):
  return registry.default_config(backend, "backward", head_dim, seq_len=seq_len, dtype=dtype)


def _heuristic(monkeypatch, fn, *args):
  monkeypatch.setenv(tuning.ENV_OFF, "1")
  try:
    return fn(*args)
  finally:
    monkeypatch.delenv(tuning.ENV_OFF)


def test_slug_and_buckets():
  assert tuning.slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
  assert tuning.seq_bucket(1) == tuning.SEQ_BUCKETS[0]
  assert tuning.seq_bucket(8192) == 8192 and tuning.seq_bucket(8193) == 32768
  assert tuning.seq_bucket(10 ** 7) == tuning.SEQ_BUCKETS[-1]


def test_table_entry_is_picked_for_the_fake_gpu(fake_table):
  assert tuning.table_path() == str(fake_table)
  got = fwd(128, "triton", seq_len=8000, dtype="bfloat16")
  assert got == ForwardConfig(block_q=64, block_k=32, num_warps=4, num_stages=5)
  long = fwd(128, "triton", seq_len=20000)
  assert long == ForwardConfig(block_q=128, block_k=64, num_warps=8, num_stages=4)
  # Unknown length -> the table's best-overall entry; the old 2-argument call works.
  assert fwd(128, "triton") == ForwardConfig(64, 64, 4, 3)
  # Length beyond every bucket -> nearest bucket; 96 -> padded 128; fp16 -> bf16 table.
  assert fwd(96, "triton", seq_len=10 ** 6, dtype="float16") == \
      ForwardConfig(128, 64, 8, 4)
  assert bwd(64, "triton", seq_len=4096) == \
      BackwardConfig(block_q=32, block_k=128, num_warps=8, num_stages=1)
  assert fwd(128, "pallas_triton", seq_len=2048) == ForwardConfig(16, 16, 1, 1)
  # Backward entries may carry the dQ kernel's own tiles; without them dQ shares dK/dV's.
  split = bwd(128, "triton", seq_len=8192)
  assert split == BackwardConfig(64, 64, 4, 2, dq_block_q=128, dq_block_k=32, dq_num_warps=8,
                                 dq_num_stages=3)
  assert tuple(split.dq) == (128, 32, 8, 3) and tuple(split.dkdv) == (64, 64, 4, 2)
  shared = bwd(64, "triton")
  assert tuple(shared.dq) == tuple(shared.dkdv) == (32, 128, 8, 1)


def test_missing_entries_fall_back_to_the_heuristic(fake_table, monkeypatch):
  for fn, args in [(fwd, (64, "triton")),        # no such head_dim
                   (bwd, (256, "triton")),      # no such pass entry
                   (fwd, (128, "xla")),          # no such backend
                   (fwd, (128, "triton", 8192, "float32"))]:
    assert fn(*args) == _heuristic(monkeypatch, fn, *args), (fn.__name__, args)


def test_unknown_gpu_falls_back_to_the_heuristic(fake_table, monkeypatch):
  monkeypatch.setenv(tuning.ENV_GPU, "Some Unknown GPU")
  tuning.clear_cache()
  assert tuning.table_path() is None
  for d in (64, 128, 256):
    assert fwd(d, "triton", seq_len=8192) == \
        _heuristic(monkeypatch, fwd, d, "triton")
    assert bwd(d, "pallas_triton") == \
        _heuristic(monkeypatch, bwd, d, "pallas_triton")


def test_this_machines_gpu_and_table(monkeypatch):
  # Asserts on every machine: no GPU -> no name, no table; a GPU -> its device
  # kind, and the bundled table exactly when one ships for that kind.
  monkeypatch.delenv(tuning.ENV_GPU, raising=False)
  monkeypatch.delenv(tuning.ENV_OFF, raising=False)
  monkeypatch.delenv(tuning.ENV_DIR, raising=False)
  tuning.clear_cache()
  import os
  import jax
  if jax.default_backend() != "gpu":
    assert tuning.gpu_name() is None and tuning.table_path() is None
  else:
    name = tuning.gpu_name()
    assert name == jax.devices()[0].device_kind
    bundled = os.path.join(tuning.PACKAGE_DIR, tuning.slug(name) + ".json")
    assert tuning.table_path() == (bundled if os.path.exists(bundled) else None)
  # A forced name works on any machine (the fake-GPU tests rely on it).
  monkeypatch.setenv(tuning.ENV_GPU, "NVIDIA H100 80GB HBM3")
  assert tuning.gpu_name() == "NVIDIA H100 80GB HBM3"
  assert tuning.table_path() == os.path.join(tuning.PACKAGE_DIR, "nvidia_h100_80gb_hbm3.json")
  monkeypatch.setenv(tuning.ENV_OFF, "1")
  assert tuning.table_path() is None
  tuning.clear_cache()


def test_broken_tables_never_break_attention(fake_table, monkeypatch):
  fake_table.write_text("{not json")
  tuning.clear_cache()
  with pytest.warns(UserWarning, match="ignoring tuned table"):
    got = fwd(128, "triton", seq_len=8192)
  assert got == _heuristic(monkeypatch, fwd, 128, "triton")
  # A well-formed file with an invalid config (block_q 24 is no power of two).
  fake_table.write_text(json.dumps({"format": tuning.FORMAT, "gpu": FAKE, "entries": {
      "triton": {"forward": {"bfloat16": {"128": {"any": _entry(24, 64, 4, 2)}}}}}}))
  tuning.clear_cache()
  with pytest.warns(UserWarning, match="unusable tuned forward entry"):
    got = fwd(128, "triton")
  assert got == _heuristic(monkeypatch, fwd, 128, "triton")
