"""Ahead-of-time sm_90 compile of the Triton kernels, with a resource report.

Runs on any machine (no GPU needed): ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` gives PTX and Triton's shared-memory size;
``ptxas -v`` on that PTX (the ptxas Triton ships, with Triton's flags) gives
registers and spills. ``python -m devtools.compile_check`` (from the repository root)
prints the table for the default ForwardConfig (kernel "forward") and
BackwardConfig (kernels "dkdv", "dq" and "delta") of every padded head_dim.

The numbers depend on the Triton version: Triton 3.6 (the GPU image's) asks
for more shared memory than 3.9 (one more [BLOCK_Q, Dp]-sized buffer in the
forward: 262144 B vs 229376 B for 128x128x3 at d=128 bf16, the very 262144 B
an H100 with Triton 3.6 refused at launch) and allocates registers worse.
Run it under the Triton the GPU uses.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import tempfile

import numpy as np
import triton

from jax_grouped_attn import plan as plan_lib
from jax_grouped_attn.config import BackwardConfig, ForwardConfig, Tiles
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.triton import (
  common,
  heuristics,
  kernels,
  launch,
  runtime,
)

H100_MAX_SHARED_BYTES = 232448        # opt-in dynamic shared memory per block (sm_90)
HEAD_DIMS = (32, 64, 128, 256)        # supported padded head dims
DTYPES = ("bfloat16", "float16", "float32")
KERNELS = ("forward", "dkdv", "dq", "delta")
BACKWARD_KERNELS = ("dkdv", "dq", "delta")
# What Triton 3.6 (the GPU image's, whose figures match the H100's launch
# requests) may ask for beyond what another version reports, for the same
# kernel and config. Measured 3.6 - 3.9 (sm_90, bytes): forward one extra
# [BLOCK_Q, Dp] tile (d128 bf16 128x64x3: 163840 - 131072 = 32768; 128x128x3:
# 262144 - 229376); dQ up to 65536 (d128 bf16 64x64x8x2: 163840 - 98304;
# 32x64x8x3: 115200 - 70144 = 45056); dK/dV equal.
SHARED_MARGIN_BYTES = 65536
MEASURED_TRITON = "3.6"   # the version whose shared-memory figures need no margin
_TRITON_TYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Sliding-window launches, (causal, Problem.window): a left window adds the
# leading masked loop (FIRST/FULL0) to the forward and dQ kernels, a right one
# only mask terms. NO_WINDOW is the default launch.
NO_WINDOW = (True, None)
WINDOWS = ((True, (256, None)), (False, (128, 128)))


@dataclasses.dataclass(frozen=True)
class ResourceReport:
  head_dim: int
  dtype: str
  has_segments: bool
  config: ForwardConfig | Tiles   # as launched (delta: its fixed warps/stages)
  block_q: int               # this kernel's tiles after plan.effective_blocks
  block_k: int
  registers: int             # per thread
  spill_stores: int          # bytes
  spill_loads: int           # bytes
  stack_frame: int           # bytes
  shared_bytes: int          # dynamic shared memory per block
  kernel: str = "forward"    # one of KERNELS
  causal: bool = True
  window: tuple | None = None  # Problem.window of the compiled launch

  @property
  def spills(self) -> int:
    return self.spill_stores + self.spill_loads

  def row(self) -> str:
    c = self.config
    win = "" if self.window is None else f" causal={int(self.causal)} window={self.window}"
    return (f"{self.kernel:<7} d={self.head_dim:<3} {self.dtype:<8} "
            f"seg={int(self.has_segments)}{win} "
            f"bq={self.block_q:<3} bk={self.block_k:<3} warps={c.num_warps} "
            f"stages={c.num_stages}: regs={self.registers:<3} spills={self.spills:<5} "
            f"(st {self.spill_stores}, ld {self.spill_loads}) stack={self.stack_frame:<4} "
            f"smem={self.shared_bytes}")


def _problem(head_dim: int, has_segments: bool, seq: int = 4096, batch: int = 2,
             hq: int = 16, hk: int = 4, *, causal: bool = True,
             window=None) -> plan_lib.Problem:
  """A representative GQA problem, causal by default (shapes only set strides)."""
  return plan_lib.Problem((QueryGroup(0, seq, 0, seq),), batch, seq, seq, hq, hk, head_dim,
                          causal, 1.0 / np.sqrt(head_dim), has_segments, window)


def _target(capability: int):
  from triton.backends.compiler import GPUTarget
  return GPUTarget("cuda", capability, 32)


def _pointer_attrs(types: list[str], capability: int) -> dict:
  """16-byte alignment of every pointer, as jax_triton specialises arrays."""
  try:
    import types as pytypes

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    backend = CUDABackend(_target(capability))
    attrs = {}
    for i, ty in enumerate(types):
      arg = pytypes.SimpleNamespace(data_ptr=lambda: 16, dtype=ty.removeprefix("*"))
      _, attr = native_specialize_impl(backend, arg, False, True, True)
      attrs[(i,)] = backend.parse_attr(attr)
    return attrs
  except (ImportError, AttributeError, TypeError):
    return {(i,): [["tt.divisibility", 16]] for i in range(len(types))}


def _ast_source(fn, signature: dict, constexprs: dict, attrs: dict):
  """ASTSource across Triton versions: >= 3.3 takes name-keyed ``signature``
  (constexprs typed "constexpr") and ``constexprs``; 3.2 name-keyed
  ``signature`` (runtime arguments only), ``constants`` and an
  AttrsDescriptor (pointers 16-byte aligned); 3.0/3.1 index-keyed
  ``signature`` and ``constants``."""
  from triton.compiler import ASTSource
  params = inspect.signature(ASTSource.__init__).parameters
  if "constexprs" in params:
    full = dict(signature, **{k: "constexpr" for k in constexprs})
    return ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
  names = fn.arg_names
  try:
    from triton.backends.compiler import AttrsDescriptor
    aligned = AttrsDescriptor.from_hints(
        {names.index(k): 16 for k, v in signature.items() if v.startswith("*")})
    return ASTSource(fn=fn, signature=dict(signature), constants=dict(constexprs),
                     attrs=aligned)
  except (ImportError, AttributeError, TypeError):
    pass
  index_sig = {names.index(k): v for k, v in signature.items()}
  consts = {names.index(k): v for k, v in constexprs.items()}
  return ASTSource(fn=fn, signature=index_sig, constants=consts)


def _pointer_types(kernel: str, dtype: str) -> dict:
  """Pointer signature of ``kernel`` in argument order (inputs, then outputs)."""
  t = "*" + _TRITON_TYPE[dtype]
  if kernel == "forward":
    return {"table_ptr": "*i32", "q_ptr": t, "k_ptr": t, "v_ptr": t, "qseg_ptr": "*i32",
            "kvseg_ptr": "*i32", "out_ptr": t, "lse_ptr": "*fp32"}
  if kernel == "dkdv":
    return {"kv_table_ptr": "*i32", "entries_ptr": "*i32", "q_ptr": t, "k_ptr": t, "v_ptr": t,
            "dout_ptr": t, "lse2_ptr": "*fp32", "delta_ptr": "*fp32", "qseg_ptr": "*i32",
            "kvseg_ptr": "*i32", "dk_ptr": t, "dv_ptr": t}
  if kernel == "dq":
    return {"table_ptr": "*i32", "q_ptr": t, "k_ptr": t, "v_ptr": t, "dout_ptr": t,
            "lse2_ptr": "*fp32", "delta_ptr": "*fp32", "qseg_ptr": "*i32", "kvseg_ptr": "*i32",
            "dq_ptr": t}
  if kernel == "delta":
    return {"valid_ptr": "*i32", "out_ptr": t, "dout_ptr": t, "lse_ptr": "*fp32",
            "dlse_ptr": "*fp32", "delta_ptr": "*fp32", "lse2_ptr": "*fp32"}
  raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}.")


def default_config(kernel: str, head_dim: int, dtype: str):
  """The heuristic config attention would use for ``kernel`` (no tuned table)."""
  if kernel == "forward":
    return heuristics.forward_config(head_dim, dtype)
  return heuristics.backward_config(head_dim, dtype)


def compile_kernel(kernel: str, head_dim: int, dtype: str, has_segments: bool,
                   config: ForwardConfig | BackwardConfig | None = None, *,
                   capability: int = 90, causal: bool = True, window=None):
  """Compiles one Triton kernel (``kernel`` in KERNELS) for sm_``capability``
  exactly as launch.forward / launch.backward would configure it (for a
  ``causal`` problem with sliding ``window``, a Problem.window).
  Returns (compiled kernel, plan with this kernel's tiles, tiles as launched)."""
  config = config or default_config(kernel, head_dim, dtype)
  problem = _problem(head_dim, has_segments, causal=causal, window=window)
  dp = head_dim
  launched = config
  if kernel == "forward":
    plan = plan_lib.make_plan(problem, config.block_q, config.block_k)
  else:
    dq_tiles = config.dq
    bplan = plan_lib.make_backward_plan(problem, config.block_q, config.block_k,
                                        dq_tiles.block_q, dq_tiles.block_k)
    plan = bplan.plan   # the backward's layout, and dQ's tiles
  q_shape = (problem.batch, plan.tq_pad, problem.hq, dp)
  kv_shape = (problem.batch, plan.tk_pad, problem.hk, dp)
  shared = dict(q_shape=q_shape, kv_shape=kv_shape, problem=problem, dtype=np.dtype(dtype))
  if kernel == "forward":
    fn, constexprs = kernels.forward_kernel, launch.forward_constexprs(plan=plan, **shared)
  elif kernel == "dkdv":
    plan = dataclasses.replace(plan, block_q=bplan.block_q, block_k=bplan.block_k)
    constexprs = launch.backward_constexprs(block_q=bplan.block_q,
                                                     block_k=bplan.block_k, **shared)
    fn, constexprs = kernels.dkdv_kernel, dict(constexprs, HK=problem.hk)
    launched = config.dkdv
  elif kernel == "dq":
    constexprs = launch.backward_constexprs(block_q=plan.block_q,
                                                     block_k=plan.block_k, **shared)
    fn, constexprs = kernels.dq_kernel, dict(constexprs, HQ=problem.hq)
    launched = dq_tiles
  elif kernel == "delta":
    sq = common.contiguous_strides(q_shape)
    sl = common.contiguous_strides((problem.batch, problem.hq, plan.tq_pad))
    rows = bplan.row_block
    plan = dataclasses.replace(plan, block_q=rows)
    fn = kernels.delta_kernel
    constexprs = dict(HQ=problem.hq, SQ_B=sq[0], SQ_T=sq[1], SQ_H=sq[2], SL_B=sl[0],
                      SL_H=sl[1], BLOCK_Q=rows, DP=dp)
    launched = config.dkdv._replace(num_warps=launch.DELTA_NUM_WARPS,
                                    num_stages=launch.DELTA_NUM_STAGES)
  else:
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}.")
  signature = _pointer_types(kernel, dtype)
  attrs = _pointer_attrs(list(signature.values()), capability)
  src = _ast_source(fn, signature, constexprs, attrs)
  with runtime.language_lock():   # never while a kernel is interpreted (tl patched)
    compiled = triton.compile(src, target=_target(capability),
                              options={"num_warps": launched.num_warps,
                                       "num_stages": launched.num_stages, "num_ctas": 1,
                                       "enable_fp_fusion": True})  # as jax_triton
  return compiled, plan, launched


