"""The per-GPU tuned table: lookup, buckets, and the heuristic fallback."""

import json
import os

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


def test_a_value_head_dim_of_its_own_has_its_own_key_first(fake_table):
  assert tuning.head_dim_keys(192, 128) == ["192x128", "192", "256"]
  assert tuning.head_dim_keys(64, 128) == ["64x128", "128"]
  assert tuning.head_dim_keys(128) == tuning.head_dim_keys(128, 128) == ["128"]
  table = json.loads(fake_table.read_text())
  table["entries"]["triton"]["forward"]["bfloat16"]["128x64"] = {"any": _entry(32, 32, 4, 2)}
  fake_table.write_text(json.dumps(table))
  tuning.clear_cache()
  got = lambda dv: registry.default_config("triton", "forward", 128, seq_len=8192,
                                           dtype="bfloat16", head_dim_v=dv)
  assert got(64) == ForwardConfig(32, 32, 4, 2)
  # Without an entry of its own: the wider dim's (128 here, then its power of two).
  assert got(96) == got(None) == ForwardConfig(64, 32, 4, 5)


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
  import jax
  if jax.default_backend() != "gpu":
    assert tuning.gpu_name() is None and tuning.table_path() is None
  else:
    name = tuning.gpu_name()
    assert name == jax.devices()[0].device_kind
    bundled = os.path.join(tuning.PACKAGE_DIR, tuning.slug(name) + ".json")
    choice = tuning.find_table()
    if os.path.exists(bundled):
      assert choice.match == "exact" and choice.path == bundled
    elif tuning.this_gpu().major == 9:   # another Hopper part: a family table
      assert choice is not None and choice.match in ("compute capability", "major")
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


# ------------------------------------------------ family fallback, derived --

def _fake(tmp_path, name, cc=None, sms=None, entries=None):
  table = {"format": tuning.FORMAT, "gpu": name, "entries": entries or {}}
  if cc is not None:
    table["compute_capability"] = cc
  if sms is not None:
    table["sm_count"] = sms
  path = tmp_path / (tuning.slug(name) + ".json")
  path.write_text(json.dumps(table))
  return path


@pytest.fixture
def forced(monkeypatch):
  monkeypatch.delenv(tuning.ENV_OFF, raising=False)
  monkeypatch.delenv(tuning.ENV_DIR, raising=False)
  tuning.clear_cache()

  def force(name, arch=None, tables=None):
    monkeypatch.setenv(tuning.ENV_GPU, name)
    if arch is None:
      monkeypatch.delenv(tuning.ENV_ARCH, raising=False)
    else:
      monkeypatch.setenv(tuning.ENV_ARCH, arch)
    if tables is not None:
      monkeypatch.setenv(tuning.ENV_DIR, str(tables))
    tuning.clear_cache()
  yield force
  tuning.clear_cache()


def test_other_hopper_parts_get_a_family_table(forced):
  shipped = {os.path.basename(p) for p in tuning.table_files([tuning.PACKAGE_DIR])}
  assert {"nvidia_h100_80gb_hbm3.json", "nvidia_h200.json"} <= shipped
  for name in ("NVIDIA H100 PCIe", "NVIDIA H800", "NVIDIA H20", "NVIDIA GH200 480GB"):
    forced(name, arch="9.0")
    choice = tuning.find_table()
    assert choice is not None and choice.match == "compute capability", name
    assert os.path.basename(choice.path) in shipped
    assert "family fallback" in choice.describe()
    # ... and its configs come from that table, not the heuristic.
    cfg = registry.default_choice("triton", "backward", 128, seq_len=8192, dtype="bfloat16")
    assert cfg.source == "table" and os.path.basename(choice.path) in cfg.detail
  # The exact name still wins; a forced name without a GPU takes its table's arch.
  forced("NVIDIA H200")
  assert tuning.this_gpu().compute_capability == "9.0"
  assert tuning.find_table().match == "exact"
  assert tuning.find_table().path.endswith("nvidia_h200.json")


