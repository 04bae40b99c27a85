"""Launching @triton.jit kernels from JAX: compiled on GPU, interpreted on CPU.

:func:`call` has jax_triton's calling convention (array and scalar ``args``,
then one pointer per output, then ``constexprs`` by keyword). With
``interpret=False`` it is one ``jax_triton.triton_call``; with
``interpret=True`` the very same kernel runs under Triton's interpreter on
host numpy arrays, reached through ``jax.pure_callback`` (works under jit).
Nothing here knows about attention: backward kernels reuse it as is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import sys
import threading

import jax
import numpy as np
import triton

# One interpreter run at a time: the interpreter patches triton.language
# module-wide while a kernel runs, and XLA may run callbacks concurrently.
_INTERPRETER_LOCK = threading.RLock()


def language_lock() -> threading.RLock:
  """Held while triton.language is patched for an interpreted kernel. Compile
  (``triton.compile``) under it in a process that may also interpret: an
  interpreted run can still be going on in an XLA callback thread after the
  call that started it returned, and a compile then sees patched tl members."""
  return _INTERPRETER_LOCK


# ------------------------------------------------------- host tensor adapter --

class _HostStorage:
  """The storage half of the tensor protocol the interpreter reads."""

  def __init__(self, array: np.ndarray):
    self.array = array

  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def cpu(self):
    # Already host memory: the interpreter then reads and writes in place.
    return self

  def copy_(self, other):
    if other.array is not self.array:
      np.copyto(self.array, other.array)
    return self


class HostTensor:
  """A contiguous numpy array exposing the torch-like protocol that Triton's
  interpreter reads (data_ptr, untyped_storage, new_empty, set_, size, ...).

  ``dtype`` is the numpy dtype; Triton maps its name ("float32", "bfloat16"
  from ml_dtypes, "int32", ...) to the kernel's pointer type.
  """

  def __init__(self, array: np.ndarray | None = None, dtype=None):
    if array is not None:
      if not array.flags.c_contiguous:
        raise ValueError("HostTensor needs a C-contiguous array.")
      dtype = array.dtype
    self.array = array
    self.dtype = np.dtype(dtype) if dtype is not None else None
    self._storage = _HostStorage(array) if array is not None else None
    self._offset = 0

  # -- what Triton reads --
  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def untyped_storage(self) -> _HostStorage:
    return self._storage

  def new_empty(self, *size, device=None, dtype=None, **_):
    return HostTensor(dtype=self.dtype if dtype is None else dtype)

  def set_(self, storage: _HostStorage, offset: int, size, stride):
    """Views ``storage`` with this dtype, element ``offset``, ``size`` and ``stride``."""
    itemsize = self.dtype.itemsize
    flat = storage.array.reshape(-1).view(np.uint8).view(self.dtype)
    self.array = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    self._storage = storage
    self._offset = offset
    return self

  def storage_offset(self) -> int:
    return self._offset

  def size(self, dim=None):
    return self.array.shape if dim is None else self.array.shape[dim]

  def stride(self, dim=None):
    strides = tuple(s // self.dtype.itemsize for s in self.array.strides)
    return strides if dim is None else strides[dim]

  def copy_(self, other):
    if other.array is not self.array:
      np.copyto(self.array, other.array)
    return self

  def cpu(self):
    return self

  def to(self, *_, **__):
    # Triton 3.2 copies results back with ``dev.data.copy_(hst.to(dev.device).data)``.
    return self

  @property
  def data(self):
    return self

  # -- conveniences some Triton versions touch --
  @property
  def shape(self):
    return self.array.shape

  @property
  def ndim(self) -> int:
    return self.array.ndim

  @property
  def device(self) -> str:
    return "cpu"

  is_cuda = False

  def numel(self) -> int:
    return self.array.size

  def element_size(self) -> int:
    return self.dtype.itemsize

  def dim(self) -> int:
    return self.array.ndim


# ------------------------------------------------------ interpreted kernels --

@contextlib.contextmanager
def _interpret_mode():
  """TRITON_INTERPRET=1 while decorating: @triton.jit then builds
  InterpretedFunctions (read from the environment by Triton 3.x)."""
  old = os.environ.get("TRITON_INTERPRET")
  os.environ["TRITON_INTERPRET"] = "1"
  try:
    yield
  finally:
    if old is None:
      os.environ.pop("TRITON_INTERPRET", None)
    else:
      os.environ["TRITON_INTERPRET"] = old


_INTERPRETED_MODULES: dict[str, object] = {}


def interpreted(kernel):
  """The interpreted twin of a module-level @triton.jit ``kernel``.

  The kernel's module source is executed once more, as a separate module, with
  interpretation on, so the kernel and every @triton.jit helper it calls
  become InterpretedFunctions; the original (compiled) module is untouched.
  """
  from triton.runtime.interpreter import InterpretedFunction
  if isinstance(kernel, InterpretedFunction):
    return kernel
  fn = getattr(kernel, "fn", None)
  if fn is None:
    raise TypeError(f"expected a @triton.jit function, got {kernel!r}.")
  modname = fn.__module__
  with _INTERPRETER_LOCK:
    twin = _INTERPRETED_MODULES.get(modname)
    if twin is None:
      source = sys.modules[modname]
      spec = importlib.util.spec_from_file_location(modname + "__interpreted", source.__file__)
      twin = importlib.util.module_from_spec(spec)
      with _interpret_mode():
        spec.loader.exec_module(twin)
      _INTERPRETED_MODULES[modname] = twin
      # @triton.jit helpers imported from another module (e.g. the shared
      # visibility rule) were compiled-only there: use their twins.
      from triton.runtime.jit import JITFunction
      for name, value in list(vars(twin).items()):
        if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
          setattr(twin, name, interpreted(value))
  result = getattr(twin, fn.__name__, None)
  if not isinstance(result, InterpretedFunction):
    raise RuntimeError(
        f"could not build an interpreted copy of {modname}.{fn.__name__} "
        f"(got {type(result).__name__}); this Triton version ({triton.__version__}) "
        "does not honour TRITON_INTERPRET at decoration time.")
  return result


_LANGUAGE_TWINS: dict[int, object] = {}


@contextlib.contextmanager
def _interpreted_language():
  """Swaps triton.language's own @triton.jit functions (tl.zeros, tl.max,
  tl.sum, their combine functions, tensor member functions) for interpreted
  twins while a kernel is interpreted, and restores them afterwards.

  Triton decorates those once, at import; with TRITON_INTERPRET unset they
  are compiled-only JITFunctions that an interpreted kernel cannot call.
  Callers hold _INTERPRETER_LOCK.
  """
  import triton.language as tl
  from triton.runtime.interpreter import InterpretedFunction
  from triton.runtime.jit import JITFunction

  def twin(value):
    key = id(value)
    if key not in _LANGUAGE_TWINS:
      _LANGUAGE_TWINS[key] = (value, InterpretedFunction(value.fn))
    return _LANGUAGE_TWINS[key][1]

  # Specialising a pointer argument imports more of Triton lazily (gluon in
  # 3.9, which asserts its imports are JITFunctions): do that before the swap.
  mangle = getattr(importlib.import_module("triton.runtime.jit"), "mangle_type", None)
  if mangle is not None:
    mangle(HostTensor(np.zeros((1,), np.float32)))
  owners = [m for name, m in list(sys.modules.items())
            if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
  owners.append(tl.core.tensor)
  # Triton's interpreter patches the builtins of every triton.language module a
  # called @triton.jit function sees, and for a device-function call (our twins
  # of tl.max, tl.sum, ... see tl.core) never restores them: a later compile in
  # this process would then build with the interpreter. Every member it may
  # have replaced is put back.
  classes = [tl.core.tensor, tl.dtype, getattr(tl.core, "tensor_descriptor_base", None)]
  guarded = list(dict.fromkeys(owners + [c for c in classes if c is not None]))
  before = [(owner, dict(vars(owner))) for owner in guarded]
  for owner in owners:
    for name, value in list(vars(owner).items()):
      if isinstance(value, JITFunction):
        setattr(owner, name, twin(value))
  try:
    yield
  finally:
    for owner, members in before:
      _restore_members(owner, members)


def _restore_members(owner, members: dict) -> None:
  """Resets ``owner``'s attributes that differ from ``members`` (a copy of its
  vars). Added ones stay: the interpreter copies its own globals into the
  modules of the functions it rewrites, and its cached rewrites need them."""
  for name, value in list(vars(owner).items()):
    if name in members and value is not members[name]:
      setattr(owner, name, members[name])


_BF16_DOT_PATCHED = False


def _patch_interpreter_bf16_dot():
  """Triton's interpreter keeps bf16 as uint16 bits and feeds those bits to
  np.matmul, which multiplies the integers. Widen bf16 dot operands to the
  float32 they encode (exact) before the interpreter's matmul."""
  global _BF16_DOT_PATCHED
  if _BF16_DOT_PATCHED:
    return
  import triton.language as tl
  from triton.runtime import interpreter
  builder = interpreter.interpreter_builder
  original = builder.create_dot

  def widen(handle):
    if handle.dtype.scalar != tl.bfloat16:
      return handle
    bits = handle.data.astype(np.uint32) << np.uint32(16)
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

  def create_dot(a, b, *rest, **kw):
    return original(widen(a), widen(b), *rest, **kw)

  builder.create_dot = create_dot
  _BF16_DOT_PATCHED = True