def compile_forward(head_dim: int, dtype: str, has_segments: bool,
                    config: ForwardConfig | None = None, *, capability: int = 90):
  """Compiles kernels.forward_kernel for sm_``capability`` exactly as
  launch.forward would configure it. Returns (compiled kernel, plan)."""
  compiled, plan, _ = compile_kernel("forward", head_dim, dtype, has_segments, config,
                                     capability=capability)
  return compiled, plan


def _ptxas_path(capability: int) -> str:
  from triton.backends.nvidia import compiler as nv
  arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
  get = getattr(nv, "get_ptxas", None)
  for args in ((arch,), (capability,), ()):
    try:
      tool = get(*args)
      return getattr(tool, "path", tool[0] if isinstance(tool, tuple) else tool)
    except TypeError:
      continue
  return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def ptxas_usage(ptx: str, capability: int = 90) -> dict:
  """Registers, spill bytes and stack frame reported by ``ptxas -v``."""
  from triton.backends.nvidia import compiler as nv
  arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
  flags = ["-lineinfo", "-v", f"--gpu-name={arch}"]
  # Mirror the register-allocation flag Triton passes where it passes one.
  if "regAllocOptLevel" in inspect.getsource(nv):
    flags.append("--regAllocOptLevel=2")
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "kernel.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    proc = subprocess.run([_ptxas_path(capability), *flags, src, "-o", src + ".o"],
                          capture_output=True, text=True, check=True)
  log = proc.stdout + proc.stderr
  number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0
  usage = dict(registers=number(r"Used (\d+) registers"),
               spill_stores=number(r"(\d+) bytes spill stores"),
               spill_loads=number(r"(\d+) bytes spill loads"),
               stack_frame=number(r"(\d+) bytes stack frame"))
  if not re.search(r"Used \d+ registers", log):
    raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
  return usage