def test_family_order_same_cc_then_major_then_none(forced, tmp_path):
  _fake(tmp_path, "Fake Ampere 108", cc="8.0", sms=108)
  _fake(tmp_path, "Fake Ampere 84", cc="8.6", sms=84)
  _fake(tmp_path, "Fake Ampere 46", cc="8.6", sms=46)
  forced("Fake Ampere Newcomer", arch="8.6", tables=tmp_path)
  assert tuning.find_table().match == "compute capability"
  assert tuning.find_table().table_gpu.startswith("Fake Ampere")
  forced("Fake Ampere Newcomer", arch="8.9", tables=tmp_path)
  choice = tuning.find_table()
  assert choice.match == "major" and choice.table_gpu in ("Fake Ampere 84", "Fake Ampere 46")
  forced("Fake Turing", arch="7.5", tables=tmp_path)
  assert tuning.find_table() is None
  forced("Fake GPU without arch", tables=tmp_path)
  assert tuning.this_gpu().compute_capability is None and tuning.find_table() is None
  with pytest.raises(ValueError, match="JAX_GROUPED_ATTN_GPU_ARCH"):
    forced("x", arch="nine")
    tuning.this_gpu()


def test_nearest_multiprocessor_count_wins(forced, tmp_path):
  _fake(tmp_path, "Fake A 132", cc="9.0", sms=132)
  _fake(tmp_path, "Fake B 78", cc="9.0", sms=78)
  gpu = tuning.Gpu("Fake C", "9.0", 80)
  forced("Fake C", arch="9.0", tables=tmp_path)
  assert tuning.find_table(gpu).table_gpu == "Fake B 78"
  assert tuning.find_table(tuning.Gpu("Fake D", "9.0", 130)).table_gpu == "Fake A 132"


def _shipped_entries():
  for path in tuning.table_files([tuning.PACKAGE_DIR]):
    table = json.load(open(path))
    major = int(table["compute_capability"].split(".")[0])
    for backend, by_pass in table["entries"].items():
      for pass_, by_dtype in by_pass.items():
        for dtype, by_dim in by_dtype.items():
          for hd, by_bucket in by_dim.items():
            for bucket, entry in by_bucket.items():
              if bucket.isdigit():
                yield table["gpu"], major, backend, pass_, dtype, hd, bucket, entry


def test_derived_defaults_are_within_10_percent_of_every_shipped_best(monkeypatch):
  monkeypatch.delenv(tuning.ENV_OFF, raising=False)
  tuning.clear_cache()
  seen = 0
  for gpu, major, backend, pass_, dtype, hd, bucket, entry in _shipped_entries():
    entry_ = registry.get(backend)
    cls = entry_.config_class(pass_)
    dims = [int(x) for x in hd.split("x")]   # "<Dqk>x<Dv>": a v head_dim of its own
    got = tuning.derived(pass_, backend, cls, dims[0], dtype, major,
                         head_dim_v=dims[1] if len(dims) > 1 else None,
                         padded=getattr(entry_, "padded_head_dim", None))
    where = (gpu, backend, pass_, dtype, hd, bucket)
    assert got is not None and isinstance(got.config, cls), where
    timed = {tuning.candidate(cls, c["config"]): c["ms"] for c in entry["candidates"]
             if "ms" in c}
    # Launchable there: the tuner compiled, checked and timed it on that GPU.
    assert got.config in timed, (where, got.config)
    assert timed[got.config] <= 1.10 * min(timed.values()), (where, got.config)
    seen += 1
  # 3 backends x 2 passes x 3 head_dims x 2 GPUs.
  assert seen >= 36


def test_an_sm90_gpu_without_an_entry_gets_the_derived_default(forced, tmp_path):
  _fake(tmp_path, "Fake Hopper", cc="9.0", sms=132)   # a table with no entries
  forced("Fake Hopper", arch="9.0", tables=tmp_path)
  for backend in ("pallas_mosaic", "triton", "pallas_triton"):
    for pass_ in ("forward", "backward"):
      for d in (64, 96, 128, 256):
        got = registry.default_choice(backend, pass_, d, seq_len=8192, dtype="bfloat16")
        cls = registry.get(backend).config_class(pass_)
        want = tuning.derived(pass_, backend, cls, d, "bfloat16", 9)
        assert got.source == "derived" and got.config == want.config, (backend, pass_, d)
  # fp32 (never tuned) and non-Hopper GPUs keep the backend's own heuristic.
  got = registry.default_choice("triton", "forward", 128, dtype="float32")
  assert got.source == "heuristic"
  assert got.config == registry.get("triton").heuristic_config("forward", 128, "float32")
  forced("Fake Ampere", arch="8.0", tables=tmp_path)
  assert registry.default_choice("triton", "forward", 128).source == "heuristic"


def test_no_tuned_turns_off_tables_and_derived(forced, monkeypatch):
  forced("NVIDIA H200")
  assert registry.default_choice("triton", "forward", 128).source == "table"
  monkeypatch.setenv(tuning.ENV_OFF, "1")
  got = registry.default_choice("triton", "forward", 128)
  assert got.source == "heuristic"
