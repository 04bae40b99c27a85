"""Ahead-of-time sm_90 compile of the Triton forward, with a resource report.

Runs on any machine (no GPU needed): ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` gives PTX and Triton's shared-memory size;
``ptxas -v`` on that PTX (the ptxas Triton ships, with Triton's flags) gives
registers and spills. ``python -m jax_grouped_attn.triton.compile_check``
prints the table for the default ForwardConfig of every padded head_dim.
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
from jax_grouped_attn.config import ForwardConfig, default_forward_config
from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.triton import kernels, launch

H100_MAX_SHARED_BYTES = 232448        # opt-in dynamic shared memory per block (sm_90)
HEAD_DIMS = (32, 64, 128, 256)        # supported padded head dims
DTYPES = ("bfloat16", "float16", "float32")
_TRITON_TYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclasses.dataclass(frozen=True)
class ResourceReport:
  head_dim: int
  dtype: str
  has_segments: bool
  config: ForwardConfig
  block_q: int               # tiles after plan.effective_blocks
  block_k: int
  registers: int             # per thread
  spill_stores: int          # bytes
  spill_loads: int           # bytes
  stack_frame: int           # bytes
  shared_bytes: int          # dynamic shared memory per block

  @property
  def spills(self) -> int:
    return self.spill_stores + self.spill_loads

  def row(self) -> str:
    c = self.config
    return (f"d={self.head_dim:<3} {self.dtype:<8} seg={int(self.has_segments)} "
            f"bq={self.block_q:<3} bk={self.block_k:<3} warps={c.num_warps} "
            f"stages={c.num_stages}: regs={self.registers:<3} spills={self.spills:<5} "
            f"(st {self.spill_stores}, ld {self.spill_loads}) stack={self.stack_frame:<4} "
            f"smem={self.shared_bytes}")


def _problem(head_dim: int, has_segments: bool, seq: int = 4096, batch: int = 2,
             hq: int = 16, hk: int = 4) -> plan_lib.Problem:
  """A representative causal GQA problem (shapes only set strides)."""
  return plan_lib.Problem((QueryGroup(0, seq, 0, seq),), batch, seq, seq, hq, hk, head_dim,
                          True, 1.0 / np.sqrt(head_dim), has_segments)


def _target(capability: int):
  from triton.backends.compiler import GPUTarget
  return GPUTarget("cuda", capability, 32)


def _pointer_attrs(types: list[str], capability: int) -> dict:
  """16-byte alignment of every pointer, as jax_triton specialises arrays."""
  try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    import types as pytypes
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
  """ASTSource across Triton versions: >= 3.2 takes name-keyed ``signature``
  (constexprs typed "constexpr") and ``constexprs``; 3.0/3.1 index-keyed
  ``signature`` and ``constants``."""
  from triton.compiler import ASTSource
  params = inspect.signature(ASTSource.__init__).parameters
  if "constexprs" in params:
    full = dict(signature, **{k: "constexpr" for k in constexprs})
    return ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
  names = fn.arg_names
  index_sig = {names.index(k): v for k, v in signature.items()}
  consts = {names.index(k): v for k, v in constexprs.items()}
  return ASTSource(fn=fn, signature=index_sig, constants=consts)


def compile_forward(head_dim: int, dtype: str, has_segments: bool,
                    config: ForwardConfig | None = None, *, capability: int = 90):
  """Compiles kernels.forward_kernel for sm_``capability`` exactly as
  launch.forward would configure it. Returns (compiled kernel, plan)."""
  config = config or default_forward_config(head_dim, "triton", dtype=dtype)
  problem = _problem(head_dim, has_segments)
  plan = plan_lib.make_plan(problem, config.block_q, config.block_k)
  dp = head_dim
  q_shape = (problem.batch, plan.tq_pad, problem.hq, dp)
  kv_shape = (problem.batch, plan.tk_pad, problem.hk, dp)
  constexprs = launch.forward_constexprs(q_shape=q_shape, kv_shape=kv_shape, problem=problem,
                                         plan=plan, dtype=np.dtype(dtype),
                                         has_segments=has_segments)
  t = "*" + _TRITON_TYPE[dtype]
  signature = {"table_ptr": "*i32", "q_ptr": t, "k_ptr": t, "v_ptr": t, "qseg_ptr": "*i32",
               "kvseg_ptr": "*i32", "out_ptr": t, "lse_ptr": "*fp32"}
  attrs = _pointer_attrs(list(signature.values()), capability)
  src = _ast_source(kernels.forward_kernel, signature, constexprs, attrs)
  compiled = triton.compile(src, target=_target(capability),
                            options={"num_warps": config.num_warps,
                                     "num_stages": config.num_stages, "num_ctas": 1,
                                     "enable_fp_fusion": True})  # as jax_triton
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


def forward_resources(head_dim: int, dtype: str, has_segments: bool,
                      config: ForwardConfig | None = None, *,
                      capability: int = 90) -> ResourceReport:
  config = config or default_forward_config(head_dim, "triton", dtype=dtype)
  compiled, plan = compile_forward(head_dim, dtype, has_segments, config,
                                   capability=capability)
  usage = ptxas_usage(compiled.asm["ptx"], capability)
  return ResourceReport(head_dim, dtype, has_segments, config, plan.block_q, plan.block_k,
                        shared_bytes=int(compiled.metadata.shared), **usage)


def _default_resources(variant) -> ResourceReport:
  head_dim, dtype, has_segments, capability = variant
  return forward_resources(head_dim, dtype, has_segments, capability=capability)


def check_all(head_dims=HEAD_DIMS, dtypes=DTYPES, segments=(False, True),
              capability: int = 90, processes: int | None = None) -> list[ResourceReport]:
  """Reports for the default config of every (head_dim, dtype, segments).

  Compiles in ``processes`` worker processes (default: one per CPU; 1 = in
  this process). Workers are spawned, not forked: JAX is already running here.
  """
  variants = [(d, t, s, capability) for d in head_dims for t in dtypes for s in segments]
  processes = processes or os.cpu_count() or 1
  if processes == 1 or len(variants) == 1:
    return [_default_resources(v) for v in variants]
  import concurrent.futures
  import multiprocessing
  with concurrent.futures.ProcessPoolExecutor(
      min(processes, len(variants)), mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(pool.map(_default_resources, variants))


def problems(reports: list[ResourceReport]) -> list[str]:
  """Reports that would hurt on an H100: register spills or too much shared memory."""
  bad = []
  for r in reports:
    if r.spills:
      bad.append(f"spills {r.spills} bytes: {r.row()}")
    if r.shared_bytes > H100_MAX_SHARED_BYTES:
      bad.append(f"shared memory {r.shared_bytes} > {H100_MAX_SHARED_BYTES}: {r.row()}")
  return bad


def main():
  reports = check_all()
  for r in reports:
    print(r.row())
  bad = problems(reports)
  for line in bad:
    print("PROBLEM:", line)
  return 1 if bad else 0


if __name__ == "__main__":
  raise SystemExit(main())