# --------------------------------------------------- GPU rounding of bf16 --

def _f32_to_bf16_bits(x, round_to_nearest: bool = True) -> np.ndarray:
  """fp32 values -> the uint16 bits of bf16, as the GPU's cvt.rn.bf16.f32
  (nearest, ties to even) or cvt.rz.bf16.f32 (``round_to_nearest=False``,
  toward zero). Infinities stay, a NaN becomes the quiet NaN of its sign."""
  bits = np.asarray(x, np.float32).view(np.uint32)
  nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
  quiet_nan = ((bits >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)
  # Zeroing NaNs first keeps the add below from carrying out of a payload.
  number = np.where(nan, np.uint32(0), bits)
  if round_to_nearest:
    # + 0x7FFF rounds up what is past half; the kept LSB breaks ties to even.
    # Past the largest bf16 the carry reaches the exponent: inf, as on the GPU.
    number = number + np.uint32(0x7FFF) + ((number >> np.uint32(16)) & np.uint32(1))
  return np.where(nan, quiet_nan, number >> np.uint32(16)).astype(np.uint16)


# Every builder entry point an fp32 -> bf16 conversion reaches: x.to(bf16)
# and a store into a bf16 pointer (create_fp_trunc -> cast_impl), bf16
# constants (get_bf16 -> create_fp_trunc), fp16 -> bf16 (create_fp_to_fp ->
# cast_impl via fp32) and an explicit rounding mode (create_fp_to_fp).
_ROUNDED_METHODS = ("cast_impl", "create_fp_trunc", "create_fp_to_fp")

# 1 + 2^-7 + 2^-8: halfway between two bf16, odd below: nearest-even gives
# 1 + 2^-6, truncation 1 + 2^-7.
_TIE_PROBE = np.float32(1 + 2 ** -7 + 2 ** -8)

_UNSET = object()


def _rounding_internals():
  """(interpreter module, builder, RTNE, RTZ) that the rounding patch uses.

  Raises RuntimeError naming what this Triton lacks, rather than let a
  kernel run on truncated bf16 without saying so."""
  try:
    from triton._C.libtriton import ir
    from triton.runtime import interpreter
  except ImportError as e:
    raise RuntimeError(f"Triton {triton.__version__}: cannot import its interpreter ({e}).") from e
  builder = getattr(interpreter, "interpreter_builder", None)
  modes = getattr(ir, "ROUNDING_MODE", None)
  needed = [("interpreter.interpreter_builder", builder is not None),
            ("interpreter.TensorHandle", hasattr(interpreter, "TensorHandle")),
            ("ir.ROUNDING_MODE.RTNE/RTZ", hasattr(modes, "RTNE") and hasattr(modes, "RTZ"))]
  needed += [(f"InterpreterBuilder.{m}", hasattr(builder, m)) for m in _ROUNDED_METHODS]
  missing = [name for name, ok in needed if not ok]
  if missing:
    raise RuntimeError(
        f"Triton {triton.__version__}'s interpreter lacks {', '.join(missing)}: runtime.py "
        "cannot make its fp32 -> bf16 casts round to nearest even like the GPU (the "
        "interpreter truncates), so interpreted results would not be the kernel's. The "
        "interpreted path supports triton 3.2 to 3.9.")
  return interpreter, builder, modes.RTNE, modes.RTZ


def _check_rounding(interpreter, builder, rtne):
  """Raises unless the cast a kernel's ``x.to(tl.bfloat16)`` makes rounds a
  tie to even: a Triton whose cast reaches the builder some other way must
  fail here, not truncate unseen."""
  import triton.language as tl
  probe = interpreter.TensorHandle(np.array([_TIE_PROBE], np.float32), tl.float32)
  got = {"create_fp_to_fp(rtne)": builder.create_fp_to_fp(probe, tl.bfloat16, rtne)}
  semantic = getattr(interpreter, "interpreter_semantic", None)  # Triton >= 3.4
  if semantic is not None:
    got["semantic.cast"] = semantic.cast(tl.tensor(probe, tl.float32), tl.bfloat16).handle
  else:
    got["create_fp_trunc"] = builder.create_fp_trunc(probe, tl.bfloat16)
  want = int(_f32_to_bf16_bits(_TIE_PROBE))
  wrong = {path: hex(int(np.asarray(h.data).view(np.uint16).reshape(-1)[0]))
           for path, h in got.items()}
  wrong = {path: bits for path, bits in wrong.items() if bits != hex(want)}
  if wrong:
    raise RuntimeError(
        f"Triton {triton.__version__}'s interpreter converts fp32 -> bf16 its own way "
        f"despite runtime.py's patch ({wrong}, want {hex(want)}): interpreted results "
        "would not round like the GPU.")


@contextlib.contextmanager
def _interpreter_rounds_bf16_like_the_gpu():
  """While a kernel is interpreted, fp32 -> bf16 rounds to nearest even (an
  explicit ``rtz`` truncates) and NaN stays NaN, as the GPU's cvt does.

  Triton's interpreter converts with ``_convert_float`` and no rounding mode
  (cast_impl): it truncates, which doubles every bf16 rounding error of a
  kernel. Patched on the interpreter's builder instance, restored afterwards;
  checked with a tie first. Callers hold _INTERPRETER_LOCK.
  """
  import triton.language as tl
  interpreter, builder, rtne, rtz = _rounding_internals()
  stock = {name: getattr(builder, name) for name in _ROUNDED_METHODS}

  def rounds(src, dst_type):
    return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

  def rounded(src, dst_type, nearest):
    return interpreter.TensorHandle(_f32_to_bf16_bits(src.data, nearest), dst_type.scalar)

  def cast_impl(src, dst_type):
    if rounds(src, dst_type):
      return rounded(src, dst_type, True)
    return stock["cast_impl"](src, dst_type)

  def create_fp_trunc(src, dst_type):
    if rounds(src, dst_type):
      return rounded(src, dst_type, True)
    return stock["create_fp_trunc"](src, dst_type)

  def create_fp_to_fp(src, dst_type, rounding_mode):
    if rounds(src, dst_type) and rounding_mode in (rtne, rtz):
      return rounded(src, dst_type, rounding_mode == rtne)
    return stock["create_fp_to_fp"](src, dst_type, rounding_mode)

  patches = {"cast_impl": cast_impl, "create_fp_trunc": create_fp_trunc,
             "create_fp_to_fp": create_fp_to_fp}
  # Instance attributes: they shadow the class's methods for this builder only.
  shadowed = {name: vars(builder).get(name, _UNSET) for name in patches}
  try:
    for name, fn in patches.items():
      setattr(builder, name, fn)
    _check_rounding(interpreter, builder, rtne)
    yield
  finally:
    for name, old in shadowed.items():
      if old is _UNSET:
        vars(builder).pop(name, None)
      else:
        setattr(builder, name, old)


_INDEX_PATCHED = False


def _scalar_index(self) -> int:
  """``tl.tensor.__index__`` under the interpreter: a scalar is a 1-element
  numpy array there, and NumPy >= 2.4 refuses ``int()`` of a 1-D array."""
  return int(self.handle.data.item())


def _patch_interpreter_scalar_index():
  """The interpreter of Triton 3.2 to 3.6 makes ``range(n)`` over a loaded
  scalar call ``int(handle.data)`` on a shape-(1,) array, which NumPy >= 2.4
  rejects ("only 0-dimensional arrays can be converted to Python scalars";
  with older NumPy it works). Triton 3.9 squeezes first. Wrap the
  interpreter's ``_patch_lang_tensor`` so the ``__index__`` it installs (per
  kernel, restored with the interpreter's own patch scope from 3.6 on; for
  good in 3.2-3.5, as Triton itself does)
  reads the scalar with ``.item()`` on every version."""
  global _INDEX_PATCHED
  if _INDEX_PATCHED:
    return
  from triton.runtime import interpreter
  original = getattr(interpreter, "_patch_lang_tensor", None)
  if original is None:
    raise RuntimeError(
        f"Triton {triton.__version__}'s interpreter has no _patch_lang_tensor; the "
        "interpreted path (interpret=True, or backend='triton' without a GPU) "
        "supports triton 3.2 to 3.9: install one of those (pip install 'triton>=3.2').")

  @functools.wraps(original)
  def patch_lang_tensor(tensor, *rest, **kw):
    result = original(tensor, *rest, **kw)
    scope = rest[0] if rest else kw.get("scope")
    if scope is not None and hasattr(scope, "set_attr"):
      scope.set_attr(tensor, "__index__", _scalar_index)  # restored LIFO with the rest
    else:
      tensor.__index__ = _scalar_index
    return result

  interpreter._patch_lang_tensor = patch_lang_tensor
  _INDEX_PATCHED = True


def _poison(shape, dtype) -> np.ndarray:
  """Output buffer filled with NaN (floats) or the most negative int, so a
  value the kernel never writes cannot pass for a result."""
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    return np.full(shape, np.iinfo(dtype).min, dtype)
  return np.full(shape, np.nan, dtype)


def run_interpreted(kernel, grid, args, out_shapes, **constexprs) -> list[np.ndarray]:
  """Runs ``kernel[grid](*args, *outputs, **constexprs)`` under the interpreter.

  args: host numpy arrays (passed as pointers) and Python scalars, in kernel
  order; out_shapes: (shape, dtype) pairs of the outputs, whose pointers follow
  ``args``. Returns the outputs as numpy arrays (NaN where never written).
  """
  grid = tuple(grid)
  if not 1 <= len(grid) <= 3:
    raise ValueError(f"grid must have 1 to 3 axes, got {grid}.")
  tensors = [HostTensor(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
             for a in args]
  outs = [_poison(tuple(s), d) for s, d in out_shapes]
  if any(n == 0 for n in grid):
    return outs
  fn = interpreted(kernel)
  with _INTERPRETER_LOCK:
    _patch_interpreter_bf16_dot()
    _patch_interpreter_scalar_index()
    with _interpreter_rounds_bf16_like_the_gpu(), _interpreted_language():
      fn[grid](*tensors, *[HostTensor(o) for o in outs], **constexprs)
  return outs


def _shape_dtype(s):
  return jax.ShapeDtypeStruct(tuple(s.shape), s.dtype)


def interpret_call(*args, kernel, out_shape, grid, **constexprs):
  """Like ``jax_triton.triton_call`` but runs ``kernel`` under Triton's
  interpreter on the host through ``jax.pure_callback``.

  Arrays in ``args`` become pointers; Python bool/int/float stay scalars
  (static). Under ``jax.vmap`` the kernel runs once per batch element.
  """
  single = not isinstance(out_shape, (list, tuple))
  shapes = [_shape_dtype(s) for s in ([out_shape] if single else out_shape)]
  is_array = [not isinstance(a, (bool, int, float)) for a in args]
  arrays = [a for a, arr in zip(args, is_array) if arr]

  def host(*host_arrays):
    it = iter(host_arrays)
    full = [np.asarray(next(it)) if arr else a for a, arr in zip(args, is_array)]
    return tuple(run_interpreted(kernel, grid, full, [(s.shape, s.dtype) for s in shapes],
                                 **constexprs))

  outs = jax.pure_callback(host, tuple(shapes), *arrays, vmap_method="sequential")
  return outs[0] if single else list(outs)


# ----------------------------------------------------------------- dispatch --

@functools.lru_cache(maxsize=None)
def _triton_call_and_out_keyword():
  try:
    import jax_triton
  except ImportError as e:
    raise ImportError(
        "backend='triton' on GPU needs jax-triton with GPU support (pip install "
        f"jax-triton); importing it failed: {e}") from e
  params = inspect.signature(jax_triton.triton_call).parameters
  # jax-triton names the output argument out_shape; newer versions out_type.
  for keyword in ("out_shape", "out_type"):
    if keyword in params:
      return jax_triton.triton_call, keyword
  raise TypeError(
      "jax_triton.triton_call takes neither out_shape nor out_type; this "
      f"jax-triton version is not supported (parameters: {list(params)}).")


def call(*args, kernel, out_shape, grid, name: str, num_warps: int, num_stages: int,
         interpret: bool, **constexprs):
  """Launches ``kernel`` once: jax_triton on GPU, the interpreter if ``interpret``.

  args: jax arrays (pointers, in kernel order) and Python scalars; the outputs'
  pointers follow them; ``constexprs`` are the kernel's constexpr arguments.
  Returns one array per entry of ``out_shape`` (a list if it is a list).
  """
  if interpret:
    return interpret_call(*args, kernel=kernel, out_shape=out_shape, grid=grid, **constexprs)
  triton_call, out_keyword = _triton_call_and_out_keyword()
  return triton_call(*args, kernel=kernel, grid=grid, name=name, num_warps=num_warps,
                     num_stages=num_stages, **{out_keyword: out_shape}, **constexprs)