def kernel_resources(kernel: str, head_dim: int, dtype: str, has_segments: bool,
                     config: ForwardConfig | BackwardConfig | None = None, *,
                     capability: int = 90, causal: bool = True,
                     window=None) -> ResourceReport:
  compiled, plan, config = compile_kernel(kernel, head_dim, dtype, has_segments, config,
                                          capability=capability, causal=causal, window=window)
  usage = ptxas_usage(compiled.asm["ptx"], capability)
  return ResourceReport(head_dim, dtype, has_segments, config, plan.block_q, plan.block_k,
                        shared_bytes=int(compiled.metadata.shared), kernel=kernel,
                        causal=causal, window=window, **usage)


def forward_resources(head_dim: int, dtype: str, has_segments: bool,
                      config: ForwardConfig | None = None, *,
                      capability: int = 90) -> ResourceReport:
  return kernel_resources("forward", head_dim, dtype, has_segments, config,
                          capability=capability)


def backward_resources(kernel: str, head_dim: int, dtype: str, has_segments: bool,
                       config: BackwardConfig | None = None, *,
                       capability: int = 90) -> ResourceReport:
  """``kernel``: "dkdv", "dq" or "delta" (delta ignores ``has_segments``)."""
  if kernel not in BACKWARD_KERNELS:
    raise ValueError(f"unknown backward kernel {kernel!r}; expected one of {BACKWARD_KERNELS}.")
  return kernel_resources(kernel, head_dim, dtype, has_segments, config,
                          capability=capability)


