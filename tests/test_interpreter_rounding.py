"""Interpreted Triton rounds fp32 -> bf16 like the GPU (issue 21).

Triton's interpreter truncates fp32 -> bf16 (``_convert_float`` with no
rounding mode); the GPU's cvt.rn.bf16.f32 rounds to nearest even. runtime.py
makes the interpreted path round like the GPU while a kernel runs. These
tests put Triton's own truncating cast back on the builder class first
(``stock_cast``), whatever was installed there, so the rounding they see
can only come from runtime.py.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import triton
import triton.language as tl
from triton.runtime import interpreter

from jax_grouped_attn.triton import runtime

# (fp32 bits, nearest-even bf16 bits, toward-zero bf16 bits): ties either
# way, just above and below a half, negatives, the top of the range (FLT_MAX
# rounds to inf), subnormals, zeros, infinities.
BF16_TABLE = [
    (0x3F808000, 0x3F80, 0x3F80),  # 1 + 2^-8: a tie, even below: stays 1
    (0x3F818000, 0x3F82, 0x3F81),  # 1 + 2^-7 + 2^-8: a tie, odd below: up
    (0x3F808001, 0x3F81, 0x3F80),  # just above a half: up
    (0x3F807FFF, 0x3F80, 0x3F80),  # just below a half: down
    (0xBF818000, 0xBF82, 0xBF81),  # negative tie, odd below
    (0xBF808001, 0xBF81, 0xBF80),  # negative, just above a half
    (0x4B3F8000, 0x4B40, 0x4B3F),  # 12550144: a tie, odd below
    (0x7F7FFFFF, 0x7F80, 0x7F7F),  # FLT_MAX: inf to nearest, the largest bf16 toward zero
    (0x7F7F8000, 0x7F80, 0x7F7F),  # a tie above the largest bf16: inf
    (0x7F7E8000, 0x7F7E, 0x7F7E),  # a tie, even below
    (0x007FFFFF, 0x0080, 0x007F),  # the largest subnormal: up to the smallest normal
    (0x00018000, 0x0002, 0x0001),  # subnormal tie, odd below
    (0x00008000, 0x0000, 0x0000),  # subnormal tie, even below: zero
    (0x00008001, 0x0001, 0x0000),  # just above half the smallest subnormal
    (0x80018000, 0x8002, 0x8001),  # negative subnormal tie
    (0x00000000, 0x0000, 0x0000),
    (0x80000000, 0x8000, 0x8000),
    (0x7F800000, 0x7F80, 0x7F80),  # inf
    (0xFF800000, 0xFF80, 0xFF80),  # -inf
]
# NaNs stay NaN; 0x7F800001 truncates to inf's bits in Triton's _convert_float.
NAN_BITS = [0x7FC00000, 0x7F800001, 0xFF800001, 0xFFFFFFFF]
N = 4096


@triton.jit
def _convert_kernel(x_ptr, out_ptr, N: tl.constexpr, MODE: tl.constexpr):
  offs = tl.arange(0, N)
  x = tl.load(x_ptr + offs)
  if MODE == "cast":
    y = x.to(out_ptr.dtype.element_ty)
  elif MODE == "rtz":
    y = x.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtz")
  else:  # "store": tl.store converts to the pointer's element type itself
    y = x
  tl.store(out_ptr + offs, y)


@triton.jit
def _constant_kernel(out_ptr, N: tl.constexpr, VALUE: tl.constexpr):
  tl.store(out_ptr + tl.arange(0, N), tl.full((N,), VALUE, tl.bfloat16))


def _fp32_inputs(seed=0):
  """The table's and NaN bits, then random finite values over many binades."""
  rng = np.random.default_rng(seed)
  fixed = np.array([b for b, _, _ in BF16_TABLE] + NAN_BITS, np.uint32)
  mags = rng.standard_normal(N // 2) * 10.0 ** rng.integers(-30, 30, N // 2)
  bits = rng.integers(0, 2 ** 32, N, dtype=np.uint64).astype(np.uint32)
  bits = bits[(bits & 0x7F800000) != 0x7F800000]  # finite patterns, subnormals included
  rest = np.concatenate([mags.astype(np.float32).view(np.uint32), bits])
  return np.concatenate([fixed, rest])[:N].view(np.float32)


def _nearest(x):
  """ml_dtypes' fp32 -> bf16 (round to nearest even), as a bf16 array."""
  with np.errstate(invalid="ignore"):  # its NaN casts warn
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


def _truncated(x):
  return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _run(x, out_dtype, mode):
  out = runtime.call(jnp.asarray(x), kernel=_convert_kernel,
                     out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype), grid=(1,),
                     name="convert", num_warps=1, num_stages=1, interpret=True,
                     N=x.size, MODE=mode)
  return np.asarray(out)