def _default_resources(variant) -> ResourceReport:
  kernel, head_dim, dtype, has_segments, capability, (causal, window) = variant
  return kernel_resources(kernel, head_dim, dtype, has_segments, capability=capability,
                          causal=causal, window=window)


def variants(head_dims=HEAD_DIMS, dtypes=DTYPES, segments=(False, True),
             kernels=KERNELS) -> list[tuple[str, int, str, bool]]:
  """(kernel, head_dim, dtype, has_segments) of every default launch; delta
  only without segments (it has no segment argument)."""
  return [(k, d, t, s) for k in kernels for d in head_dims for t in dtypes for s in segments
          if not (k == "delta" and s)]


def check_all(head_dims=HEAD_DIMS, dtypes=DTYPES, segments=(False, True),
              capability: int = 90, processes: int | None = None,
              kernels=KERNELS, windows=(NO_WINDOW,)) -> list[ResourceReport]:
  """Reports for the default config of every (kernel, head_dim, dtype,
  segments) x ``windows`` ((causal, Problem.window) pairs; delta has no
  window and is compiled once).

  Compiles in ``processes`` worker processes (default: one per CPU; 1 = in
  this process). Workers are spawned, not forked: JAX is already running here.
  """
  todo = [v + (capability, w) for v in variants(head_dims, dtypes, segments, kernels)
          for w in (windows if v[0] != "delta" else windows[:1])]
  processes = processes or os.cpu_count() or 1
  if processes == 1 or len(todo) == 1:
    return [_default_resources(v) for v in todo]
  import concurrent.futures
  import multiprocessing
  with concurrent.futures.ProcessPoolExecutor(
      min(processes, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(pool.map(_default_resources, todo))


def shared_budget(version: str | None = None) -> int:
  """Shared bytes a kernel may report under Triton ``version`` (default: the
  installed one) and still fit an H100 under Triton 3.6: the full limit
  under 3.6, SHARED_MARGIN_BYTES less under any other version."""
  version = triton.__version__ if version is None else version
  same = version == MEASURED_TRITON or version.startswith(MEASURED_TRITON + ".")
  return H100_MAX_SHARED_BYTES - (0 if same else SHARED_MARGIN_BYTES)


def problems(reports: list[ResourceReport]) -> list[str]:
  """Reports that would hurt on an H100: register spills or too much shared
  memory (beyond :func:`shared_budget` for this Triton)."""
  bad, budget = [], shared_budget()
  for r in reports:
    if r.spills:
      bad.append(f"spills {r.spills} bytes: {r.row()}")
    if r.shared_bytes > budget:
      bad.append(f"shared memory {r.shared_bytes} > {budget}: {r.row()}")
  return bad


def main():
  print(f"triton {triton.__version__}, sm_90, shared-memory budget {shared_budget()} B "
        f"(H100 limit {H100_MAX_SHARED_BYTES})")
  reports = check_all()
  reports += check_all(kernels=("forward", "dkdv", "dq"), windows=WINDOWS)
  for r in reports:
    print(r.row())
  bad = problems(reports)
  for line in bad:
    print("PROBLEM:", line)
  return 1 if bad else 0


if __name__ == "__main__":
  raise SystemExit(main())