def _assert_bits(got, want, x):
  """Equal bits where ``x`` is a number; NaN where it is NaN."""
  nan = np.isnan(np.asarray(x, np.float32))
  assert np.isnan(got.astype(np.float32)[nan]).all(), got.view(np.uint16)[nan]
  bad = np.flatnonzero(got.view(np.uint16)[~nan] != want.view(np.uint16)[~nan])
  assert bad.size == 0, [(hex(np.asarray(x[~nan], np.float32).view(np.uint32)[i]),
                          hex(got.view(np.uint16)[~nan][i]), hex(want.view(np.uint16)[~nan][i]))
                         for i in bad[:8]]


@pytest.fixture
def stock_cast(monkeypatch):
  """Triton's own fp32 -> bf16 on the InterpreterBuilder class (it truncates)."""
  convert = getattr(interpreter, "_convert_float", None)
  if convert is None:
    pytest.skip(f"Triton {triton.__version__}'s interpreter has no _convert_float")
  current = interpreter.InterpreterBuilder.cast_impl

  def cast_impl(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
      data = convert(src.data, tl.float32, tl.bfloat16, None).view(np.uint16)
      return interpreter.TensorHandle(data, dst_type.scalar)
    return current(self, src, dst_type)

  monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


def test_the_table_tells_nearest_even_from_truncation():
  x = np.array([b for b, _, _ in BF16_TABLE], np.uint32).view(np.float32)
  nearest = np.array([r for _, r, _ in BF16_TABLE], np.uint16)
  toward_zero = np.array([z for _, _, z in BF16_TABLE], np.uint16)
  np.testing.assert_array_equal(_nearest(x).view(np.uint16), nearest)
  np.testing.assert_array_equal(_truncated(x), toward_zero)
  assert np.sum(nearest != toward_zero) >= 10  # a truncating cast fails the tests below


def test_stock_interpreter_truncates(stock_cast):
  # The root cause, so that the tests below are known to be able to fail.
  x = _fp32_inputs()
  got = interpreter.InterpreterBuilder().cast_impl(
      interpreter.TensorHandle(x, tl.float32), tl.bfloat16).data
  normal = np.isfinite(x) & (np.abs(x) >= np.finfo(np.float32).tiny)
  np.testing.assert_array_equal(got[normal], _truncated(x)[normal])
  rne = _nearest(x).view(np.uint16)
  assert np.mean(got[normal] != rne[normal]) > 0.3
  # (Subnormals come out worse than truncated: 0x00018000 -> 0x0040.)


@pytest.mark.parametrize("mode", ["cast", "store"])
def test_fp32_to_bf16_rounds_to_nearest_even(stock_cast, mode):
  x = _fp32_inputs()
  got = _run(x, jnp.bfloat16, mode)
  _assert_bits(got, _nearest(x), x)
  nearest = np.array([r for _, r, _ in BF16_TABLE], np.uint16)
  np.testing.assert_array_equal(got.view(np.uint16)[:len(BF16_TABLE)], nearest)


def test_explicit_rtz_truncates_and_keeps_nan(stock_cast):
  x = _fp32_inputs()
  got = _run(x, jnp.bfloat16, "rtz")
  _assert_bits(got, _truncated(x).view(ml_dtypes.bfloat16), x)


def test_bf16_constant_rounds_to_nearest_even(stock_cast):
  value = float(np.uint32(0x3F818000).view(np.float32))  # a tie, odd below
  out = runtime.call(kernel=_constant_kernel,
                     out_shape=jax.ShapeDtypeStruct((16,), jnp.bfloat16), grid=(1,),
                     name="constant", num_warps=1, num_stages=1, interpret=True, N=16,
                     VALUE=value)
  assert (np.asarray(out).view(np.uint16) == 0x3F82).all()


def test_fp16_to_bf16_rounds_to_nearest_even(stock_cast):
  # Triton converts fp16 -> bf16 through fp32: the fp32 -> bf16 step must round.
  x = _fp32_inputs()
  with np.errstate(over="ignore"):
    x16 = x.astype(np.float16)
  x16[:4] = [1 + 2 ** -7 + 2 ** -8, 1 + 2 ** -8 + 2 ** -10, -(1 + 2 ** -7 + 2 ** -8), 2 ** -20]
  want = _nearest(x16)
  assert np.sum(want.view(np.uint16) != _truncated(x16.astype(np.float32))) > 100
  got = _run(x16, jnp.bfloat16, "cast")
  _assert_bits(got, want, x16)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("mode", ["cast", "store"])
def test_fp32_to_fp16_rounds_to_nearest_even(mode):
  # Triton's interpreter casts fp32 -> fp16 with numpy (nearest even): pinned here.
  x = _fp32_inputs()
  x[:6] = [1 + 2 ** -11, 1 + 2 ** -10 + 2 ** -11, 65519.0, 65520.0, 3 * 2.0 ** -25, 2.0 ** -25]
  with np.errstate(over="ignore"):
    want = x.astype(np.float16)
  np.testing.assert_array_equal(want[:6], [1, 1 + 2 ** -9, 65504, np.inf, 2 ** -23, 0])
  toward_zero = [1, 1 + 2 ** -10, 65504, 65504, 2 ** -24, 0]
  assert np.sum(want[:6] != np.array(toward_zero, np.float16)) == 3
  _assert_bits(_run(x, jnp.float16, mode), want, x)


def test_patch_lasts_only_while_a_kernel_runs():
  builder = interpreter.interpreter_builder
  before = {name: vars(builder).get(name) for name in ("cast_impl", "create_fp_trunc",
                                                       "create_fp_to_fp")}
  _run(_fp32_inputs(), jnp.bfloat16, "cast")
  after = {name: vars(builder).get(name) for name in before}
  assert after == before


def test_missing_interpreter_internals_are_a_clear_error(monkeypatch):
  monkeypatch.delattr(interpreter.InterpreterBuilder, "create_fp_to_fp")
  x = _fp32_inputs()
  with pytest.raises(RuntimeError, match="lacks InterpreterBuilder.create_fp_to_fp"):
    runtime.run_interpreted(_convert_kernel, (1,), [x], [(x.shape, ml_dtypes.bfloat16)],
                            N=x.size, MODE="cast")


def test_a_cast_the_patch_does_not_reach_is_a_clear_error(monkeypatch):
  # A Triton whose semantic layer converts without the patched builder calls.
  semantic = getattr(interpreter, "interpreter_semantic", None)
  if semantic is None:
    pytest.skip(f"Triton {triton.__version__} has no interpreter_semantic")
  cast = type(semantic).cast

  def truncating_cast(self, input, dst_ty, fp_downcast_rounding=None):
    if input.dtype.scalar == tl.float32 and dst_ty.scalar == tl.bfloat16:
      data = _truncated(input.handle.data)
      return tl.tensor(interpreter.TensorHandle(data, tl.bfloat16), dst_ty)
    return cast(self, input, dst_ty, fp_downcast_rounding)

  monkeypatch.setattr(type(semantic), "cast", truncating_cast)
  x = _fp32_inputs()
  with pytest.raises(RuntimeError, match="its own way"):
    runtime.run_interpreted(_convert_kernel, (1,), [x], [(x.shape, ml_dtypes.bfloat16)],
                            N=x.size, MODE="cast")
